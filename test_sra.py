"""Tests for sra.py and sample.py: CPU only, tiny configs, seeded. Run: python -m pytest -q test_sra.py"""
import argparse
import ast
import glob
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import sample
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
    return subprocess.run([sys.executable, *argv], cwd=HERE, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), **kw)


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
    sub = sample.respace(d, 250)
    assert sub.num_timesteps == 250 and sub.timestep_map[0] == 0 and sub.timestep_map[-1] == 999
    assert torch.allclose(sub.alphas_cumprod, d.alphas_cumprod[sub.timestep_map])
    assert torch.allclose(sample.respace(d, 1000).betas, d.betas, rtol=1e-10, atol=0)  # 1000 steps = no respacing


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


def test_compiled_and_eager_models_agree():
    model = randomize(tiny(depth=2))
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])
    assert torch.allclose(torch.compile(model)(x, t, y), model(x, t, y), atol=1e-5)


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


# ====================================================================================================
# Fault tolerance and hostile input: kills, crashes mid-write, corrupt files, bad data, NaNs, dead ranks

SRA = os.path.join(HERE, "sra.py")
# A 6-block model on 16 px images, 2 x 2 tokens: ~0.1 s per step on one CPU thread.
TINY = ["--model", "SiT-T/8", "--resolution", "16", "--batch-size", "2", "--num-workers", "0",
        "--sample-steps", "0", "--log-every", "1"]
# One thread per process: the runs of a test compare bit for bit, and the tests share two cores.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE)


# ----------------------------------------------------------------------------------------------------
# Helpers

def train(tmp_path, *flags, exp="run", timeout=180, base=TINY):
    """Run sra.py to completion in tmp_path; returns the CompletedProcess (text stdout/stderr)."""
    cmd = [sys.executable, SRA, *base, "--output-dir", str(tmp_path), "--exp-name", exp, *flags]
    return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=timeout)


def start(tmp_path, *flags, exp="run"):
    """Start sra.py in the background, output to files (a pipe nobody reads could fill and block it)."""
    cmd = [sys.executable, SRA, *TINY, "--output-dir", str(tmp_path), "--exp-name", exp, *flags]
    out = open(tmp_path / f"{exp}.out", "w")
    return subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=out, stderr=subprocess.STDOUT)


