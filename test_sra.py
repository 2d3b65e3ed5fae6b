"""Tests for sra.py and sample.py: CPU only, tiny configs, seeded. Run: python -m pytest -q test_sra.py"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sra

HERE = os.path.dirname(os.path.abspath(__file__))


def tiny(**kw):
    """A 4-block, 64-wide model on 8x8x3 inputs with 4 classes."""
    cfg = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=4, num_heads=2, num_classes=4,
               learn_sigma=False)
    cfg.update(kw)
    return sra.DiT(**cfg)


def randomize(model, seed=0):
    """Give the zero-initialised layers random values so that outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g)) if p.requires_grad else None
    return model


def run(*argv, timeout=300, **kw):
    """Run a python program of the project in a subprocess."""
    return subprocess.run([sys.executable, *argv], cwd=HERE, capture_output=True, text=True, timeout=timeout, **kw)


def train_args(tmp_path, *extra):
    return ["sra.py", "--model", "SiT-T/4", "--resolution", "16", "--batch-size", "4", "--num-workers", "0",
            "--sample-steps", "0", "--log-every", "1", "--output-dir", str(tmp_path), "--exp-name", "run", *extra]


# ----------------------------------------------------------------------------------------------------
# Models

def expected_params(depth, D, p, C_in, C_out, classes, T):
    """Parameter count of the DiT/SiT architecture of SPEC §2, term by term."""
    block = (3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D) + (6 * D * D + 6 * D)
    return (C_in * p * p * D + D) + (256 * D + D + D * D + D) + (classes + 1) * D + T * D + depth * block \
        + (2 * D * D + 2 * D) + (D * p * p * C_out + p * p * C_out)