def read(path):
    """File contents, or '' if it does not exist yet."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return ""


def wait_for(condition, what, timeout=120, proc=None):
    """Poll `condition` every 20 ms; fail if it times out or `proc` exits first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited (status {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def stop(proc):
    """Kill a process this test started (by its pid) if it is still running, and reap it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def ckpt_path(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_identical(a, b, where="checkpoint"):
    """Every tensor equal bit for bit (torch.equal), every other leaf equal, same structure."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), f"{where}: tensors differ"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_training_state(path_a, path_b):
    """Model, EMA, optimizer, loss scaler, RNG streams and step agree exactly (args may differ: --resume)."""
    a, b = load(path_a), load(path_b)
    for key in ("model", "ema", "opt", "scaler", "rng", "step"):
        assert_identical(a[key], b[key], key)


def one_line_error(proc, *names):
    """The run failed with exit 2 and exactly one stderr line `error: ...` naming every one of `names`."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr:\n{proc.stderr[-3000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"not one error line:\n{proc.stderr[-3000:]}"
    for name in names:
        assert str(name) in lines[0], f"{name} not named in: {lines[0]}"
    return lines[0]


STEPS = 10  # length of the reference run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of STEPS steps with a checkpoint every 2 steps: the run folder."""
    root = tmp_path_factory.mktemp("reference")
    proc = train(root, "--max-train-steps", str(STEPS), "--checkpoint-steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return os.path.join(root, "run")


# ----------------------------------------------------------------------------------------------------
# 1. Kill and resume

def test_sigkill_then_sigterm_then_resume_auto_is_bit_identical(tmp_path, reference):
    """A run killed with SIGKILL (after step 3, wherever that lands), resumed, stopped with SIGTERM, resumed
    again: it ends bit-identical to the uninterrupted reference run. On SIGTERM the trainer finishes the step,
    writes a checkpoint at that step, says so in log.txt and exits cleanly (status 0)."""
    run_dir, log_path = tmp_path / "run", tmp_path / "run" / "log.txt"
    proc = start(tmp_path, "--max-train-steps", "1000", "--checkpoint-steps", "2")
    try:
        wait_for(lambda: "step 3/" in read(log_path), "step 3", proc=proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == -signal.SIGKILL and "done:" not in read(log_path)
    killed_at = max(int(os.path.basename(p)[:-3]) for p in sra.list_checkpoints(run_dir))

    # --checkpoint-steps 1000: the only new checkpoint of this leg is the one SIGTERM writes.
    proc = start(tmp_path, "--max-train-steps", "1000", "--checkpoint-steps", "1000", "--resume", "auto")
    resumed = f"resumed from {ckpt_path(run_dir, killed_at)} at step {killed_at}"
    try:
        wait_for(lambda: f"step {killed_at + 1}/" in read(log_path).partition(resumed)[2],
                 "a step after resuming", proc=proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)  # finishes the current step, saves and exits by itself
    finally:
        stop(proc)
    assert proc.returncode == 0, read(tmp_path / "run.out")[-3000:]
    path = sra.list_checkpoints(run_dir)[0]
    step = sra.load_checkpoint(path)["step"]
    assert path == ckpt_path(run_dir, step) and killed_at < step < STEPS
    assert f"received SIGTERM: checkpoint {path} written at step {step}" in read(log_path)

    proc = train(tmp_path, "--max-train-steps", str(STEPS), "--checkpoint-steps", "1000", "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"resumed from {path} at step {step}" in read(log_path)
    assert_same_training_state(ckpt_path(run_dir, STEPS), ckpt_path(reference, STEPS))


# ----------------------------------------------------------------------------------------------------
# 2. Crash during a checkpoint write, corrupt checkpoints

DIE_MID_WRITE = r"""
import io, os, signal, sys, torch
import sra
real_save = torch.save
def save_half_then_die(obj, f):  # the kernel kills us half-way through writing the file
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    f.write(data[:len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save_half_then_die
new = {"model": {"w": torch.ones(100_000)}, "ema": {}, "opt": {}, "step": 9, "args": {}}
sra.atomic_save(new, sys.argv[1])
"""


def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    """A process killed while atomic_save writes leaves the old file intact; the half file is never used."""
    os.makedirs(tmp_path / "checkpoints")
    path = ckpt_path(tmp_path, 4)
    old = {"model": {"w": torch.arange(10.0)}, "ema": {}, "opt": {}, "step": 4, "args": {}}
    sra.atomic_save(old, path)
    proc = subprocess.run([sys.executable, "-c", DIE_MID_WRITE, path], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert_identical(sra.load_checkpoint(path), old)  # the previous checkpoint: intact and loadable
    assert os.path.exists(path + ".tmp"), "the simulated crash did not leave a half-written file"
    assert sra.list_checkpoints(tmp_path) == [path]
    messages = []
    assert sra.find_resume_checkpoint(tmp_path, messages.append)[0] == path
    assert messages == []


def test_resume_auto_falls_back_past_corrupt_checkpoints_and_ignores_tmp(tmp_path, reference):
    """Truncated and garbage checkpoints are named in the log and skipped, a *.pt.tmp is never a candidate,
    and --keep-last never deletes the fresh checkpoint in favour of a newer unreadable one."""
    run_dir = tmp_path / "run"
    os.makedirs(run_dir / "checkpoints")
    shutil.copy(ckpt_path(reference, 2), ckpt_path(run_dir, 2))
    with open(ckpt_path(reference, 8), "rb") as src:
        start_of_file = src.read(1 << 20)
    for name in ("0000004.pt", "0000008.pt", "0000009.pt.tmp"):  # truncated: a full disk, a killed copy/write
        (run_dir / "checkpoints" / name).write_bytes(start_of_file)
    (run_dir / "checkpoints" / "0000003.pt").write_bytes(os.urandom(4096))  # garbage

    proc = train(tmp_path, "--max-train-steps", "6", "--checkpoint-steps", "2", "--keep-last", "1",
                 "--resume", "auto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = read(run_dir / "log.txt")
    for step in (8, 4, 3):
        assert f"warning: {ckpt_path(run_dir, step)} is not a loadable checkpoint" in log
    assert "trying an older checkpoint" in log
    assert f"resumed from {ckpt_path(run_dir, 2)} at step 2" in log
    assert ".tmp" not in log
    assert_same_training_state(ckpt_path(run_dir, 6), ckpt_path(reference, 6))
    messages = []  # the next --resume auto finds the new checkpoint, past the unreadable 0000008.pt
    assert sra.find_resume_checkpoint(run_dir, messages.append)[0] == ckpt_path(run_dir, 6)


# ----------------------------------------------------------------------------------------------------
# 3. --keep-last / --keep-every

CHECK_PRUNE_ORDER = r"""
import glob, os, sys
import sra
real_prune, calls = sra.prune_checkpoints, []
def checked_prune(run_dir, *args, **kwargs):  # called right after checkpoint number len(calls) + 1
    calls.append(1)
    newest = sra.list_checkpoints(run_dir)
    assert newest and newest[0].endswith(f"{len(calls):07d}.pt"), f"pruning before step {len(calls)} is saved"
    assert sra.load_checkpoint(newest[0])["step"] == len(calls), "the new checkpoint is incomplete"
    assert not glob.glob(os.path.join(run_dir, "checkpoints", "*.tmp")), "a write is still in progress"
    return real_prune(run_dir, *args, **kwargs)
sra.prune_checkpoints = checked_prune
sra.main(sra.parse_args(sys.argv[1:]))
assert len(calls) == 5, calls
"""


def test_keep_last_prunes_after_save_and_spares_keep_every(tmp_path):
    """Pruning runs only once the new checkpoint is complete on disk; milestones survive; K newest kept."""
    cmd = [sys.executable, "-c", CHECK_PRUNE_ORDER, *TINY, "--output-dir", str(tmp_path), "--exp-name", "run",
           "--max-train-steps", "5", "--checkpoint-steps", "1", "--keep-last", "1", "--keep-every", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    kept = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "run" / "checkpoints" / "*")))
    assert kept == ["0000002.pt", "0000004.pt", "0000005.pt"]  # milestones 2, 4 and the newest, 5


# ----------------------------------------------------------------------------------------------------
# 4. Untrusted checkpoints

class Evil:
    """Unpickling this calls open(marker, 'w'): code execution, harmless but visible."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path):
    """--resume evil.pt: exit 2 with one line naming the file; the pickle's code never ran."""
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": Evil(str(marker)), "ema": {}, "opt": {}, "step": 0, "args": {}}, evil)
    proc = train(tmp_path, "--max-train-steps", "1", "--resume", str(evil))
    one_line_error(proc, evil)
    assert not marker.exists(), "loading the checkpoint executed code from it"
    torch.load(evil, weights_only=False)["model"].close()  # the control: an unsafe load runs the payload
    assert marker.exists()


def torch_load_calls(path):
    """(line, weights_only value or None) for each torch.load(...) call in a source file."""
    calls = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
            flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
            calls.append((node.lineno, flag.value if isinstance(flag, ast.Constant) else flag))
    return calls


@pytest.mark.parametrize("name", ["sra.py", "sample.py"])
def test_every_torch_load_is_weights_only(name):
    """Every torch.load in sra.py and sample.py passes weights_only=True; no pickle or np allow_pickle."""
    path = os.path.join(HERE, name)
    calls = torch_load_calls(path)
    assert calls, f"no torch.load found in {name}: has the loading moved?"
    assert all(flag is True for _, flag in calls), f"torch.load without weights_only=True in {name}: {calls}"
    source = open(path).read()
    assert "pickle.load" not in source and "allow_pickle=True" not in source


# ----------------------------------------------------------------------------------------------------
# 5. Bad data: one line naming the file, exit 2, at start-up or first touch

def image_folder(root, classes=("a", "b"), per_class=2):
    """root/<class>/<i>.png with small valid images."""
    from PIL import Image
    for c in classes:
        os.makedirs(root / c)
        for i in range(per_class):
            Image.fromarray(np.full((20, 20, 3), 40 * i, dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def latent_folder(root, shape=(8, 4, 4), count=4):
    """root/vae-sd/dataset.json + count .npy moment files (resolution 32 -> 4 x 4 latents)."""
    os.makedirs(root / "vae-sd" / "0")
    labels = []
    for i in range(count):
        moments = np.random.default_rng(i).standard_normal(shape, np.float32)
        np.save(root / "vae-sd" / "0" / f"{i}.npy", moments)
        labels.append([f"0/{i}.npy", i % 2])
    with open(root / "vae-sd" / "dataset.json", "w") as f:
        json.dump({"labels": labels}, f)
    return root


LATENT = ["--model", "SiT-T/4", "--resolution", "32", "--batch-size", "2", "--sample-steps", "0",
          "--log-every", "1"]
IMAGES = ["--model", "SiT-T/8", "--resolution", "16", "--batch-size", "2", "--sample-steps", "0",
          "--log-every", "1"]


def test_corrupt_image_in_a_worker_is_one_line_naming_it(tmp_path):
    """A corrupt image fails where it is read, inside a DataLoader worker (--num-workers 2): one line, exit 2.

    (The main-process path, --num-workers 0, is the same DataError: the latent tests below take it.)"""
    data = image_folder(tmp_path / "data")
    bad = data / "b" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    proc = train(tmp_path, "--data-dir", str(data), "--num-workers", "2", "--max-train-steps", "20",
                 base=IMAGES, timeout=120)
    one_line_error(proc, bad)


def test_empty_class_folder_is_one_line_naming_it(tmp_path):
    data = image_folder(tmp_path / "data")
    os.makedirs(data / "c")
    proc = train(tmp_path, "--data-dir", str(data), "--num-workers", "0", "--max-train-steps", "2",
                 base=IMAGES, timeout=120)
    one_line_error(proc, data / "c")


@pytest.mark.parametrize("fault", ["truncated", "wrong-shape", "missing"])
def test_bad_latent_is_one_line_naming_it(tmp_path, fault):
    """Truncated .npy, wrong-shaped .npy, dataset.json listing a missing file: one line, exit 2."""
    data = latent_folder(tmp_path / "data")
    bad = data / "vae-sd" / "0" / "2.npy"
    if fault == "truncated":
        bad.write_bytes(bad.read_bytes()[:100])
    elif fault == "wrong-shape":
        np.save(bad, np.zeros((8, 8, 8), np.float32))  # a 64 px latent in a 32 px dataset
    else:
        bad.unlink()
    proc = train(tmp_path, "--data-dir", str(data), "--num-workers", "0", "--max-train-steps", "20",
                 base=LATENT, timeout=120)
    one_line_error(proc, bad)


# ----------------------------------------------------------------------------------------------------
# 6. Numerical faults

def test_nan_loss_stops_and_names_last_good_checkpoint(tmp_path):
    """NaN at step 3: exit 2, the message names checkpoint 2, and no NaN model is ever checkpointed."""
    proc = train(tmp_path, "--max-train-steps", "10", "--checkpoint-steps", "2", "--log-every", "100",
                 "--fault-nan-at", "3")
    line = one_line_error(proc, ckpt_path(tmp_path / "run", 2))
    assert "non-finite loss" in line
    assert sra.list_checkpoints(tmp_path / "run") == [ckpt_path(tmp_path / "run", 2)]  # step 4 never saved


FP16_OVERFLOW = r"""
import sys, torch
import sra
class HugeScaler(torch.amp.GradScaler):  # starts at 2^24, so the first fp16 backwards overflow
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "init_scale": 2.0 ** 24})
torch.amp.GradScaler = HugeScaler
sra.main(sra.parse_args(sys.argv[1:]))
"""


def test_fp16_overflow_is_a_counted_skipped_step(tmp_path):
    """fp16 loss-scaler overflows skip the step, are counted in metrics.jsonl, and the run goes on."""
    cmd = [sys.executable, "-c", FP16_OVERFLOW, *TINY, "--output-dir", str(tmp_path), "--exp-name", "run",
           "--mixed-precision", "fp16", "--max-train-steps", "8", "--checkpoint-steps", "1000"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = [json.loads(line) for line in read(tmp_path / "run" / "metrics.jsonl").splitlines()]
    ckpt = sra.load_checkpoint(ckpt_path(tmp_path / "run", 8))
    halvings = round(np.log2(2.0 ** 24 / ckpt["scaler"]["scale"]))  # each overflow halves the scale
    assert 0 < halvings < 8 and metrics[-1]["skipped_steps"] == halvings  # some steps skipped, some taken
    assert metrics[-1]["step"] == 8 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert metrics[0]["skipped_steps"] == 1  # the counter moves at the step that overflowed


# ----------------------------------------------------------------------------------------------------
# 7. Distributed faults: a dead or hung rank ends the run within a bounded time

def children(pid):
    """Pids whose parent is `pid` (from /proc, no psutil)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = open(stat).read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.split("/")[2]))
    return found


def alive(pid):
    """True while `pid` exists and is not a zombie."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


DDP_FLAGS = [*TINY, "--max-train-steps", "1000", "--checkpoint-steps", "1000"]


def test_torchrun_worker_death_ends_the_run(tmp_path):
    """torchrun, 2 gloo ranks, SIGKILL one mid-training: everything exits non-zero within 25 s.

    25 s is below torchrun's 30 s grace between its SIGTERM and SIGKILL to the survivor: the surviving
    trainer must leave by itself (its collective fails), not hang until the launcher kills it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SRA,
           *DDP_FLAGS, "--output-dir", str(tmp_path), "--exp-name", "run"]
    out = open(tmp_path / "torchrun.out", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    workers = []
    try:
        wait_for(lambda: "step 3/" in read(tmp_path / "run" / "log.txt"), "step 3", proc=proc)
        workers = children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGKILL)
        start_time = time.monotonic()
        proc.wait(timeout=25)
        assert time.monotonic() - start_time < 25
        wait_for(lambda: not any(alive(w) for w in workers), "the surviving worker to exit", timeout=10)
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        stop(proc)
    assert proc.returncode != 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_surviving_rank_fails_within_dist_timeout_when_its_peer_hangs(tmp_path):
    """Rank 1 hangs mid-training (SIGSTOP) and no launcher steps in (as with a peer on another node):
    rank 0 must fail after --dist-timeout (5 s here), not wait in a collective for the default 30 minutes.
    (A dead peer, as opposed to a hung one, closes its sockets and gloo fails at once.)"""
    env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               LOCAL_WORLD_SIZE="2")
    cmd = [sys.executable, SRA, *DDP_FLAGS, "--output-dir", str(tmp_path), "--exp-name", "run",
           "--dist-timeout", "5"]
    ranks = [subprocess.Popen(cmd, cwd=tmp_path, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                              stdout=open(tmp_path / f"rank{r}.out", "w"), stderr=subprocess.STDOUT)
             for r in range(2)]
    try:
        wait_for(lambda: "step 3/" in read(tmp_path / "run" / "log.txt"), "step 3", proc=ranks[0])
        ranks[1].send_signal(signal.SIGSTOP)
        start_time = time.monotonic()
        ranks[0].wait(timeout=30)
        elapsed = time.monotonic() - start_time
    finally:
        for proc in ranks:
            stop(proc)
    assert ranks[0].returncode not in (0, None)
    assert elapsed < 30, read(tmp_path / "rank0.out")[-2000:]


# ====================================================================================================
# sample.py: samplers on closed-form toys, CFG, checkpoint layouts, .npz, determinism, resume, errors

M, S = 0.3, 0.5  # toy data: every coordinate ~ N(M, S^2)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: tiny tensors run faster, and a busy CI machine does not make threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------
# Closed-form toys

def gaussian_velocity(path_type, m=M, s=S):
    """Exact v(x, t) = E[d_alpha x0 + d_sigma eps | x_t] for x0 ~ N(m, s^2) per coordinate (SRA time)."""
    def v(x, t):
        alpha, sigma, d_alpha, d_sigma = (float(a) for a in sra.interpolant(torch.tensor(t, dtype=torch.float64),
                                                                          path_type))
        var = alpha ** 2 * s ** 2 + sigma ** 2  # Var(x_t)
        x0 = m + alpha * s ** 2 * (x - alpha * m) / var  # E[x0 | x_t]
        eps = sigma * (x - alpha * m) / var  # E[eps | x_t]
        return d_alpha * x0 + d_sigma * eps
    return v


def gaussian_eps(m=M, s=S, learned_range=None):
    """Exact DDPM eps-predictor E[eps | x_t] for x0 ~ N(m, s^2); optionally a constant learned-range channel."""
    abar = sra.GaussianDiffusion.linear().alphas_cumprod

    def eps(x, step):
        a = abar[step].item()
        out = (1 - a) ** 0.5 * (x - a ** 0.5 * m) / (a * s ** 2 + 1 - a)
        return out if learned_range is None else torch.cat([out, torch.full_like(out, learned_range)], dim=1)
    return eps


def moment_error(x):
    """|mean - M| + |std - S| over all coordinates."""
    return abs(x.mean().item() - M) + abs(x.std().item() - S)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_ode_matches_exact_transport(path_type):
    """Euler/Heun reach x0 = M + S z (the exact ODE map of a Gaussian); Heun beats Euler; errors shrink."""
    z = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = M + S * z.double()
    v = gaussian_velocity(path_type)
    out = {(heun, n): sample.sample_ode(v, z, n, heun=heun) for heun in (False, True) for n in (32, 128)}
    err = {key: (x - exact).abs().max().item() for key, x in out.items()}
    for heun in (False, True):
        assert err[heun, 128] < err[heun, 32] / 3.5
    assert err[True, 32] < err[False, 32] / 3 and err[True, 128] < err[False, 128] / 10
    assert err[True, 128] < 1e-3
    x = out[True, 128]  # mean and std, against those of the exact map of the same z
    assert abs(x.mean() - exact.mean()) < 1e-4 and abs(x.std() - exact.std()) < 1e-4


@pytest.mark.parametrize("path_type", ["linear", "cos"])
def test_sde_reaches_target_distribution(path_type):
    """Euler-Maruyama (SPEC §7) reproduces mean and std of the toy, closer with more steps."""
    z = torch.randn(20_000, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    v = gaussian_velocity(path_type)
    errs = [moment_error(sample.sample_sde(v, z, n, path_type, torch.Generator().manual_seed(2))) for n in (10, 100)]
    assert errs[1] < errs[0] and errs[1] < 0.02, errs


def test_sde_last_step_is_deterministic():
    """Only the first N-1 steps draw noise: with one step the sampler is deterministic, with N it draws N-1."""
    z = torch.randn(8, 1, 2, 2)
    v = gaussian_velocity("linear")
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample.sample_sde(v, z, 1, generator=g), sample.sample_sde(v, z, 1))
    state = g.get_state()
    sample.sample_sde(v, z, 5, generator=g)
    ref = torch.Generator().set_state(state)
    for _ in range(4):
        torch.randn(z.shape, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


@pytest.mark.parametrize("learned_range", [None, 0.0])
def test_ddpm_reaches_target_distribution(learned_range):
    """Ancestral DDPM with an exact eps-predictor reproduces the toy; 1000 steps beat 25 respaced ones."""
    z = torch.randn(5000, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    eps = gaussian_eps(learned_range=learned_range)
    errs = [moment_error(sample.sample_ddpm(eps, z, n, torch.Generator().manual_seed(4))) for n in (25, 1000)]
    assert errs[1] < errs[0] and errs[1] < 0.02, errs


def test_respace_keeps_dit_steps_for_every_count():
    """respace keeps DiT's space_timesteps(1000, [K]) for every K: a float stride (999 / (K - 1)) added up
    step by step, each partial sum rounded; the kept steps keep their alpha-bars."""
    base = sra.GaussianDiffusion.linear()
    for K in range(1, 1001):
        stride = 999 / (K - 1) if K > 1 else 1
        position, want = 0.0, []
        for _ in range(K):
            want.append(round(position))
            position += stride
        respaced = sample.respace(base, K)
        assert respaced.timestep_map.tolist() == want, K
    assert torch.allclose(respaced.alphas_cumprod, base.alphas_cumprod, rtol=1e-12)  # K = 1000: unchanged
    respaced = sample.respace(base, 21)  # one of the counts where round(i * 999 / 20) differs
    assert torch.allclose(respaced.alphas_cumprod, base.alphas_cumprod[respaced.timestep_map], rtol=1e-12)


class SiTRepoToy(torch.nn.Module):
    """The SiT repository's exact velocity of the toy (t = 0 noise, t = 1 data, 2C outputs):
    x = a x0 + s eps with (a, s) = (t, 1 - t) on its Linear path, (sin(pi t/2), cos(pi t/2)) on GVP."""
    in_channels, num_classes, input_size = 1, 4, 4

    def __init__(self, path_type):
        super().__init__()
        self.path_type = path_type
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x, tau, y):
        tau = tau.double().view(-1, 1, 1, 1)
        if self.path_type == "Linear":
            a, s, d_a, d_s = tau, 1 - tau, torch.ones_like(tau), -torch.ones_like(tau)
        else:
            h = math.pi / 2
            a, s, d_a, d_s = torch.sin(h * tau), torch.cos(h * tau), h * torch.cos(h * tau), -h * torch.sin(h * tau)
        var = a ** 2 * S ** 2 + s ** 2
        x0, eps = M + a * S ** 2 * (x - a * M) / var, s * (x - a * M) / var
        return torch.cat([d_a * x0 + d_s * eps, torch.full_like(x, 7.0)], dim=1)  # junk "sigma" channels


@pytest.mark.parametrize("sit_path, path_type", [("Linear", "linear"), ("GVP", "cosine")])
def test_reversed_sit_convention(sit_path, path_type):
    """A SiT-repo field, wrapped, samples right: the ODE reaches the exact transport, and the SDE, whose
    score needs our path, reaches the toy with SiT's Linear read as linear and its GVP as cosine."""
    model = sample.ReversedSiT(SiTRepoToy(sit_path))
    z = torch.randn(4000, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    y = torch.zeros(4000, dtype=torch.long)
    x = sample.generate(model, z[:500], y[:500], mode="ode", num_steps=100, heun=True)
    assert (x - (M + S * z[:500])).abs().max() < 1e-3
    x = sample.generate(model, z, y, mode="sde", num_steps=100, path_type=path_type,
                        generator=torch.Generator().manual_seed(6))
    assert moment_error(x) < 0.02


# ----------------------------------------------------------------------------------------------------
# Tiny networks and checkpoints of every layout

def tiny_named(name="SiT-T/4", seed=0, input_size=8, in_channels=3, num_classes=4, **kw):
    """A tiny model with random (non-zero) weights, so that sampling depends on every tensor."""
    torch.manual_seed(seed)
    net = sra.MODELS[name](input_size=input_size, in_channels=in_channels, num_classes=num_classes, **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def backbone(state):
    return {k: v for k, v in state.items() if not k.startswith(("ap_head.", "projectors."))}


def ours_args(**kw):
    """The args entries of an sra.py checkpoint that sample.py reads."""
    return {**dict(model="SiT-T/4", path_type="linear", num_classes=4, resolution=8), **kw}


def sit_repo_args(path_type="Linear", prediction="velocity"):
    """The argparse.Namespace that the SiT repository's train.py stores in its checkpoints."""
    return argparse.Namespace(
        data_path="/data/imagenet/train", results_dir="results", model="SiT-T/4", image_size=64, num_classes=4,
        epochs=1400, global_batch_size=256, global_seed=0, vae="ema", num_workers=4, log_every=100,
        ckpt_every=50_000, sample_every=10_000, cfg_scale=4.0, wandb=False, ckpt=None, path_type=path_type,
        prediction=prediction, loss_weight=None, sample_eps=None, train_eps=None)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoint files of each layout, with the networks they should load into."""
    d = tmp_path_factory.mktemp("ckpts")
    raw, ema = tiny_named(seed=1), tiny_named(seed=2)
    files = {}

    def save(key, obj, expected):
        files[key] = (str(d / f"{key}.pt"), expected)
        torch.save(obj, files[key][0])

    projector = {"ap_head.linear1.weight": torch.randn(384, 192), "ap_head.linear2.weight": torch.randn(192, 384)}
    save("ours", dict(model={**raw.state_dict(), **projector}, ema=ema.state_dict(), opt={}, scaler={},
                      args=ours_args(), step=2, epoch=0, rng=[]), ema)
    projectors = {"projectors.0.0.weight": torch.randn(8, 192)}
    namespace = argparse.Namespace(model="SiT-T/4", path_type="cosine", num_classes=4, resolution=8, encoder_depth=3)
    save("official_sra", dict(model=raw.state_dict(), ema={**raw.state_dict(), **projector}, opt={}, args=namespace,
                              steps=5), raw)
    save("official_repa", dict(model={**raw.state_dict(), **projectors}, ema={**raw.state_dict(), **projectors},
                               opt={}, args=namespace, steps=5), raw)
    save("ema_only", dict(ema=raw.state_dict()), raw)  # e.g. a released file keeping only the EMA
    dit = tiny_named("DiT-T/4", seed=3)
    save("dit_bare", dit.state_dict(), dit)
    sit_raw, sit_ema = tiny_named("SiT-T/4", seed=4, learn_sigma=True), tiny_named("SiT-T/4", seed=6, learn_sigma=True)
    save("sit_bare", sit_ema.state_dict(), sit_ema)
    for key, args in [("sit_repo_linear", sit_repo_args()), ("sit_repo_gvp", sit_repo_args("GVP")),
                      ("sit_repo_vp", sit_repo_args("VP")), ("sit_repo_score", sit_repo_args(prediction="score"))]:
        save(key, dict(model=sit_raw.state_dict(), ema=sit_ema.state_dict(), opt={}, args=args), sit_ema)
    nonull = tiny_named("DiT-T/4", seed=5, class_dropout_prob=0.0)  # no null row: CFG impossible
    save("dit_no_null", dict(model=nonull.state_dict(), ema=nonull.state_dict(), opt={}, step=1,
                             args=ours_args(model="DiT-T/4", cfg_prob=0.0)), nonull)
    save("latent", tiny_named("SiT-T/4", input_size=4, in_channels=4).state_dict(), None)
    save("foreign", {"weights": {"w": torch.ones(2)}, "note": "hello"}, None)
    save("short", {k: v for k, v in dit.state_dict().items() if not k.startswith("blocks.5.")}, None)
    with open(files["dit_bare"][0], "rb") as f:
        files["corrupt"] = (str(d / "corrupt.pt"), None)  # cut short, as by a full disk
        (d / "corrupt.pt").write_bytes(f.read()[:5000])
    return files


LAYOUTS = {  # key -> (--model, expected family, path type, wrapped in ReversedSiT)
    "ours": (None, "SiT", "linear", False),
    "official_sra": ("SiT-T/4", "SiT", "cosine", False),
    "official_repa": (None, "SiT", "cosine", False),
    "ema_only": ("SiT-T/4", "SiT", "linear", False),
    "dit_bare": ("DiT-T/4", "DiT", "linear", False),
    "sit_bare": ("SiT-T/4", "SiT", "linear", True),
    "sit_repo_linear": (None, "SiT", "linear", True),
    "sit_repo_gvp": (None, "SiT", "cosine", True),
}


@pytest.mark.parametrize("key", list(LAYOUTS))
def test_checkpoint_layouts_load_and_sample(key, ckpts, tmp_path):
    """Each layout loads its EMA weights with the right family and time convention, then samples from the
    command line; SiT-repository weights (bare, or its train.py's checkpoints) are used as -f(x, 1 - t)."""
    path, expected = ckpts[key]
    model_name, family, path_type, reverse = LAYOUTS[key]
    model, info = sample.load_model(path, model_name)
    assert (info["family"], info["path_type"], isinstance(model, sample.ReversedSiT)) == (family, path_type, reverse)
    net = model.net if reverse else model
    assert net.num_classes == 4 and net.learn_sigma == expected.learn_sigma and net.input_size == 8
    want = backbone(expected.state_dict())
    assert net.state_dict().keys() == want.keys()
    assert all(torch.equal(net.state_dict()[k], want[k]) for k in want)
    if reverse:  # v(x, t) = -f(x, 1 - t)[:, :C]
        x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([0.2, 0.9]), torch.tensor([0, 3])
        assert torch.allclose(model(x, t, y), -net(x, 1 - t, y)[:, :3])
    argv = ["--ckpt", path, "--grid", "--num-steps", "3", "--sample-dir", str(tmp_path), "--cfg-scale", "1.5"]
    assert sample.cli(argv + (["--model", model_name] if model_name else [])) == 0
    assert len(glob.glob(str(tmp_path / "*-grid.png"))) == 1


def test_big_models_are_built_on_the_meta_device(ckpts, monkeypatch):
    """The meta-device path (no random init) loads the same weights as the CPU path."""
    cpu, _ = sample.load_model(ckpts["dit_bare"][0], "DiT-T/4")
    monkeypatch.setattr(sample, "META_INIT_PARAMS", 0)
    meta, _ = sample.load_model(ckpts["dit_bare"][0], "DiT-T/4")
    assert all(torch.equal(v, meta.state_dict()[k]) for k, v in cpu.state_dict().items())
    assert not meta.pos_embed.requires_grad and meta.pos_embed.device.type == "cpu"


def test_use_raw_model_takes_online_weights(ckpts):
    """Our checkpoints sample the EMA by default; --use-raw-model takes `model`, without the projector."""
    model, _ = sample.load_model(ckpts["ours"][0], use_raw_model=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tiny_named(seed=1).state_dict().items())
    assert not any(k.startswith("ap_head.") for k in model.state_dict())


# ----------------------------------------------------------------------------------------------------
# Classifier-free guidance

def record_calls(model):
    """Log (batch size, t, labels) of every network call through a forward pre-hook."""
    calls = []

    def hook(module, inputs):
        calls.append((len(inputs[0]), inputs[1][0].item(), inputs[2].tolist()))

    model.register_forward_pre_hook(hook)
    return calls


def test_cfg_scale_one_is_no_cfg_and_runs_no_unconditional_pass():
    model = tiny_named()
    calls = record_calls(model)
    z, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 3])
    plain = sample.generate(model, z, y, mode="ode", num_steps=5)
    n_plain = len(calls)
    guided = sample.generate(model, z, y, mode="ode", num_steps=5, cfg_scale=1.0, guidance_low=0.2)
    assert torch.equal(plain, guided)
    assert len(calls) == 2 * n_plain == 10 and all(n == 3 for n, _, _ in calls)


def test_cfg_interval_is_decided_at_each_step_start():
    """Guidance (a doubled batch with the null label = num_classes) only for the steps that start in
    [t_low, t_high]; both Heun evaluations of a step follow its start, as in REPA's sampler, so the steps
    that cross the interval's edges (0.7 -> 0.6 and 0.3 -> 0.2) are each guided or not as a whole."""
    model = tiny_named()
    calls = record_calls(model)
    z, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 3])
    sample.generate(model, z, y, mode="ode", num_steps=10, heun=True, cfg_scale=2.0, guidance_low=0.25,
                    guidance_high=0.65)  # bounds off the time grid
    grid = [1 - i / 10 for i in range(11)]
    expected = [(start, t) for start, t_next in zip(grid[:9], grid[1:]) for t in (start, t_next)] + [(0.1, 0.1)]
    assert len(calls) == len(expected) == 19  # Heun: two calls a step, one on the last step
    for (n, t, labels), (start, t_call) in zip(calls, expected):
        inside = 0.25 <= start <= 0.65
        assert n == (6 if inside else 3) and abs(t - t_call) < 1e-6, (n, t, start)
        assert labels == ([0, 1, 3, 4, 4, 4] if inside else [0, 1, 3])


def test_cfg_formula_on_all_channels_and_ddpm_interval():
    """Guided eps = u + w (c - u) on every data channel; DiT variance channels stay conditional; t = step/1000."""
    model = tiny_named("DiT-T/4")
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 2])
    t = torch.full((2,), 500.0)
    cond, uncond = model(x.float(), t, y).double(), model(x.float(), t, torch.full_like(y, 4)).double()
    out = sample.model_fn(model, y, cfg_scale=3.0, ddpm=True)(x, 500)
    assert torch.allclose(out[:, :3], uncond[:, :3] + 3 * (cond[:, :3] - uncond[:, :3]), atol=1e-5)
    assert torch.allclose(out[:, 3:], cond[:, 3:], atol=1e-6)
    calls = record_calls(model)
    sample.generate(model, x.float(), y, mode="ddpm", num_steps=20, cfg_scale=2.0, guidance_high=0.5)
    assert all((n == 4) == (t <= 500) for n, t, _ in calls)


# ----------------------------------------------------------------------------------------------------
# Random streams, output, determinism, resume

def npz_of(folder):
    """(images, labels) of the single .npz in a sample folder."""
    (path,) = glob.glob(os.path.join(folder, "*.npz"))
    with np.load(path) as data:
        return data["arr_0"], data["arr_1"]


def run_cli(ckpt, out, *extra):
    return sample.cli(["--ckpt", ckpt, "--sample-dir", str(out), "--num-steps", "8", *map(str, extra)])


def test_streams_are_per_sample_and_seeded():
    """Sample i's label and noise come from its own stream: the same in any batch, labels uniform; another
    --global-seed gives other streams (the CPU generator keeps 32 bits of a seed: seed << 32 | i did not);
    one run never repeats a stream."""
    _, y, _ = sample.sample_inputs(range(4000), 0, 4, (1, 1, 1))
    assert abs(np.bincount(y.numpy(), minlength=4) - 1000).max() < 100
    z_sub, y_sub, _ = sample.sample_inputs(range(1000, 1003), 0, 4, (3, 8, 8))
    z_all, y_all, _ = sample.sample_inputs(range(1003), 0, 4, (3, 8, 8))
    assert torch.equal(y_sub, y_all[1000:]) and torch.equal(z_sub, z_all[1000:])
    z_other, _, _ = sample.sample_inputs(range(1003), 1, 4, (3, 8, 8))
    first_values = {tuple(row) for row in z_all[:, 0, 0, :2].tolist()}
    assert not first_values & {tuple(row) for row in z_other[:, 0, 0, :2].tolist()}  # not even shifted
    seeds = [sample.stream_seed(0, i) for i in range(100_000)]
    assert len(set(seeds)) == len(seeds) and max(seeds) < 2 ** 32


def test_npz_format_pngs_and_preview(ckpts, tmp_path, capsys):
    """The ADM .npz (arr_0 uint8 (N, H, W, 3), arr_1 int64 labels), --save-png, a preview grid; the part
    files are gone once the .npz is written, and the log names the .npz's full path."""
    assert run_cli(ckpts["ours"][0], tmp_path, "--num-fid-samples", 10, "--per-proc-batch-size", 4, "--save-png") == 0
    images, labels = npz_of(tmp_path)
    assert images.dtype == np.uint8 and images.shape == (10, 8, 8, 3)
    assert labels.dtype == np.int64 and labels.shape == (10,) and set(labels) <= {0, 1, 2, 3}
    assert images.std() > 0
    (folder,) = [p for p in glob.glob(str(tmp_path / "*")) if os.path.isdir(p)]
    assert os.listdir(folder) == ["png"] and len(glob.glob(os.path.join(folder, "png", "*.png"))) == 10
    assert len(glob.glob(str(tmp_path / "*.png"))) == 1  # the preview grid
    assert f"wrote {glob.glob(str(tmp_path / '*.npz'))[0]}" in capsys.readouterr().out


def test_same_npz_from_two_processes_and_two_batch_sizes(ckpts, tmp_path):
    """Per-sample streams and batches cut at index multiples: 1 or 2 processes give the very same .npz."""
    ckpt = ckpts["ours"][0]
    assert run_cli(ckpt, tmp_path / "one", "--num-fid-samples", 10, "--per-proc-batch-size", 2) == 0
    assert run_cli(ckpt, tmp_path / "b3", "--num-fid-samples", 10, "--per-proc-batch-size", 3) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "sample.py", "--ckpt", ckpt, "--sample-dir", str(tmp_path / "two"), "--num-steps", "8",
                           "--num-fid-samples", "10", "--per-proc-batch-size", "2"],
                          cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two, b3 = npz_of(tmp_path / "one"), npz_of(tmp_path / "two"), npz_of(tmp_path / "b3")
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])
    # Another batch size gives the same noise and labels; CPU matmul kernels are not batch-invariant in the
    # last float bit, so a rare pixel may round to the neighbouring uint8 level.
    assert np.array_equal(one[1], b3[1])
    diff = np.abs(one[0].astype(int) - b3[0])
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


class Interrupted(Exception):
    """Stands for a killed sampling run."""


def test_resume_cleanup_and_rerun(ckpts, tmp_path, capsys, monkeypatch):
    """An interrupted run resumes from its part files, redoing only the missing batches, to the same .npz;
    then the parts go (--keep-parts keeps them), and the same command again redoes nothing."""
    ckpt, flags = ckpts["ours"][0], ("--num-fid-samples", 10, "--per-proc-batch-size", 4)
    assert run_cli(ckpt, tmp_path / "ref", *flags) == 0
    ref = npz_of(tmp_path / "ref")
    save_part = sample.save_part

    def save_one_part_then_die(path, images, labels):
        if glob.glob(os.path.join(os.path.dirname(path), "*.npz")):
            raise Interrupted
        save_part(path, images, labels)

    out = tmp_path / "run"
    monkeypatch.setattr(sample, "save_part", save_one_part_then_die)
    with pytest.raises(Interrupted):
        run_cli(ckpt, out, *flags)
    monkeypatch.undo()
    (parts,) = glob.glob(str(out / "*" / "parts-b4"))
    assert os.listdir(parts) == ["0000000-0000004.npz"] and not glob.glob(str(out / "*.npz"))
    capsys.readouterr()
    assert run_cli(ckpt, out, *flags) == 0
    assert "4 of 10 samples already done; 2 batch(es) to go" in capsys.readouterr().out
    assert all(np.array_equal(a, b) for a, b in zip(ref, npz_of(out)))
    assert not os.path.exists(os.path.dirname(parts))  # the parts and their folder are gone
    (npz,) = glob.glob(str(out / "*.npz"))
    stamp = os.stat(npz).st_mtime_ns
    assert run_cli(ckpt, out, *flags) == 0
    assert f"{npz} already exists" in capsys.readouterr().out and os.stat(npz).st_mtime_ns == stamp
    # --keep-parts: the parts stay; with the .npz and a middle part lost, only that batch is redone
    assert run_cli(ckpt, tmp_path / "kept", *flags, "--keep-parts") == 0
    (parts,) = glob.glob(str(tmp_path / "kept" / "*" / "parts-b4"))
    assert len(os.listdir(parts)) == 3
    os.remove(glob.glob(str(tmp_path / "kept" / "*.npz"))[0])
    os.remove(os.path.join(parts, "0000004-0000008.npz"))
    capsys.readouterr()
    assert run_cli(ckpt, tmp_path / "kept", *flags, "--keep-parts") == 0
    assert "6 of 10 samples already done; 1 batch(es) to go" in capsys.readouterr().out
    assert all(np.array_equal(a, b) for a, b in zip(ref, npz_of(tmp_path / "kept")))


def test_grid_shows_new_samples_of_the_global_seed(ckpts, tmp_path, capsys, monkeypatch):
    """--grid: 8 rows and a column per class (up to 10); its noise comes from the per-sample streams of
    --global-seed, so another seed gives another grid; the log names the PNG's full path."""
    from PIL import Image
    calls = []
    generate = sample.generate

    def spy(model, z, y, **settings):
        calls.append((z, y))
        return generate(model, z, y, **settings)

    monkeypatch.setattr(sample, "generate", spy)
    monkeypatch.chdir(tmp_path)
    grids = []
    for seed in (0, 1):
        argv = ["--ckpt", ckpts["ours"][0], "--grid", "--num-steps", "3", "--sample-dir", "out", "--global-seed",
                str(seed)]
        assert sample.cli(argv) == 0
        path = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("wrote ")
        assert os.path.dirname(path) == str(tmp_path / "out") and path.endswith("-grid.png")
        grids.append(np.asarray(Image.open(path)))
        z, y = calls[-1]
        assert y.tolist() == [0, 1, 2, 3] * 8
        assert torch.equal(z, sample.sample_inputs(range(32), seed, 4, (3, 8, 8))[0])
    assert grids[0].shape == (8 * 8, 4 * 8, 3)
    assert not np.array_equal(grids[0], grids[1])


# ----------------------------------------------------------------------------------------------------
# Bad input: one `error:` line, exit status 2

BAD = {  # name -> (checkpoint key or path, extra flags, expected message)
    "missing": ("/nonexistent/ckpt.pt", [], "does not exist"),
    "foreign": ("foreign", [], "is not a DiT/SiT checkpoint"),
    "text": (os.path.join(HERE, "README.md"), [], "is not a PyTorch checkpoint: torch.save writes a zip archive"),
    "corrupt": ("corrupt", [], "is a damaged PyTorch checkpoint ("),
    "bare_without_model": ("dit_bare", [], "--model"),
    "missing_keys": ("short", ["--model", "DiT-T/4"], "missing: blocks.5."),
    "arch_mismatch": ("sit_bare", ["--model", "SiT-S/4"], "mis-shaped (file vs model): pos_embed (1, 4, 192) vs "
                                                          "(1, 4, 384)"),
    "model_disagrees": ("ours", ["--model", "SiT-B/4"], "holds a SiT-T/4; --model says SiT-B/4"),
    "ema_only_raw": ("ema_only", ["--model", "SiT-T/4", "--use-raw-model"], "drop --use-raw-model"),
    "ema_only_no_model": ("ema_only", [], "unknown architecture"),
    "sit_repo_vp": ("sit_repo_vp", [], "SiT-repository VP velocity model: unsupported"),
    "sit_repo_score": ("sit_repo_score", [], "SiT-repository Linear score model: unsupported"),
    "dit_with_sde": ("dit_bare", ["--model", "DiT-T/4", "--mode", "sde"], "use --mode ddpm"),
    "sit_with_ddpm": ("ours", ["--mode", "ddpm"], "use --mode sde or --mode ode"),
    "ddpm_steps": ("dit_bare", ["--model", "DiT-T/4", "--num-steps", "1001"], "between 1 and 1000"),
    "cfg_without_null_label": ("dit_no_null", ["--cfg-scale", "2"], "no null label"),
    "resolution": ("ours", ["--resolution", "256"], "makes 8px images"),
    "latent_without_diffusers": ("latent", ["--model", "SiT-T/4"], "pip install diffusers"),
    "unwritable_sample_dir": ("ours", ["--sample-dir", "/dev/null/out"], "cannot write to --sample-dir"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_sample_bad_input_is_one_line_and_exit_2(name, ckpts, tmp_path, capsys, monkeypatch):
    """One `error:` line naming the problem, and the checkpoint by its full path, though given relative."""
    for module in ("diffusers", "diffusers.models"):  # as on a machine without diffusers, installed or not
        monkeypatch.setitem(sys.modules, module, None)
    ckpt, extra, message = BAD[name]
    ckpt = os.path.relpath(ckpts[ckpt][0] if ckpt in ckpts else ckpt)
    assert sample.cli(["--ckpt", ckpt, "--grid", "--sample-dir", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    named = [word for word in err.split() if os.path.basename(ckpt) in word]
    assert all(word.startswith(os.path.abspath(ckpt)) for word in named), err


class Malicious:
    """Unpickling this runs a shell command that would create a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_without_running(tmp_path, capsys):
    """Exit 2, one line naming the import, and the payload never ran."""
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": {}, "ema": Malicious(marker)}, path)
    assert sample.cli(["--ckpt", str(path), "--grid", "--sample-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to load") and err.count("\n") == 1 and "system" in err
    assert not marker.exists()


def test_trainer_checkpoint_end_to_end(tmp_path):
    """sra.py trains 2 steps and writes a checkpoint; sample.py --grid reads it."""
    proc = subprocess.run([sys.executable, "sra.py", "--model", "SiT-T/4", "--max-train-steps", "2", "--batch-size",
                           "4", "--num-workers", "0", "--sample-steps", "0", "--resolution", "16", "--output-dir",
                           str(tmp_path / "exps"), "--exp-name", "e2e"], cwd=HERE, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (ckpt,) = glob.glob(str(tmp_path / "exps" / "e2e" / "**" / "*.pt"), recursive=True)
    assert sample.cli(["--ckpt", ckpt, "--grid", "--num-steps", "4", "--sample-dir", str(tmp_path / "s")]) == 0
    assert len(glob.glob(str(tmp_path / "s" / "*-grid.png"))) == 1