@pytest.mark.parametrize("name", list(sra.MODELS))
def test_every_model_shape_and_parameter_count(name):
    family, size, patch = name.split("-")[0], name.split("-")[1].split("/")[0], int(name.split("/")[1])
    depth, D, _ = sra.SIZES[size]
    with torch.device("meta"):
        model = sra.MODELS[name](input_size=32, in_channels=4, num_classes=1000)
    C_out = 8 if family == "DiT" else 4
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_params(depth, D, patch, 4, C_out, 1000, (32 // patch) ** 2)
    assert model.out_channels == C_out and model.depth == depth
    if name == "DiT-XL/2":
        assert n == 675_129_632  # the DiT paper's figure


def test_forward_shapes_any_size_channels_classes():
    for size, channels, classes, learn_sigma in [(8, 3, 4, False), (12, 1, 7, True), (16, 5, 1, False)]:
        model = randomize(sra.MODELS["SiT-T/4"](input_size=size, in_channels=channels, num_classes=classes,
                                                learn_sigma=learn_sigma))
        x = torch.randn(2, channels, size, size)
        out = model(x, torch.rand(2), torch.tensor([0, classes]))  # the null class is `classes`
        assert out.shape == (2, channels * (2 if learn_sigma else 1), size, size)


def test_fresh_model_outputs_exactly_zero():
    for name in ("SiT-T/2", "DiT-T/4"):
        model = sra.MODELS[name](input_size=8, in_channels=3, num_classes=4)
        out = model(torch.randn(3, 3, 8, 8), torch.tensor([0.1, 0.5, 0.9]), torch.tensor([0, 1, 4]))
        assert torch.equal(out, torch.zeros_like(out))


def test_released_checkpoint_names_load_strict():
    """The parameter names of the released DiT/SiT checkpoints (SPEC §2), and no projector needed."""
    model = sra.MODELS["DiT-S/8"](input_size=16, in_channels=4, num_classes=10)
    names = set(model.state_dict())
    expected = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight"}
    expected |= {f"t_embedder.mlp.{i}.{w}" for i in (0, 2) for w in ("weight", "bias")}
    for i in range(12):
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            expected |= {f"blocks.{i}.{layer}.weight", f"blocks.{i}.{layer}.bias"}
    expected |= {f"final_layer.{layer}.{w}" for layer in ("linear", "adaLN_modulation.1") for w in ("weight", "bias")}
    assert names == expected
    released = {k: torch.randn_like(v) for k, v in model.state_dict().items()}
    with_projector = sra.MODELS["DiT-S/8"](input_size=16, in_channels=4, num_classes=10, projector=True)
    assert {k for k in with_projector.state_dict() if k not in names} == \
        {"ap_head.linear1.weight", "ap_head.linear1.bias", "ap_head.linear2.weight", "ap_head.linear2.bias"}
    model.load_state_dict(released, strict=True)


def test_timestep_embedding_formula():
    t = torch.tensor([0.0, 0.3, 17.0, 999.0])
    emb = sra.TimestepEmbedder.timestep_embedding(t, 256)
    for n, tn in enumerate(t.tolist()):
        for i in (0, 5, 127):
            freq = math.exp(-math.log(10000) * i / 128)
            assert emb[n, i].item() == pytest.approx(math.cos(tn * freq), abs=1e-4)  # cos first
            assert emb[n, 128 + i].item() == pytest.approx(math.sin(tn * freq), abs=1e-4)


def test_positional_embedding_formula():
    D, grid = 16, 4
    table = sra.get_2d_sincos_pos_embed(D, grid)
    assert table.shape == (grid * grid, D)
    for k in range(grid * grid):
        h, w = divmod(k, grid)  # row-major tokens
        for i in range(D // 4):
            omega = 10000 ** (-i / (D / 4))
            assert table[k, i] == pytest.approx(math.sin(w * omega))
            assert table[k, D // 4 + i] == pytest.approx(math.cos(w * omega))
            assert table[k, D // 2 + i] == pytest.approx(math.sin(h * omega))
            assert table[k, 3 * D // 4 + i] == pytest.approx(math.cos(h * omega))
    model = tiny()
    assert not model.pos_embed.requires_grad
    assert torch.allclose(model.pos_embed[0], torch.from_numpy(sra.get_2d_sincos_pos_embed(64, 4)).float())


def test_sdpa_attention_matches_naive_softmax():
    torch.manual_seed(0)
    attn = sra.Attention(32, num_heads=4)
    x = torch.randn(2, 10, 32)
    q, k, v = attn.qkv(x).view(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    naive = attn.proj((weights @ v).transpose(1, 2).reshape(2, 10, 32))
    assert torch.allclose(attn(x), naive, atol=1e-5)


def test_forward_features_is_the_hidden_state_of_a_full_forward():
    """The early-exit teacher equals the hidden state that a full forward computes after that block."""
    model = randomize(tiny())
    x, t, y = torch.randn(3, 3, 8, 8), torch.rand(3), torch.tensor([0, 1, 2])
    seen = []
    hook = model.blocks[2].register_forward_hook(lambda m, i, o: seen.append(o))
    model(x, t, y)
    hook.remove()
    assert torch.allclose(model.forward_features(x, t, y, 3), seen[0], atol=1e-6)


def test_grad_checkpointing_gives_the_same_gradients():
    model = randomize(tiny())
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.grad_checkpointing = flag
        model(x, t, y).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# ----------------------------------------------------------------------------------------------------
# Objectives

@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_interpolant_derivatives_by_finite_differences(path):
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    alpha, sigma, d_alpha, d_sigma = sra.interpolant(t, path)
    a_plus, s_plus, _, _ = sra.interpolant(t + h, path)
    a_minus, s_minus, _, _ = sra.interpolant(t - h, path)
    assert torch.allclose(d_alpha, (a_plus - a_minus) / (2 * h), atol=1e-6)
    assert torch.allclose(d_sigma, (s_plus - s_minus) / (2 * h), atol=1e-6)
    a0, s0, _, _ = sra.interpolant(torch.tensor([0.0, 1.0], dtype=torch.float64), path)
    assert torch.allclose(a0, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12)  # t = 0 is data
    assert torch.allclose(s0, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-12)  # t = 1 is noise


def test_lognormal_time_sampling_is_the_logistic_of_a_normal():
    g = torch.Generator().manual_seed(0)
    t = sra.sample_time(200_000, "lognormal", "linear", "cpu", g)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.01 and abs(logit.std().item() - 1) < 0.01
    t_cos = sra.sample_time(1000, "lognormal", "cosine", "cpu", g)
    assert 0 < t_cos.min() and t_cos.max() < 1


def test_ddpm_tables_against_closed_forms():
    d = sra.GaussianDiffusion.linear(1000)
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    assert d.betas.dtype == torch.float64
    assert np.allclose(d.alphas_cumprod.numpy(), abar, rtol=1e-12)
    t = 500
    pv = betas[t] * (1 - abar[t - 1]) / (1 - abar[t])
    assert d.posterior_variance[t].item() == pytest.approx(pv, rel=1e-12)
    assert d.posterior_log_variance_clipped[0].item() == pytest.approx(math.log(d.posterior_variance[1].item()))
    # posterior mean of q(x_{t-1} | x_t, x_0) from Bayes' rule on two Gaussians
    x0, xt = torch.tensor([[0.3]], dtype=torch.float64), torch.tensor([[-0.7]], dtype=torch.float64)
    mean, _ = d.q_posterior(x0, xt, torch.tensor([t]))
    prior_mean, prior_var = math.sqrt(abar[t - 1]) * 0.3, 1 - abar[t - 1]
    lik_scale, lik_var = math.sqrt(1 - betas[t]), betas[t]
    expected = (prior_mean / prior_var + lik_scale * -0.7 / lik_var) / (1 / prior_var + lik_scale ** 2 / lik_var)
    assert mean.item() == pytest.approx(expected, rel=1e-9)
    # respacing keeps the alpha-bars of the kept steps
    sub = d.respace(250)
    assert sub.num_timesteps == 250 and sub.timestep_map[0] == 0 and sub.timestep_map[-1] == 999
    assert torch.allclose(sub.alphas_cumprod, d.alphas_cumprod[sub.timestep_map])
    assert torch.allclose(d.respace(1000).betas, d.betas, rtol=1e-10, atol=0)  # 1000 steps = no respacing


def test_ddpm_vb_term_is_nonnegative_and_trains_only_the_variance():
    d = sra.GaussianDiffusion.linear(1000)
    torch.manual_seed(0)
    x0 = torch.rand(64, 3, 4, 4) * 2 - 1
    noise, t = torch.randn_like(x0), torch.randint(0, 1000, (64,))
    t[:4] = 0  # the discretized-likelihood term
    xt = d.q_sample(x0, t, noise)
    out = torch.randn(64, 6, 4, 4).clamp(-1, 1).requires_grad_()
    mse = sra.mean_flat((noise - out[:, :3]) ** 2)
    vb = d.training_losses(out, x0, xt, t, noise) - mse
    assert (vb >= 0).all()
    vb.sum().backward()
    assert torch.equal(out.grad[:, :3], torch.zeros_like(out.grad[:, :3]))  # eps gets no vb gradient
    assert out.grad[:, 3:].abs().sum() > 0
    # the true eps with v = -1 (log variance = log beta tilde, the true posterior's) gives KL = 0
    exact = torch.cat([noise, torch.full_like(x0, -1.0)], dim=1)
    assert (d.training_losses(exact, x0, xt, t, noise)[4:]).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------------
# SRA term and EMA

def sra_args(family="SiT", **kw):
    args = sra.parse_args(["--model", f"{family}-T/2"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


def capture_calls(model, ema):
    """Record the inputs of the student forward and the teacher's forward_features."""
    calls = {}
    student_forward, teacher_forward = model.forward, ema.forward_features

    def student(x, t, y, **kw):
        calls["student"] = (x, t, y)
        return student_forward(x, t, y, **kw)

    def teacher(x, t, y, depth):
        calls["teacher"] = (x, t, y, depth)
        return teacher_forward(x, t, y, depth)

    model.forward, ema.forward_features = student, teacher
    return calls


@pytest.mark.parametrize("family", ["SiT", "DiT"])
def test_teacher_sees_the_same_image_noise_and_labels_at_an_earlier_time(family):
    torch.manual_seed(0)
    learn_sigma = family == "DiT"
    model = randomize(tiny(projector=True, learn_sigma=learn_sigma))
    ema = tiny(learn_sigma=learn_sigma)
    args = sra_args(family, cfg_prob=0.5, block_out_s=1, block_out_t=3)
    calls = capture_calls(model, ema)
    x, y = torch.randn(64, 3, 8, 8), torch.randint(0, 4, (64,))
    diffusion = sra.GaussianDiffusion.linear() if family == "DiT" else None
    sra.training_losses(model, ema, x, y, args, diffusion, torch.Generator().manual_seed(1))
    xs, ts, ys = calls["student"]
    xt, tt, yt, depth = calls["teacher"]
    assert depth == 3 and torch.equal(ys, yt)  # same labels after dropout
    assert (ys == 4).any() and (ys != 4).any()  # some labels were dropped to the null class, some kept
    if family == "SiT":
        assert (tt <= ts).all() and (ts - tt <= 0.2 + 1e-6).all() and (tt < ts).any()
        a, s, _, _ = sra.interpolant(ts.view(-1, 1, 1, 1))
        a2, s2, _, _ = sra.interpolant(tt.view(-1, 1, 1, 1))
        eps_student, eps_teacher = (xs - a * x) / s, (xt - a2 * x) / s2
    else:
        assert (tt <= ts.clamp(min=1)).all() and (ts - tt < 200).all() and (tt < ts).any()
        abar = diffusion.alphas_cumprod.float()
        eps_student = (xs - abar[ts].sqrt().view(-1, 1, 1, 1) * x) / (1 - abar[ts]).sqrt().view(-1, 1, 1, 1)
        eps_teacher = (xt - abar[tt].sqrt().view(-1, 1, 1, 1) * x) / (1 - abar[tt]).sqrt().view(-1, 1, 1, 1)
    keep = (tt > 0.05) if family == "SiT" else ts > 0  # skip t' ~ 0, where the noise is invisible
    assert torch.allclose(eps_student[keep], eps_teacher[keep], atol=1e-3)  # same noise


def test_no_gradient_reaches_the_teacher_and_teacher_runs_only_its_blocks():
    model, ema = randomize(tiny(projector=True)), randomize(tiny(), seed=1)
    ran = []
    for i, block in enumerate(ema.blocks):
        block.register_forward_hook(lambda m, inp, out, i=i: ran.append(i))
    ema.final_layer.register_forward_hook(lambda m, inp, out: ran.append("final"))
    args = sra_args(block_out_s=1, block_out_t=2)
    _, align, _ = sra.training_losses(model, ema, torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), args, None,
                                      torch.Generator().manual_seed(0))
    assert ran == [0, 1]  # blocks 1..2 only: no later block, no final layer
    align.backward()
    assert all(p.grad is None for p in ema.parameters())
    assert model.ap_head.linear1.weight.grad.abs().sum() > 0  # the projector is trained
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[3].attn.qkv.weight.grad is None  # blocks after s get no alignment gradient


def test_no_sra_runs_no_teacher():
    model, ema = randomize(tiny()), tiny()
    calls = capture_calls(model, ema)
    _, align, _ = sra.training_losses(model, ema, torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]),
                                      sra_args(no_sra=True), None, torch.Generator().manual_seed(0))
    assert "teacher" not in calls and align.item() == 0


def test_alignment_losses():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    loss, cos = sra.align_loss(s, t, "sml1")
    diff = (s - t).abs()
    assert loss.item() == pytest.approx(torch.where(diff < 0.05, 0.5 * diff ** 2 / 0.05, diff - 0.025).mean().item())
    loss_cos, _ = sra.align_loss(s, t, "cos")
    per_token = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))  # over the feature axis, per token
    assert loss_cos.item() == pytest.approx((1 - per_token).mean().item(), abs=1e-6)
    assert cos.item() == pytest.approx(per_token.mean().item(), abs=1e-6)
    assert sra.align_loss(s.half(), s.half(), "cos")[0].item() == pytest.approx(0, abs=1e-6)


def test_align_weight_schedule_and_defaults():
    assert sra.align_weight(100, 0.2, 1000, 5000) == 0.2
    assert sra.align_weight(6000, 0.2, 1000, 5000) == pytest.approx(0.02)
    assert sra.align_weight(10 ** 7, 0.2, 0, 0) == 0.2
    args = sra.parse_args(["--model", "SiT-XL/2"])
    assert (args.block_out_s, args.block_out_t, args.align_weight) == (8, 20, 0.2)
    assert args.align_decay_start == 745_596 and args.align_decay_steps == 5_004_000
    args = sra.parse_args(["--model", "DiT-XL/2"])
    assert (args.block_out_s, args.block_out_t, args.align_weight, args.learn_sigma) == (8, 16, 0.04, True)
    assert sra.parse_args(["--model", "SiT-B/2", "--loss-type", "cos"]).align_weight == 0.5
    assert (sra.parse_args(["--model", "SiT-L/4"]).block_out_s, sra.parse_args(["--model", "SiT-S/2"]).block_out_t) \
        == (6, 8)
    assert sra.parse_args(["--path-type", "cos"]).path_type == "cosine"


def test_official_commands_parse():
    sit = ('--allow-tf32 --mixed-precision=fp16 --seed=0 --path-type=linear --prediction=v --resolution=256 '
           '--batch-size=32 --weighting=uniform --model=SiT-XL/2 --block-out-s=8 --block-out-t=20 --t-max=0.2 '
           '--output-dir=exps --exp-name=sitxl-ab820-t0.2-res256 --data-dir=/data').split()
    args = sra.parse_args(sit)
    assert (args.model, args.block_out_t, args.mixed_precision, args.batch_size) == ("SiT-XL/2", 20, "fp16", 32)
    dit = ('--allow-tf32 --mixed-precision=fp16 --seed=0 --resolution=256 --batch-size=32 --model=DiT-XL/2 '
           '--block-out-s=8 --block-out-t=20 --t-max=0.2 --output-dir=exps --exp-name=ditxl-ab820-t0.2-res256 '
           '--data-dir=/data --cfg-prob 0.1 --learning-rate 1e-4 --adam-beta1 0.9 --adam-beta2 0.999 '
           '--adam-weight-decay 0 --adam-epsilon 1e-8 --max-grad-norm 1 --num-workers 4 --num-classes 1000').split()
    args = sra.parse_args(dit)
    assert (args.family, args.block_out_s, args.block_out_t, args.num_classes) == ("DiT", 8, 20, 1000)


def test_ema_update_matches_the_formula_and_starts_as_a_copy():
    torch.manual_seed(0)
    ema_params = [torch.randn(5, 3), torch.randn(7)]
    model_params = [torch.randn(5, 3), torch.randn(7)]
    expected = [0.9 * e + 0.1 * m for e, m in zip(ema_params, model_params)]
    sra.update_ema(ema_params, model_params, decay=0.9)
    assert all(torch.allclose(e, x, atol=1e-7) for e, x in zip(ema_params, expected))
    same = [m.clone() for m in model_params]
    sra.update_ema(same, model_params, decay=0.9999)
    assert all(torch.allclose(s, m) for s, m in zip(same, model_params))  # a copy stays a copy


# ----------------------------------------------------------------------------------------------------
# Learning

@pytest.mark.parametrize("family", ["SiT", "DiT"])
def test_one_batch_overfit(family):
    torch.manual_seed(0)
    model = tiny(projector=True, learn_sigma=family == "DiT")
    ema = tiny(learn_sigma=family == "DiT")
    ema.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("ap_head")})
    args = sra_args(family, block_out_s=1, block_out_t=3, cfg_prob=0.0)
    diffusion = sra.GaussianDiffusion.linear() if family == "DiT" else None
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x, y = torch.randn(8, 3, 8, 8) * 0.5, torch.arange(8) % 4
    losses = []
    for step in range(150):
        denoise, align, _ = sra.training_losses(model, ema, x, y, args, diffusion, torch.Generator().manual_seed(0))
        (denoise + 0.2 * align).backward()
        opt.step()
        opt.zero_grad()
        losses.append(denoise.item())
    assert losses[-1] < 0.2 * losses[0]  # the same batch, noise and times: memorised


def test_builtin_dataset_is_deterministic_and_class_conditional():
    ds = sra.ShapesDataset(32)
    x0, y0 = ds[7]
    assert x0.shape == (3, 32, 32) and x0.min() >= -1 and x0.max() <= 1 and y0 == 7
    assert torch.equal(ds[7][0], x0)  # the same index gives the same image
    means = torch.stack([torch.stack([ds[c + 10 * i][0] for i in range(20)]).mean(0) for c in range(10)])
    gaps = torch.cdist(means.flatten(1), means.flatten(1))
    assert gaps[~torch.eye(10, dtype=bool)].min() > 1.0  # classes look different on average


# ----------------------------------------------------------------------------------------------------
# The trainer end to end

def test_training_run_writes_its_folder_and_learns(tmp_path):
    r = run(*train_args(tmp_path, "--max-train-steps", "30", "--batch-size", "16", "--checkpoint-steps", "15",
                        "--learning-rate", "1e-3"))
    assert r.returncode == 0, r.stderr
    folder = tmp_path / "run"
    args = json.loads((folder / "args.json").read_text())
    assert (args["num_classes"], args["in_channels"], args["input_size"]) == (10, 3, 16)
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 30
    assert {"step", "epoch", "gen_loss", "align_loss", "align_cos", "grad_norm", "lr", "img_per_s"} <= metrics[0].keys()
    assert np.mean([m["gen_loss"] for m in metrics[-5:]]) < np.mean([m["gen_loss"] for m in metrics[:5]])
    assert sorted(os.listdir(folder / "checkpoints")) == ["0000015.pt", "0000030.pt"]
    ckpt = torch.load(folder / "checkpoints" / "0000030.pt", weights_only=True)  # no pickle code needed
    assert ckpt["step"] == 30 and isinstance(ckpt["args"], dict)
    assert not any(k.startswith("ap_head") for k in ckpt["ema"]) and any(k.startswith("ap_head") for k in ckpt["model"])
    assert "step 30/30" in (folder / "log.txt").read_text()


def test_resume_is_bit_identical(tmp_path):
    common = ["--max-train-steps", "6", "--checkpoint-steps", "3"]
    assert run(*train_args(tmp_path / "a", *common)).returncode == 0
    full = torch.load(tmp_path / "a" / "run" / "checkpoints" / "0000006.pt", weights_only=True)
    # a second run stops at step 3, then resumes from its checkpoint to step 6
    assert run(*train_args(tmp_path / "b", "--max-train-steps", "3", "--checkpoint-steps", "3")).returncode == 0
    r = run(*train_args(tmp_path / "b", *common, "--resume", "auto"))
    assert r.returncode == 0, r.stderr
    resumed = torch.load(tmp_path / "b" / "run" / "checkpoints" / "0000006.pt", weights_only=True)
    for key in ("model", "ema"):
        assert all(torch.equal(full[key][k], resumed[key][k]) for k in full[key])
    assert all(torch.equal(a["exp_avg"], b["exp_avg"])
               for a, b in zip(full["opt"]["state"].values(), resumed["opt"]["state"].values()))


def test_two_process_torchrun_cpu(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        *train_args(tmp_path, "--max-train-steps", "3")], cwd=HERE, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "2 process(es)" in log and "global batch 8" in log and "step 3/3" in log
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "0000003.pt", weights_only=True)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0], ckpt["rng"][1])  # distinct streams per rank


@pytest.mark.parametrize("extra, message", [
    (["--model", "SiT-Q/2"], "unknown model 'SiT-Q/2'; valid: SiT-T/2"),
    (["--data-dir", "/nonexistent/imagenet"], "does not exist"),
    (["--block-out-t", "7"], "--block-out-t 7 is out of range: SiT-T/4 has blocks 1..6"),
    (["--block-out-s", "0"], "out of range"),
    (["--resolution", "18"], "not divisible by the patch size 4"),
    (["--resume", "README.md"], "README.md is not a loadable checkpoint"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, extra, message):
    r = run(*train_args(tmp_path, "--max-train-steps", "1", *extra))
    assert r.returncode == 2 and message in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_bad_data_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    r = run(*train_args(tmp_path, "--data-dir", str(tmp_path / "empty")))
    assert r.returncode == 2 and "has no class sub-folders" in r.stderr
    (tmp_path / "lat" / "vae-sd").mkdir(parents=True)
    r = run(*train_args(tmp_path, "--data-dir", str(tmp_path / "lat"), "--resolution", "36"))
    assert r.returncode == 2 and "not divisible by 8" in r.stderr
    r = run(*train_args(tmp_path, "--dataset", "cifar10", "--data-dir", str(tmp_path / "nocifar")))
    assert r.returncode == 2 and "CIFAR-10 is not in" in r.stderr


def test_image_folder_and_latent_data(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "img" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "img" / c / f"{i}.png")
    ds = sra.ImageFolderDataset(str(tmp_path / "img"), 16)
    assert len(ds) == 8 and ds.num_classes == 2 and ds[5][1] == 1 and ds[0][0].shape == (3, 16, 16)
    r = run(*train_args(tmp_path / "o", "--data-dir", str(tmp_path / "img"), "--max-train-steps", "2"))
    assert r.returncode == 0, r.stderr
    labels = []
    for i in range(6):
        (tmp_path / "lat" / "vae-sd" / "00").mkdir(parents=True, exist_ok=True)
        np.save(tmp_path / "lat" / "vae-sd" / "00" / f"{i}.npy", rng.standard_normal((1, 8, 4, 4)).astype(np.float16))
        labels.append([f"00/{i}.npy", i % 3])
    (tmp_path / "lat" / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": labels}))
    ds = sra.LatentDataset(str(tmp_path / "lat"), 32)
    moments, label = ds[4]
    assert moments.shape == (8, 4, 4) and moments.dtype == torch.float16 and label == 1 and ds.num_classes == 3
    z = sra.prepare_batch(moments[None].repeat(2000, 1, 1, 1), "latents", torch.Generator().manual_seed(0))
    mean, std = moments.float().chunk(2)
    assert torch.allclose(z.mean(0), mean * 0.18215, atol=0.02)  # fresh posterior samples, scaled
    assert torch.allclose(z.std(0), std.abs() * 0.18215, atol=0.02)
    r = run(*train_args(tmp_path / "o", "--data-dir", str(tmp_path / "lat"), "--resolution", "32",
                        "--max-train-steps", "2", "--exp-name", "lat"))
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "o" / "lat" / "args.json").read_text())["in_channels"] == 4


def test_nan_loss_stops_with_the_last_good_checkpoint(tmp_path):
    r = run(*train_args(tmp_path, "--max-train-steps", "10", "--checkpoint-steps", "2", "--fault-nan-at", "5"))
    assert r.returncode == 2 and "non-finite loss" in r.stderr and "0000004.pt" in r.stderr
    assert not (tmp_path / "run" / "checkpoints" / "0000006.pt").exists()


# ----------------------------------------------------------------------------------------------------
# Speed paths and the benchmark

def test_flop_formula_matches_the_dit_paper():
    with torch.device("meta"):
        model = sra.MODELS["DiT-XL/2"](input_size=32, in_channels=4, num_classes=1000)
    assert sra.forward_flops(model) / 2 == pytest.approx(118.64e9, rel=0.01)  # the paper counts multiply-adds
    args = sra.parse_args(["--model", "SiT-XL/2"])
    with torch.device("meta"):
        sit = sra.MODELS["SiT-XL/2"](input_size=32, in_channels=4, num_classes=1000, projector=True)
    ratio = sra.train_flops(sit, args) / (3 * sra.forward_flops(sit))
    assert 1.22 < ratio < 1.26  # SRA's FLOP floor for SiT-XL/2: teacher 20 of 28 blocks (SPEC §8)


def test_bench_prints_json_with_every_field():
    r = run("sra.py", "--bench", "--model", "SiT-T/8", "--bench-shape", "3", "16", "16", "--batch-size", "2",
            "--bench-steps", "1", "--bench-sample", "2")
    assert r.returncode == 0, r.stderr
    vanilla, with_sra, sampler = [json.loads(line) for line in r.stdout.strip().splitlines()]
    fields = {"model", "batch", "dtype", "device", "step_s_median", "step_s_min", "step_s_max", "img_per_s",
              "peak_mem_gb", "flops_per_img", "tflops", "mfu"}
    assert fields <= vanilla.keys() and not vanilla["sra"] and with_sra["sra"]
    assert fields | {"sra_overhead_ratio", "teacher_frac", "ema_frac", "optimizer_frac"} <= with_sra.keys()
    assert with_sra["flops_per_img"] > vanilla["flops_per_img"] > 0 and with_sra["sra_overhead_ratio"] > 0
    assert sampler["num_steps"] == 2 and sampler["img_per_s"] > 0


def test_compiled_model_state_dict_has_plain_names():
    model = tiny(projector=True)
    compiled = torch.compile(model)
    assert "_orig_mod.pos_embed" in compiled.state_dict()
    assert list(sra.unwrap(compiled).state_dict()) == list(model.state_dict())  # what checkpoints store
    tiny(projector=True).load_state_dict(sra.unwrap(compiled).state_dict())


def test_bf16_and_fp32_losses_agree():
    torch.manual_seed(0)
    model, ema = randomize(tiny(projector=True)), randomize(tiny(), seed=1)
    x, y, args = torch.randn(16, 3, 8, 8), torch.arange(16) % 4, sra_args(block_out_s=1, block_out_t=3)
    losses = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            denoise, align, _ = sra.training_losses(model, ema, x, y, args, None, torch.Generator().manual_seed(0))
        losses.append((denoise.item(), align.item()))
    assert losses[1] == pytest.approx(losses[0], rel=0.05)
