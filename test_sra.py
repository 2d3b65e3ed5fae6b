"""Tests for sra.py, sample.py and the README's figures: CPU only, tiny configs, seeded.

    python -m pytest -q test_sra.py                 # everything (CI): a few minutes on 2 cores
    python -m pytest -q test_sra.py -m "not slow"   # the unit tests: after an edit

Sections follow the files they guard, in their order. Each expected value comes from somewhere
else than the code under test: a closed form, a hand computation, a recording stub, a published
number. `python .ci/mutants.py` reports the one-line slips of the code these tests let through.
"""
import argparse
import ast
import contextlib
import errno
import functools
import glob
import json
import math
import os
import pathlib
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode
from torchvision import datasets

import sample
import sra

# `slow` marks the tests that start processes; `-m "not slow"` leaves them out. The repository
# keeps its top level to five files, so no pytest.ini registers it: this silences pytest's notice.
warnings.filterwarnings("ignore", r"Unknown pytest\.mark\.slow", pytest.PytestUnknownMarkWarning)
slow = pytest.mark.slow


# ==================================================================================================
# Shared helpers and fixtures

HERE = os.path.dirname(os.path.abspath(sra.__file__))
SRA = os.path.join(HERE, "sra.py")
sys.path.insert(0, os.path.join(HERE, "figures"))  # its scripts, which import each other
# One thread per process: the runs of a test compare bit for bit, and the tests share two cores.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE)
# A 6-block, 192-wide model on 16 px images (2 x 2 tokens): tens of milliseconds per step.
TINY = ["--model", "SiT-T/8", "--resolution", "16", "--batch-size", "2", "--num-workers", "0",
        "--log-every", "1"]
# The same on pre-encoded latents of 32 px images (4 x 4 x 4), 2 x 2 tokens
LATENT_FLAGS = ["--model", "SiT-T/2", "--resolution", "32", "--batch-size", "2", "--num-workers",
                "0", "--log-every", "1"]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (faster on tiny tensors); pytest's SIGTERM handler back after sra's."""
    threads = torch.get_num_threads()
    handler = signal.getsignal(signal.SIGTERM)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    signal.signal(signal.SIGTERM, handler)
    sra.STOP_REQUESTED.clear()


@pytest.fixture
def small(monkeypatch):
    """In-process runs not compared with a subprocess: a 4-block, 32-wide T (blocks 1, 4 exist)."""
    monkeypatch.setitem(sra.SIZES, "T", (4, 32, 2))


def tiny(**kw):
    """A 4-block, 64-wide model on 8x8x3 inputs with 4 classes."""
    cfg = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=4, num_heads=2,
               num_classes=4, learn_sigma=False)
    cfg.update(kw)
    return sra.DiT(**cfg)


def randomize(model, seed=0):
    """Give the zero-initialised layers random values so that outputs are non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def tiny_named(name="SiT-T/4", seed=0, input_size=8, in_channels=3, num_classes=4, **kw):
    """A model of the table, randomized: sampling depends on every tensor."""
    torch.manual_seed(seed)
    net = sra.MODELS[name](input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                           **kw)
    return randomize(net, seed).eval()


def ddpm_tables():
    """DDPM's linear schedule (Ho et al.) in float64: beta, abar, prev, tilde, coef1, coef2."""
    beta = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - beta)
    prev = np.append(1.0, abar[:-1])
    return dict(beta=beta, abar=abar, prev=prev, tilde=beta * (1 - prev) / (1 - abar),
                coef1=beta * np.sqrt(prev) / (1 - abar),
                coef2=(1 - prev) * np.sqrt(1 - beta) / (1 - abar))


def run_main(out, *flags, exp="run", base=TINY):
    """sra.main in this process, on the tiny flags, writing to out/exp; returns the run folder."""
    sra.main(sra.parse_args([*base, "--output-dir", str(out), "--exp-name", exp, *flags]))
    return out / exp


def run_cli(capsys, *flags):
    """sra.cli in this process -> (exit status, the last line on stderr)."""
    status = sra.cli([str(flag) for flag in flags])
    err = capsys.readouterr().err.strip().splitlines()
    return status, err[-1] if err else ""


def train(tmp_path, *flags, exp="run", timeout=180, base=TINY, **popen):
    """Run sra.py to completion in tmp_path; returns the CompletedProcess (text stdout/stderr)."""
    cmd = [sys.executable, SRA, *base, "--output-dir", str(tmp_path), "--exp-name", exp, *flags]
    return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=timeout, **popen)


def start(tmp_path, *flags, exp="run", out="run.out", script=SRA, nproc=0, env=ENV):
    """Start `script` in the background (under torchrun if nproc), output to a file, not a pipe."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *(launcher if nproc else []), str(script), *TINY, "--output-dir",
           str(tmp_path), "--exp-name", exp, *flags]
    return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=open(tmp_path / out, "w"),
                            stderr=subprocess.STDOUT)


def metrics(run_dir):
    """The records of metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def ckpt_path(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")


def steps_saved(run_dir):
    """The steps of the checkpoints in a run folder, ascending (never a .tmp)."""
    return sorted(int(p.name[:-3]) for p in (run_dir / "checkpoints").glob("*.pt"))


def assert_finished(run_dir, steps):
    """Finite losses logged at every step; plain names in the last checkpoint -> it."""
    records = metrics(run_dir)
    assert [m["step"] for m in records] == list(range(1, steps + 1))
    assert all(math.isfinite(m["gen_loss"]) and math.isfinite(m["align_loss"]) for m in records)
    ckpt = load(ckpt_path(run_dir, steps))
    for part in ("model", "ema"):
        assert "pos_embed" in ckpt[part] and "blocks.0.attn.qkv.weight" in ckpt[part]
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt[part])
    return ckpt


def assert_same_training_state(path_a, path_b):
    """Model, EMA, optimizer, loss scaler, random streams and step agree bit for bit."""
    a, b = load(path_a), load(path_b)
    for key in ("model", "ema", "opt", "scaler", "rng", "step"):
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def read(path):
    """File contents, or '' if it cannot be read (not written yet, a process gone)."""
    with contextlib.suppress(OSError):
        return pathlib.Path(path).read_text()
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


def stop(proc, *pids):
    """Kill and reap a process this test started, and SIGKILL any of `pids` still alive."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def children(pid):
    """The pids whose parent is `pid` (from /proc)."""
    return [int(c) for f in glob.glob(f"/proc/{pid}/task/*/children") for c in read(f).split()]


def job_pids(pid):
    """`pid` and all its descendants: every process of a job, as SLURM signals them."""
    return [pid] + [p for child in children(pid) for p in job_pids(child)]


def alive(pid):
    """True while `pid` exists and is not a zombie."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def one_line_naming(line, *names):
    """`line` is one line without a traceback that names every one of `names`."""
    assert line and "\n" not in line and "Traceback" not in line, repr(line)
    for name in names:
        assert str(name) in line, f"{name} not named in: {line}"


def make_image_folder(root, classes=("dog", "cat"), per_class=4):
    """root/<class>/<i>.png, random 40x60 RGB images; returns root."""
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


@pytest.fixture
def latents(tmp_path):
    """root/vae-sd/dataset.json, six (1, 8, 4, 4) fp16 moments 00/<i>.npy (32 px), labels i % 3."""
    root, rng = tmp_path / "latents", np.random.default_rng(0)
    (root / "vae-sd" / "00").mkdir(parents=True)
    labels = []
    for i in range(6):
        np.save(root / "vae-sd" / "00" / f"{i}.npy",
                rng.standard_normal((1, 8, 4, 4)).astype(np.float16))
        labels.append([f"00/{i}.npy", i % 3])
    (root / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


def limit_file_size(limit=1 << 20):
    """preexec_fn: a write past `limit` bytes fails with EFBIG (SIGXFSZ ignored): a full disk."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def sra_args(family="SiT", **kw):
    """Parsed default flags of a T model, with attributes overridden."""
    args = sra.parse_args(["--model", f"{family}-T/2"])
    for k, v in kw.items():
        setattr(args, k, v)
    return args


class RecordingNet:
    """Student and teacher of training_losses: records its inputs; outputs tanh(x)."""

    def __init__(self, out_channels=3):
        self.num_classes = 4
        self.out_channels = out_channels
        self.calls = {}

    def __call__(self, x, t, y, block_out_s=None):
        self.calls["student"] = dict(x=x, t=t, y=y, block=block_out_s, grad=torch.is_grad_enabled())
        out = torch.tanh(x).repeat(1, self.out_channels // x.shape[1], 1, 1)
        return out if block_out_s is None else (out, torch.ones(len(x), 2, 3))

    def forward_features(self, x, t, y, depth):
        self.calls["teacher"] = dict(x=x, t=t, y=y, block=depth, grad=torch.is_grad_enabled())
        return torch.ones(len(x), 2, 3)


def tanh_cdf(x):
    """DiT's tanh approximation of the standard normal CDF (GELU's, Hendrycks and Gimpel)."""
    return 0.5 * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


# ==================================================================================================
# sra.py, 1. Embedders: timesteps, positions
# (the [cos, sin] timestep embedding is pinned by the reference forward of section 2)

def test_positional_embedding_formula():
    """MAE's 2D sin-cos table: the column w, then the row h."""
    D = 16
    model = tiny(hidden_size=D)  # 4 x 4 tokens
    assert not model.pos_embed.requires_grad
    for k in range(16):
        h, w = divmod(k, 4)
        for i in range(D // 4):
            omega = 10000 ** (-i / (D / 4))
            expected = [math.sin(w * omega), math.cos(w * omega),  # the column, then
                        math.sin(h * omega), math.cos(h * omega)]  # the row
            assert model.pos_embed[0, k, i::D // 4].tolist() == pytest.approx(expected, abs=1e-6)


# ==================================================================================================
# sra.py, 2. The transformer: attention, adaLN-Zero block, final layer, the model table

def linear(P, name, v):
    """v through the Linear layer `name` of the state dict P."""
    return v @ P[f"{name}.weight"].T + P[f"{name}.bias"]


def layer_norm(v):
    """LayerNorm over the last axis without affine parameters, eps 1e-6 (DiT's)."""
    variance = v.var(-1, unbiased=False, keepdim=True)
    return (v - v.mean(-1, keepdim=True)) / torch.sqrt(variance + 1e-6)


def reference_block(P, b, x, c, heads):
    """One adaLN-Zero block op by op (DiT's models.py), naive softmax attention."""
    N, T, D = x.shape
    mod = linear(P, f"{b}.adaLN_modulation.1", F.silu(c))[:, None]  # (N, 1, 6D)
    shift1, scale1, gate1, shift2, scale2, gate2 = [mod[..., k * D:(k + 1) * D] for k in range(6)]
    a = layer_norm(x) * (1 + scale1) + shift1
    q, k, v = linear(P, f"{b}.attn.qkv", a).reshape(N, T, 3, heads, D // heads).unbind(2)
    scores = torch.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(D // heads)
    attended = torch.einsum("nhqk,nkhd->nqhd", scores.softmax(-1), v).reshape(N, T, D)
    x = x + gate1 * linear(P, f"{b}.attn.proj", attended)
    m = linear(P, f"{b}.mlp.fc1", layer_norm(x) * (1 + scale2) + shift2)
    return x + gate2 * linear(P, f"{b}.mlp.fc2", m * tanh_cdf(m))  # GELU, tanh approximation


def reference_final(P, x, c):
    """DiT's final layer: the modulated LayerNorm, then the Linear -> (N, T, p p C_out)."""
    shift, scale = linear(P, "final_layer.adaLN_modulation.1", F.silu(c))[:, None].chunk(2, -1)
    return linear(P, "final_layer.linear", layer_norm(x) * (1 + scale) + shift)


def reference_forward(model, x, t, y):
    """DiT's forward op by op in float64 -> (output, the state after each block)."""
    P = {k: v.double() for k, v in model.state_dict().items()}
    x, t = x.double(), t.double()
    N, C, H, W = x.shape
    p, D, heads = model.patch_size, model.hidden_size, model.blocks[0].attn.num_heads
    h, w = H // p, W // p
    # patch (i, j) is token i * w + j, its pixels flattened as (C, p, p) like the conv's weight
    patches = x.reshape(N, C, h, p, w, p).permute(0, 2, 4, 1, 3, 5).reshape(N, h * w, C * p * p)
    tokens = patches @ P["x_embedder.proj.weight"].reshape(D, -1).T + P["x_embedder.proj.bias"]
    tokens = tokens + P["pos_embed"]
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    angles = t[:, None] * freqs
    t_emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # cos first
    t_emb = linear(P, "t_embedder.mlp.2", F.silu(linear(P, "t_embedder.mlp.0", t_emb)))
    c = t_emb + P["y_embedder.embedding_table.weight"][y]
    hidden = []
    for i in range(len(model.blocks)):
        tokens = reference_block(P, f"blocks.{i}", tokens, c, heads)
        hidden.append(tokens)
    out = reference_final(P, tokens, c).reshape(N, h, w, p, p, -1)  # token (i, j): its p p C_out
    return out.permute(0, 5, 1, 3, 2, 4).reshape(N, -1, H, W), hidden


def test_block_and_final_layer_match_a_reference():
    """Float64; chunk order, gates, eps 1e-6, tanh GELU, heads."""
    torch.manual_seed(0)
    P = {}
    block = sra.Block(32, num_heads=4).double()
    final = sra.FinalLayer(32, 2, 3).double()
    with torch.no_grad():
        for prefix, module in (("b", block), ("final_layer", final)):
            for name, param in module.named_parameters():
                P[f"{prefix}.{name}"] = param.copy_(torch.randn_like(param) * 0.3).clone()
    c = torch.randn(2, 32, dtype=torch.float64)
    for spread in (1.0, 1e-3):  # 1e-3: LayerNorm's eps matters
        x = torch.randn(2, 16, 32, dtype=torch.float64) * spread
        assert torch.allclose(block(x, c), reference_block(P, "b", x, c, 4), atol=1e-12, rtol=1e-10)
        assert torch.allclose(final(x, c), reference_final(P, x, c), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("size, patch, channels, classes, learn_sigma",
                         [(8, 2, 3, 4, False), (12, 4, 1, 7, True), (16, 8, 5, 1, False)])
def test_forward_matches_a_reference(size, patch, channels, classes, learn_sigma):
    """Student: projected state after block s; teacher: raw, after its block."""
    model = randomize(tiny(input_size=size, patch_size=patch, in_channels=channels,
                           num_classes=classes, learn_sigma=learn_sigma, projector=True), seed=3)
    x = torch.randn(3, channels, size, size)
    t = torch.tensor([0.1, 0.5, 0.93])
    y = torch.tensor([0, classes - 1, classes])  # the null class is `classes`
    expected, hidden = reference_forward(model, x, t, y)
    out, student = model(x, t, y, block_out_s=2)
    assert out.shape == (3, channels * (1 + learn_sigma), size, size)
    scale = expected.abs().max()
    assert scale > 0.1 and (out.double() - expected).abs().max() < 1e-5 * scale
    assert torch.allclose(student, model.ap_head(hidden[1].float()), atol=1e-5)
    for depth in (1, 3):
        teacher = model.forward_features(x, t, y, depth).double()
        assert torch.allclose(teacher, hidden[depth - 1], atol=1e-5)


def test_initialisation_is_dits_and_a_fresh_model_outputs_zero():
    """Xavier-uniform, zero biases, N(0, 0.02) embeddings, adaLN zeroed."""
    torch.manual_seed(0)
    model = sra.MODELS["DiT-S/4"](input_size=16, in_channels=4, num_classes=10, projector=True)
    zeroed = {"final_layer.linear", "final_layer.adaLN_modulation.1"}
    zeroed |= {f"blocks.{i}.adaLN_modulation.1" for i in range(12)}
    normal = {"t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.embedding_table"}
    layers = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)
    for name, module in model.named_modules():
        if not isinstance(module, layers):
            continue
        weight = module.weight.flatten(1)  # the conv's (D, C p p): fan_out, fan_in of a Linear
        assert getattr(module, "bias", None) is None or not module.bias.any(), name
        if name in zeroed:
            assert not weight.any(), name
        elif name in normal:
            assert abs(weight.std().item() - 0.02) < 0.002, name
        else:  # U(-b, b), b = sqrt(6 / (fan_in + fan_out)): variance b^2 / 3
            bound = math.sqrt(6 / sum(weight.shape))
            assert weight.abs().max() <= bound, name
            assert abs(weight.var().item() / (bound ** 2 / 3) - 1) < 0.1, name
    out = model(torch.randn(2, 4, 16, 16), torch.tensor([3.0, 700.0]), torch.tensor([1, 10]))
    assert torch.equal(out, torch.zeros(2, 8, 16, 16))


@pytest.mark.parametrize("name", list(sra.MODELS))
def test_every_model_loads_the_released_names_and_shapes_and_counts_the_papers_parameters(name):
    """Strictly, shapes from the paper's sizes; DiT-XL/2: 675,129,632."""
    family, rest = name.split("-")
    # The DiT paper's depth, width and heads; T is the project's 6-block CPU model (README)
    depth, D, heads = {"T": (6, 192, 3), "S": (12, 384, 6), "B": (12, 768, 12),
                       "L": (24, 1024, 16), "XL": (28, 1152, 16)}[rest.split("/")[0]]
    p, C = int(rest.split("/")[1]), 4  # on 32 x 32 x 4 latents, 1000 classes
    C_out = 2 * C if family == "DiT" else C  # DiT learns a variance
    shapes = {"pos_embed": (1, (32 // p) ** 2, D), "x_embedder.proj.weight": (D, C, p, p),
              "x_embedder.proj.bias": (D,), "y_embedder.embedding_table.weight": (1001, D)}
    layers = [("t_embedder.mlp.0", D, 256), ("t_embedder.mlp.2", D, D),
              ("final_layer.linear", p * p * C_out, D),
              ("final_layer.adaLN_modulation.1", 2 * D, D)]
    for i in range(depth):
        layers += [(f"blocks.{i}.attn.qkv", 3 * D, D), (f"blocks.{i}.attn.proj", D, D),
                   (f"blocks.{i}.mlp.fc1", 4 * D, D), (f"blocks.{i}.mlp.fc2", D, 4 * D),
                   (f"blocks.{i}.adaLN_modulation.1", 6 * D, D)]
    projector = [("ap_head.linear1", 2 * D, D), ("ap_head.linear2", D, 2 * D)]
    for extra in ([], projector):
        for layer, rows, columns in layers + extra:
            shapes[f"{layer}.weight"] = (rows, columns)
            shapes[f"{layer}.bias"] = (rows,)
        with torch.device("meta"):
            model = sra.MODELS[name](input_size=32, in_channels=C, num_classes=1000,
                                     projector=bool(extra))
            model.load_state_dict({k: torch.empty(v) for k, v in shapes.items()}, strict=True)
        count = sum(param.numel() for param in model.parameters())
        assert count == sum(math.prod(shape) for shape in shapes.values())
        assert model.blocks[0].attn.num_heads == heads
        assert name != "DiT-XL/2" or extra or count == 675_129_632  # the DiT paper's figure


def test_grad_checkpointing_gives_the_same_gradients(monkeypatch):
    """Every block is recomputed in backward; the gradients agree."""
    model = randomize(tiny())
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])
    checkpoint = mock.Mock(wraps=torch.utils.checkpoint.checkpoint)  # a recording stub
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", checkpoint)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.grad_checkpointing = flag
        model(x, t, y).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    calls = [call.args[0] for call in checkpoint.call_args_list]
    assert calls == list(model.blocks)  # only in the second pass, every block once
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# ==================================================================================================
# sra.py, 3. Objectives: the SiT interpolant and the DDPM of DiT

@pytest.mark.parametrize("path", ["linear", "cosine", "cos"])
def test_interpolant_closed_forms_derivatives_and_lognormal_times(path):
    """Linear and cosine (`cos` in the official code) paths; finite differences; --weighting
    lognormal: t = s / (1 + s) (linear), (2 / pi) atan(s) (cosine), s = e^n, n ~ N(0, 1)."""
    t = torch.linspace(0, 1, 21, dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = sra.interpolant(t, path)
    expected = (1 - t, t) if path == "linear" else (torch.cos(math.pi / 2 * t),
                                                     torch.sin(math.pi / 2 * t))
    assert torch.allclose(alpha, expected[0]) and torch.allclose(sigma, expected[1])
    h = 1e-6
    a_plus, s_plus, _, _ = sra.interpolant(t + h, path)
    a_minus, s_minus, _, _ = sra.interpolant(t - h, path)
    assert torch.allclose(d_alpha, (a_plus - a_minus) / (2 * h), atol=1e-6)
    assert torch.allclose(d_sigma, (s_plus - s_minus) / (2 * h), atol=1e-6)
    net = RecordingNet()  # the student's times
    x, y = torch.randn(20_000, 3, 1, 1), torch.randint(0, 4, (20_000,))
    sra.training_losses(net, net, x, y, sra_args(weighting="lognormal", path_type=path), None,
                        torch.Generator().manual_seed(0))
    t = net.calls["student"]["t"].double()
    n = torch.log(t / (1 - t) if path == "linear" else torch.tan(math.pi / 2 * t))
    assert abs(n.mean().item()) < 0.03 and abs(n.std().item() - 1) < 0.03


def dit_by_hand(out, x0, xt, t, noise):
    """DiT's p(x_{t-1} | x_t) and loss per sample from the DDPM papers' definitions, in float64 ->
    (x0 from eps, the posterior mean at it, the learned-range log variance frac log beta +
    (1 - frac) log beta tilde with frac = (v + 1) / 2, MSE(eps) + L_vb in bits: the KL to the true
    posterior, or at t = 0 the decoder's -log mass of x0's bin of width 2/255, outer bins open)."""
    tab = {k: torch.from_numpy(v)[t].view(-1, 1, 1, 1) for k, v in ddpm_tables().items()}
    # beta tilde is 0 at t = 0: the log variance takes the one at t = 1 there
    tilde = torch.from_numpy(ddpm_tables()["tilde"])[t.clamp(min=1)].view(-1, 1, 1, 1)
    C = x0.shape[1]
    eps = out[:, :C]
    frac = (out[:, C:] + 1) / 2
    x0_hat = (xt - (1 - tab["abar"]).sqrt() * eps) / tab["abar"].sqrt()
    mean = tab["coef1"] * x0_hat + tab["coef2"] * xt
    log_var = frac * tab["beta"].log() + (1 - frac) * tilde.log()
    true_mean = tab["coef1"] * x0 + tab["coef2"] * xt
    # KL(N(m1, v1) || N(m2, v2)) = (log v2 - log v1 + v1 / v2 + (m1 - m2)^2 / v2 - 1) / 2
    kl = 0.5 * (log_var - tilde.log() + (tilde + (true_mean - mean) ** 2) / log_var.exp() - 1)
    sigma = torch.exp(0.5 * log_var)
    upper = tanh_cdf((x0 + 1 / 255 - mean) / sigma)
    lower = tanh_cdf((x0 - 1 / 255 - mean) / sigma)
    mass = torch.where(x0 < -0.999, upper, torch.where(x0 > 0.999, 1 - lower, upper - lower))
    vb = torch.where(t.view(-1, 1, 1, 1) == 0, -mass.log(), kl) / math.log(2)
    return x0_hat, mean, log_var, ((noise - eps) ** 2 + vb).flatten(1).mean(1)


def test_ddpm_tables_posterior_and_loss_against_closed_forms():
    """Tables, q_sample, posterior, loss (L_vb on a detached eps), DiT's CDF."""
    d, tab = sra.GaussianDiffusion.linear(num_timesteps=1000, device="cpu"), ddpm_tables()
    assert d.betas.dtype == torch.float64
    assert np.allclose(d.alphas_cumprod.numpy(), tab["abar"], rtol=1e-12)
    assert np.allclose(d.posterior_variance.numpy(), tab["tilde"], rtol=1e-12)
    clipped = np.log(np.append(tab["tilde"][1], tab["tilde"][1:]))
    assert np.allclose(d.posterior_log_variance_clipped.numpy(), clipped, rtol=1e-12)
    # 250 steps scale beta by 4; every table follows betas to its device
    assert sra.GaussianDiffusion.linear(250).betas[-1].item() == pytest.approx(0.08)
    on_meta = sra.GaussianDiffusion.linear(device="meta")
    tables = [v for v in vars(on_meta).values() if isinstance(v, torch.Tensor)]
    assert len(tables) >= 6 and all(v.device.type == "meta" for v in tables)
    x = torch.linspace(-6, 6, 20001, dtype=torch.float64)
    exact = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    assert (sra.approx_standard_normal_cdf(x) - exact).abs().max() < 2e-4
    torch.manual_seed(1)
    t = torch.tensor([0, 0, 1, 3, 250, 998, 999])
    x0 = torch.randint(0, 256, (7, 2, 2, 2)).double() / 127.5 - 1  # on the 8-bit grid
    x0[:2, 0, 0] = torch.tensor([-1.0, 1.0])  # the outer bins, open to -inf and +inf
    noise = torch.randn_like(x0)
    eps = noise + 0.3 * torch.randn_like(x0)
    out = torch.cat([eps, torch.rand_like(x0) * 2 - 1], 1).requires_grad_()
    xt = d.q_sample(x0, t, noise)
    abar = torch.from_numpy(tab["abar"])[t].view(-1, 1, 1, 1)
    assert torch.allclose(xt, abar.sqrt() * x0 + (1 - abar).sqrt() * noise, atol=1e-12)
    x0_hat, mean, log_var, loss = dit_by_hand(out.detach(), x0, xt, t, noise)
    for got, want in zip(d.p_mean_variance(out, xt, t), (mean, log_var, x0_hat)):
        assert torch.allclose(got, want, atol=1e-10)
    got = d.training_losses(out, x0, xt, t, noise)
    assert torch.allclose(got, loss, rtol=1e-9)
    got.sum().backward()  # eps's gradient is the MSE's alone: 2 (eps - noise) / 8
    assert torch.allclose(out.grad[:, :2], (eps - noise) / 4)
    assert out.grad[:, 2:].abs().sum() > 0


# ==================================================================================================
# sra.py, 4. The SRA term: the teacher's inputs, the alignment loss, lambda, the EMA

@pytest.mark.parametrize("family", ["SiT", "DiT"])
def test_training_batch_draws_and_denoising_loss(family):
    """20,000 draws: labels dropped at rate cfg_prob; the teacher at clamp(t - t_max u, 0, 1) or
    clamp(t - j, 1, 999), j in [0, 1000 t_max) (DiT's official code), with the student's image
    and noise (drawn after the dropout), under no_grad; the loss: MSE to the velocity, or DiT's."""
    N = 20_000
    net = RecordingNet(out_channels=6 if family == "DiT" else 3)
    args = sra_args(family, cfg_prob=0.15, t_max=0.3, path_type="cosine", block_out_s=2,
                    block_out_t=5)
    torch.manual_seed(0)
    # float64 images, so x_t and the loss are float64 (DiT's t = 0 term is ill-conditioned in tails)
    x, y = torch.randn(N, 3, 1, 2, dtype=torch.float64), torch.randint(0, 4, (N,))
    diffusion = sra.GaussianDiffusion.linear() if family == "DiT" else None
    denoise, _, _ = sra.training_losses(net, net, x, y, args, diffusion,
                                        torch.Generator().manual_seed(0))
    replay = torch.Generator().manual_seed(0)
    torch.rand(N, generator=replay)  # the label dropout
    eps = torch.randn(x.shape, generator=replay).double()
    s, te = net.calls["student"], net.calls["teacher"]
    assert (s["block"], te["block"], s["grad"], te["grad"]) == (2, 5, True, False)
    dropped = s["y"] == 4  # the null class is num_classes
    assert abs(dropped.float().mean().item() - 0.15) < 0.01
    assert torch.equal(s["y"][~dropped], y[~dropped]) and torch.equal(te["y"], s["y"])
    ts, tt = s["t"].double(), te["t"].double()
    offset = ts - tt
    if family == "SiT":
        assert ts.min() >= 0 and ts.max() < 1 and abs(ts.mean().item() - 0.5) < 0.01
        assert abs(ts.var().item() - 1 / 12) < 0.002
        assert tt.min() == 0 and (offset >= 0).all() and (offset <= 0.3 + 1e-6).all()
        free = ts > 0.3  # never clamped: the offset is U(0, t_max)
        assert abs(offset[free].mean().item() - 0.15) < 0.003 and offset[free].max() > 0.299
        alpha, sigma = torch.cos(math.pi / 2 * ts), torch.sin(math.pi / 2 * ts)
        alpha_t, sigma_t = torch.cos(math.pi / 2 * tt), torch.sin(math.pi / 2 * tt)
    else:
        assert (ts.min(), ts.max()) == (0, 999) and abs(ts.mean().item() - 499.5) < 5
        assert tt.min() == 1 and (tt[ts == 0] == 1).all()  # clamped at step 1
        free = ts >= 300
        assert offset[free].min() == 0 and offset[free].max() == 299
        assert abs(offset[free].mean().item() - 149.5) < 3
        abar = torch.from_numpy(ddpm_tables()["abar"])
        alpha, sigma = abar[s["t"]].sqrt(), (1 - abar[s["t"]]).sqrt()
        alpha_t, sigma_t = abar[te["t"]].sqrt(), (1 - abar[te["t"]]).sqrt()
    view = (-1, 1, 1, 1)
    xs = s["x"]
    assert torch.allclose(xs, alpha.view(view) * x + sigma.view(view) * eps, atol=1e-6)
    teacher_x = alpha_t.view(view) * x + sigma_t.view(view) * eps
    assert torch.allclose(te["x"], teacher_x, atol=1e-6)
    output = torch.tanh(xs).repeat(1, net.out_channels // 3, 1, 1)  # what the stub returned
    if family == "SiT":
        velocity = math.pi / 2 * (-sigma.view(view) * x + alpha.view(view) * eps)
        expected = ((output - velocity) ** 2).mean()
    else:
        expected = dit_by_hand(output, x, xs, s["t"], eps)[3].mean()
    assert denoise.item() == pytest.approx(expected.item(), rel=1e-4)


def test_no_gradient_reaches_the_teacher_and_teacher_runs_only_its_blocks():
    """No final layer, no later block; --no-sra: no teacher, no projector, align loss 0."""

    def must_not_run(module, inputs):
        """A forward pre-hook on a layer that must not run."""
        raise AssertionError(f"a {type(module).__name__} ran")
    model, ema = randomize(tiny(projector=True)), randomize(tiny(), seed=1)
    for layer in (ema.blocks[2], ema.blocks[3], ema.final_layer):
        layer.register_forward_pre_hook(must_not_run)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    args = sra_args(block_out_s=1, block_out_t=2)
    _, align, _ = sra.training_losses(model, ema, x, y, args, None, torch.Generator())
    align.backward()
    assert all(p.grad is None for p in ema.parameters())
    assert model.ap_head.linear1.weight.grad.abs().sum() > 0  # the projector is trained
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[3].attn.qkv.weight.grad is None  # blocks after s: no alignment gradient
    for layer in (ema.x_embedder, model.ap_head):
        layer.register_forward_pre_hook(must_not_run)
    args.no_sra = True
    assert sra.training_losses(model, ema, x, y, args, None, torch.Generator())[1].item() == 0


def test_alignment_losses_and_the_lambda_schedule():
    """Smooth-L1 (beta 0.05), 1 - cosine per token, in fp32 for fp16 features; lambda decays
    tenfold every decay_steps after decay_start."""
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    for s, t in ((student, teacher), (student.half(), teacher.half())):
        s64, t64 = s.double(), t.double()
        diff = (s64 - t64).abs()
        smooth = torch.where(diff < 0.05, 0.5 * diff ** 2 / 0.05, diff - 0.025).mean()
        per_token = (s64 * t64).sum(-1) / (s64.norm(dim=-1) * t64.norm(dim=-1))  # (2, 5)
        for kind, expected in (("sml1", smooth), ("cos", (1 - per_token).mean())):
            loss, cos = sra.align_loss(s, t, kind)
            assert loss.dtype == torch.float32, kind
            assert loss.item() == pytest.approx(expected.item(), rel=1e-6), kind
            assert cos.item() == pytest.approx(per_token.mean().item(), abs=1e-6)
    big = (300 * student).half()  # 300^2 * 8 > 65504, fp16's largest number
    assert sra.align_loss(big, big, "cos")[0].item() == pytest.approx(0, abs=1e-3)
    # lambda decays tenfold per decay_steps after decay_start; decay_steps 0: constant
    assert sra.align_weight(100, 0.2, 1000, 5000) == 0.2
    assert sra.align_weight(6000, 0.2, 1000, 5000) == pytest.approx(0.02)
    assert sra.align_weight(3500, 0.2, 1000, 5000) == pytest.approx(0.2 * 0.1 ** 0.5)
    assert sra.align_weight(10 ** 7, 0.2, 0, 0) == 0.2


def test_ema_update_formula_and_build_starts_the_ema_as_an_exact_copy():
    """ema <- d ema + (1 - d) model; build()'s EMA: a copy of the backbone, eval, no gradient."""
    torch.manual_seed(0)
    ema_params = [torch.randn(5, 3), torch.randn(7)]
    model_params = [torch.randn(5, 3), torch.randn(7)]
    expected = [0.9 * e + 0.1 * m for e, m in zip(ema_params, model_params)]
    sra.update_ema(ema_params, model_params, decay=0.9)
    assert all(torch.allclose(e, x, atol=1e-7) for e, x in zip(ema_params, expected))
    args = sra.parse_args(TINY)
    sra.build_dataset(args)  # fills in the model's input size, channels and classes
    model, ema, _, _ = sra.build(args, torch.device("cpu"))
    model_state, ema_state = model.state_dict(), ema.state_dict()
    backbone = {k for k in model_state if not k.startswith("ap_head.")}
    assert backbone != set(model_state)  # the student has the projector ...
    assert set(ema_state) == backbone  # ... the EMA has everything else, and no projector
    for k in backbone:
        assert torch.equal(ema_state[k], model_state[k]), k
        assert ema_state[k].data_ptr() != model_state[k].data_ptr()  # a copy, not an alias
    assert not any(p.requires_grad for p in ema.parameters()) and not ema.training
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "pos_embed")


@pytest.mark.parametrize("family", ["SiT", "DiT"])
def test_one_batch_overfit(family):
    """The same batch, noise and times every step."""
    torch.manual_seed(0)
    model = tiny(projector=True, learn_sigma=family == "DiT")
    ema = tiny(learn_sigma=family == "DiT")
    ema.load_state_dict({k: v for k, v in model.state_dict().items()
                         if not k.startswith("ap_head")})
    args = sra_args(family, block_out_s=1, block_out_t=3, cfg_prob=0.0)
    diffusion = sra.GaussianDiffusion.linear() if family == "DiT" else None
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x, y = torch.randn(8, 3, 8, 8) * 0.5, torch.arange(8) % 4
    losses = []
    for _ in range(150):
        denoise, align, _ = sra.training_losses(model, ema, x, y, args, diffusion,
                                                torch.Generator().manual_seed(0))
        (denoise + 0.2 * align).backward()
        opt.step()
        opt.zero_grad()
        losses.append(denoise.item())
    assert losses[-1] < 0.2 * losses[0]  # the same batch, noise and times: memorised


def test_bf16_and_fp32_losses_agree():
    """Within a few percent."""
    torch.manual_seed(0)
    model, ema = randomize(tiny(projector=True)), randomize(tiny(), seed=1)
    x, y = torch.randn(16, 3, 8, 8), torch.arange(16) % 4
    args = sra_args(block_out_s=1, block_out_t=3)
    losses = []
    for enabled in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            denoise, align, _ = sra.training_losses(model, ema, x, y, args, None,
                                                    torch.Generator().manual_seed(0))
        losses.append((denoise.item(), align.item()))
    assert losses[1] == pytest.approx(losses[0], rel=0.05)
    assert losses[0][1] > 0


# ==================================================================================================
# sra.py, 5. Data: built-in shapes, image folders, latents, --encode

def test_builtin_data_is_class_conditional_and_image_folders_use_the_adm_crop(tmp_path):
    """Shapes: 10 classes, (3, R, R) in [-1, 1], the classes different on average. Pixels at
    patch 2: 4,096 tokens accepted. Folders: sorted class names; ADM: box-halve while the short
    side >= 2 R, bicubic to R, centre."""
    ds = sra.ShapesDataset(32)
    x0, y0 = ds[17]
    assert x0.shape == (3, 32, 32) and x0.dtype == torch.float32 and y0 == 7
    assert x0.min() >= -1 and x0.max() <= 1 and x0.std() > 0.1
    assert torch.equal(ds[17][0], x0) and not torch.equal(ds[27][0], x0)
    means = torch.stack([torch.stack([ds[c + 10 * i][0] for i in range(20)]).mean(0)
                         for c in range(10)])
    gaps = torch.cdist(means.flatten(1), means.flatten(1))
    assert gaps[~torch.eye(10, dtype=bool)].min() > 1.0  # classes look different on average
    # pixels at patch 2: 128 px (4,096 tokens) run; 256 px are refused (BAD_INPUT's pixel-tokens)
    sra.build_dataset(sra.parse_args(TINY + ["--model", "SiT-T/2", "--resolution", "128"]))
    root = make_image_folder(tmp_path / "img")
    args = sra.parse_args(TINY + ["--data-dir", str(root)])
    ds = sra.build_dataset(args)
    assert (args.dataset, args.num_classes, args.in_channels, args.input_size) == (
        "folder", 2, 3, 16)
    assert len(ds) == 8 and ds.classes == ["cat", "dog"]
    x, label = ds[5]
    assert label == 1 and x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    # ADM: 60x40 -> box 30x20 (halved while the short side >= 2 x 16), bicubic 24x16, centre
    with Image.open(root / "dog" / "1.png") as image:
        small = image.convert("RGB").resize((30, 20), Image.BOX).resize((24, 16), Image.BICUBIC)
    expected = torch.from_numpy(np.array(small)[:, 4:20]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.allclose(x, expected, atol=1e-6)
    square = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 64, 3), np.uint8))
    halved = np.array(square.resize((32, 16), Image.BOX))  # exactly 2 x 16: one halving, no resize
    assert np.array_equal(sra.center_crop_arr(square, 16), halved[:, 8:24])


def test_prepare_batch_flips_pixels_and_draws_latents_from_the_posterior(latents):
    """Pixels kept or mirrored left-right, half mirrored; latent items are the stored fp16
    moments, and z = (mean + std eps) 0.18215 is drawn afresh."""
    x = torch.arange(3 * 8 * 5, dtype=torch.float32).view(1, 3, 8, 5).repeat(2000, 1, 1, 1)
    out = sra.prepare_batch(x, "folder", torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert (same ^ mirrored).all() and abs(mirrored.float().mean().item() - 0.5) < 0.04
    ds = sra.LatentDataset(str(latents), 32)
    moments, label = ds[4]
    assert moments.shape == (8, 4, 4) and moments.dtype == torch.float16
    assert label == 1 and ds.num_classes == 3
    z = sra.prepare_batch(moments[None].repeat(4000, 1, 1, 1), "latents",
                          torch.Generator().manual_seed(0))
    mean, std = moments.float().chunk(2)
    assert z.shape == (4000, 4, 4, 4)
    assert torch.allclose(z.mean(0), mean * 0.18215, atol=0.015)  # fresh posterior samples
    assert torch.allclose(z.std(0), std.abs() * 0.18215, atol=0.015)


FAKE_DIFFUSERS = r"""
import json, os, time, types
import torch
import torch.nn.functional as F

class AutoencoderKL(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        weight = torch.randn(8, 3, 1, 1, generator=torch.Generator().manual_seed(seed))
        self.weight = torch.nn.Parameter(weight)

    @classmethod
    def from_pretrained(cls, source, **kwargs):
        if not os.path.isfile(os.path.join(source, "config.json")):  # as offline diffusers fails
            raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {source}")
        with open(os.path.join(source, "config.json")) as f:
            return cls(**json.load(f))

    def encode(self, x):
        time.sleep(float(os.environ.get("FAKE_VAE_DELAY", 0)))
        mean, logvar = F.conv2d(F.avg_pool2d(x, 8), self.weight).chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30, 20))
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=mean, std=std))

    def decode(self, z):
        return types.SimpleNamespace(sample=F.interpolate(z[:, :3], scale_factor=8).tanh())
"""


def fake_vae(root, seed=0):
    """root/site/diffusers (the VAE's interface) and root/vae-<seed>/ -> (site, vae)."""
    (root / "site" / "diffusers").mkdir(parents=True, exist_ok=True)
    (root / "site" / "diffusers" / "__init__.py").write_text(FAKE_DIFFUSERS)
    (root / f"vae-{seed}").mkdir()
    (root / f"vae-{seed}" / "config.json").write_text(json.dumps({"seed": seed}))
    return str(root / "site"), str(root / f"vae-{seed}")


@pytest.fixture
def with_fake_vae(tmp_path, monkeypatch):
    """This process imports the stand-in as diffusers; -> its weights folder."""
    site, vae = fake_vae(tmp_path)
    monkeypatch.syspath_prepend(site)
    monkeypatch.delitem(sys.modules, "diffusers", raising=False)
    return vae


def encode_flags(images, out, vae, *extra):
    """sra.py --encode on a 16 px image folder, batches of 3."""
    return ["--encode", str(out), "--data-dir", str(images), "--resolution", "16", "--vae", vae,
            "--batch-size", "3", "--num-workers", "0", *extra]


def test_encode_writes_the_latent_layout_that_trains(tmp_path, with_fake_vae):
    """Posterior mean and std per image; a SiT trains on it, sample.py decodes."""
    images = make_image_folder(tmp_path / "img")
    sra.encode_latents(sra.parse_args(encode_flags(images, tmp_path / "enc", with_fake_vae)))
    root = tmp_path / "enc" / "vae-sd"
    labels = json.loads((root / "dataset.json").read_text())["labels"]
    assert labels == [[f"{c}/{i}.png.npy", k] for k, c in enumerate(["cat", "dog"])
                      for i in range(4)]
    from diffusers import AutoencoderKL
    vae = AutoencoderKL.from_pretrained(with_fake_vae)
    posterior = vae.encode(sra.load_image(images / "dog" / "2.png", 16)[None]).latent_dist
    moments = np.load(root / "dog" / "2.png.npy")
    assert moments.dtype == np.float32 and moments.shape == (8, 2, 2)
    assert np.array_equal(moments,
                          torch.cat([posterior.mean, posterior.std], 1)[0].detach().numpy())
    run_dir = run_main(tmp_path, "--data-dir", str(tmp_path / "enc"), "--resolution", "16",
                       "--max-train-steps", "2", base=LATENT_FLAGS[:2] + LATENT_FLAGS[4:])
    assert "on 4x2x2 inputs" in read(run_dir / "log.txt")
    assert_finished(run_dir, 2)
    flags = ["--ckpt", ckpt_path(run_dir, 2), "--grid", "--num-steps", "2", "--vae", with_fake_vae]
    assert sample.cli([*flags, "--sample-dir", str(tmp_path / "samples")]) == 0
    (grid,) = glob.glob(str(tmp_path / "samples" / "*grid*.png"))
    assert Image.open(grid).size[0] == 2 * 16  # 2 classes (cat, dog) of 16 px images


@slow
def test_encode_is_the_same_on_two_processes_and_resumes_after_a_kill_or_a_full_disk(tmp_path):
    """Same bytes; a full disk: one line, no .tmp; the rerun rewrites no file."""
    site, vae = fake_vae(tmp_path)
    images = make_image_folder(tmp_path / "img", per_class=5)
    env = dict(ENV, PYTHONPATH=f"{HERE}:{site}")

    def encode(out, *launcher, **kw):
        return subprocess.run([sys.executable, *launcher, SRA, *encode_flags(images, out, vae)],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
                              **kw)

    def folder_bytes(root):
        return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    one = encode(tmp_path / "one")
    assert one.returncode == 0 and f"--data-dir {tmp_path / 'one'}" in one.stdout, one.stderr
    two = encode(tmp_path / "two", "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node=2")
    assert two.returncode == 0, two.stderr[-3000:]
    reference = folder_bytes(tmp_path / "one")
    assert len(reference) == 11 and folder_bytes(tmp_path / "two") == reference  # 10 and the json
    out = tmp_path / "run" / "vae-sd"
    full = encode(tmp_path / "run", preexec_fn=limit_file_size(200))
    assert full.returncode == 2 and "Traceback" not in full.stderr, full.stderr[-3000:]
    assert re.fullmatch(rf"error: cannot write latent file {out}/(cat|dog)/\d\.png\.npy: File "
                        rf"too large", full.stderr.strip().splitlines()[-1]), full.stderr[-300:]
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.npy"))
    proc = subprocess.Popen([sys.executable, SRA, *encode_flags(images, tmp_path / "run", vae)],
                            cwd=tmp_path, env=dict(env, FAKE_VAE_DELAY="0.5"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(list(out.rglob("*.npy"))) >= 3, "a first batch", proc=proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop(proc)
    done = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.npy")}
    assert 3 <= len(done) < 10 and not (out / "dataset.json").exists()
    assert encode(tmp_path / "run").returncode == 0
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done} == done  # not rewritten
    assert folder_bytes(tmp_path / "run") == reference


@pytest.mark.parametrize("case", ["no-class-folders", "unreadable-image", "resolution",
                                  "vae-folder", "no-diffusers"])
def test_encode_bad_input_is_one_line(case, tmp_path, with_fake_vae, capsys, monkeypatch):
    """One line naming the problem, exit 2; no dataset.json."""
    images = make_image_folder(tmp_path / "img")
    flags = encode_flags(images, tmp_path / "enc", with_fake_vae)
    names = {"no-class-folders": ["class folder", tmp_path / "img" / "cat"],
             "unreadable-image": ["cannot read image", images / "cat" / "9.png"],
             "resolution": ["--resolution 20 is not divisible by 8"],
             "vae-folder": [tmp_path / "nope"],
             "no-diffusers": ["the SD-VAE needs diffusers: pip install diffusers"]}[case]
    if case == "no-class-folders":
        flags[flags.index("--data-dir") + 1] = str(images / "cat")
    if case == "unreadable-image":
        (images / "cat" / "9.png").write_bytes(b"not a png")
    if case in ("resolution", "vae-folder"):
        flags += {"resolution": ["--resolution", "20"], "vae-folder": ["--vae", names[0]]}[case]
    if case == "no-diffusers":
        monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    status, line = run_cli(capsys, *flags)
    assert status == 2
    one_line_naming(line, *names)
    assert not (tmp_path / "enc" / "vae-sd" / "dataset.json").exists()


def test_the_vae_loads_without_accelerates_advice(monkeypatch):
    """load_vae passes low_cpu_mem_usage=False: what diffusers does without accelerate, said
    outright, so diffusers prints no advice to install it."""
    diffusers = mock.Mock()  # a recording stub
    monkeypatch.setitem(sys.modules, "diffusers", diffusers)
    sra.load_vae("mse", torch.device("cpu"))
    diffusers.AutoencoderKL.from_pretrained.assert_called_once_with(
        "stabilityai/sd-vae-ft-mse", low_cpu_mem_usage=False)


# ==================================================================================================
# sra.py, 6. Helpers: atomic writes, checkpoints, FLOPs

DIE_MID_WRITE = r"""
import io, os, signal, sys, torch
import sra
buffer = io.BytesIO()
torch.save({"model": {"w": torch.ones(100_000)}, "step": 9}, buffer)
with sra.atomic_write(sys.argv[1], "checkpoint") as f:
    f.write(buffer.getvalue()[:100_000])  # a quarter of it; then the kernel kills us
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
"""


@slow
def test_kill_during_a_write_keeps_the_previous_file_and_resume_ignores_the_rest(tmp_path):
    """The old checkpoint stays intact; the half file is a .tmp, which --resume auto never takes."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    path = ckpt_path(tmp_path / "run", 4)
    old = {"model": {"w": torch.arange(10.0)}, "step": 4}
    with sra.atomic_write(path, "checkpoint") as f:
        torch.save(old, f)
    proc = subprocess.run([sys.executable, "-c", DIE_MID_WRITE, ckpt_path(tmp_path / "run", 6)],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert os.path.getsize(ckpt_path(tmp_path / "run", 6) + ".tmp") == 100_000
    torch.testing.assert_close(load(path), old, rtol=0, atol=0)
    loaded = []
    parts = {"model": SimpleNamespace(load_state_dict=loaded.append)}
    args = SimpleNamespace(resume="auto", model="SiT-T/8")
    assert sra.resume(args, str(tmp_path / "run"), parts)[0] == path
    torch.testing.assert_close(loaded, [old["model"]], rtol=0, atol=0)


def test_a_write_that_fails_is_one_line_and_keeps_the_old_file(tmp_path):
    """ENOSPC: one UserError naming the file and the reason; no .tmp left. (Real ones: slow.)"""
    path = str(tmp_path / "x.pt")
    with sra.atomic_write(path) as f:
        f.write(b"old")
    with pytest.raises(sra.UserError, match=r"^cannot write checkpoint .*x\.pt: No space left "
                                            r"on device$"):
        with sra.atomic_write(path, "checkpoint") as f:
            f.write(b"new")
            raise OSError(28, "No space left on device")
    assert open(path, "rb").read() == b"old" and not os.path.exists(path + ".tmp")


@pytest.mark.parametrize("name", ["sra.py", "sample.py"])
def test_every_torch_load_is_weights_only(name):
    """A checkpoint cannot run code when read: no pickle.load, no np.load with allow_pickle."""
    source = open(os.path.join(HERE, name)).read()
    calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
             and ast.unparse(node.func) == "torch.load"]
    assert calls, f"no torch.load found in {name}: has the loading moved?"
    for call in calls:
        flag = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
        assert isinstance(flag, ast.Constant) and flag.value is True, ast.unparse(call)
    assert "pickle.load" not in source and "allow_pickle=True" not in source


def naive_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v in matmuls, which FlopCounterMode counts (not SDPA's kernel)."""
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


@pytest.mark.parametrize("name", ["SiT-T/2", "DiT-T/4"])
def test_flop_formulas_against_pytorchs_flop_counter(name, monkeypatch):
    """Per image, SRA and vanilla steps, at 32 px (attention matters)."""
    args = sra.parse_args(["--model", name])
    student = randomize(sra.MODELS[name](input_size=32, in_channels=4, num_classes=10,
                                         projector=True))
    teacher = sra.MODELS[name](input_size=32, in_channels=4, num_classes=10)
    x, t, y = torch.randn(1, 4, 32, 32), torch.rand(1), torch.tensor([3])

    def sra_step():
        out, features = student(x, t, y, block_out_s=args.block_out_s)
        with torch.no_grad():
            target = teacher.forward_features(x, t, y, args.block_out_t)
        (out.square().mean() + (features - target).square().mean()).backward()

    def vanilla_step():
        student(x, t, y).square().mean().backward()
    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_attention)
    for no_sra, step in ((False, sra_step), (True, vanilla_step)):
        with FlopCounterMode(display=False) as counter:
            step()
        args.no_sra = no_sra  # (the formulas leave out the timestep MLP: 0.1% here)
        assert sra.train_flops(student, args) == pytest.approx(counter.get_total_flops(), rel=2e-3)


def test_flop_formula_matches_the_dit_paper():
    """forward_flops gives DiT-XL/2's 118.64 GFLOPs; SRA costs ~1.24x a SiT-XL/2 step."""
    with torch.device("meta"):
        model = sra.MODELS["DiT-XL/2"](input_size=32, in_channels=4, num_classes=1000)
    assert sra.forward_flops(model) / 2 == pytest.approx(118.64e9, rel=0.01)  # multiply-adds
    args = sra.parse_args(["--model", "SiT-XL/2"])
    with torch.device("meta"):
        sit = sra.MODELS["SiT-XL/2"](input_size=32, in_channels=4, num_classes=1000,
                                     projector=True)
    ratio = sra.train_flops(sit, args) / (3 * sra.forward_flops(sit))
    assert 1.22 < ratio < 1.26  # SRA's FLOP floor for SiT-XL/2: teacher 20 of 28 blocks
    args.no_sra = True
    assert sra.train_flops(sit, args) == 3 * sra.forward_flops(sit)


# ==================================================================================================
# sra.py, 7. The training loop, in this process

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """30 steps of SiT-T/8, batch 16, checkpoints every 12, from a relative --output-dir -> run."""
    out = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(out)
        sra.main(sra.parse_args(TINY + [
            "--batch-size", "16", "--learning-rate", "1e-3", "--max-train-steps", "30",
            "--checkpoint-steps", "12", "--output-dir", "exps", "--exp-name", "run"]))
    return out / "exps" / "run"


def test_training_run_writes_its_folder_and_learns(trained):
    """args.json, log.txt, metrics, checkpoints at multiples of --checkpoint-steps and the last."""
    args = json.loads((trained / "args.json").read_text())
    assert (args["num_classes"], args["in_channels"], args["input_size"]) == (10, 3, 16)
    assert args["dataset"] == "builtin" and args["model"] == "SiT-T/8"
    records = metrics(trained)
    assert [m["step"] for m in records] == list(range(1, 31))
    fields = {"step", "gen_loss", "align_loss", "align_cos", "align_weight", "grad_norm",
              "step_s", "img_per_s", "skipped_steps", "mfu"}
    assert all(m.keys() == fields for m in records)
    assert all(m["skipped_steps"] == 0 and m["img_per_s"] == pytest.approx(16 / m["step_s"])
               and m["align_weight"] == 0.2 for m in records)
    first = np.mean([m["gen_loss"] for m in records[:5]])
    assert np.mean([m["gen_loss"] for m in records[-5:]]) < 0.95 * first  # it learns
    assert records[-1]["align_cos"] > records[0]["align_cos"]  # the student aligns
    assert steps_saved(trained) == [12, 24, 30]
    log = (trained / "log.txt").read_text()
    for step in (12, 24, 30):
        assert f"saved checkpoint {trained / 'checkpoints' / f'{step:07d}.pt'}\n" in log
    assert "step 30/30 | loss " in log
    ckpt = load(trained / "checkpoints" / "0000030.pt")
    assert ckpt["step"] == 30 and isinstance(ckpt["args"], dict)
    assert not any(k.startswith("ap_head") for k in ckpt["ema"])
    assert any(k.startswith("ap_head") for k in ckpt["model"])


def test_loss_is_denoise_plus_lambda_align_over_the_micro_batches(tmp_path, monkeypatch, small):
    """Recorded at the loss scaler; logged as means over the logged steps."""
    seen, scaled = [], []
    real_losses = sra.training_losses

    def recording_losses(*args):
        denoise, align, cos = real_losses(*args)
        seen.append((denoise.item(), align.item()))
        return denoise, align, cos

    class RecordingScaler(torch.amp.GradScaler):
        """Records the loss that the loop hands to backward."""

        def scale(self, outputs):
            scaled.append(outputs.item())
            return super().scale(outputs)
    monkeypatch.setattr(sra, "training_losses", recording_losses)
    monkeypatch.setattr(torch.amp, "GradScaler", RecordingScaler)
    run_dir = run_main(tmp_path, "--align-weight", "0.3", "--align-decay-start", "1",
                       "--align-decay-steps", "2", "--gradient-accumulation-steps", "2",
                       "--max-train-steps", "4", "--log-every", "2", "--checkpoint-steps", "100")
    assert len(seen) == len(scaled) == 8
    for i, ((denoise, align), loss) in enumerate(zip(seen, scaled)):
        step = i // 2  # the step counter while its two micro-batches run
        weight = 0.3 * 0.1 ** (max(0, step - 1) / 2)  # tenfold per 2 steps after step 1
        assert loss == pytest.approx((denoise + weight * align) / 2, rel=1e-6), i
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [2, 4]
    for record, chunk in zip(records, (seen[:4], seen[4:])):
        assert record["gen_loss"] == pytest.approx(np.mean([d for d, _ in chunk]), rel=1e-5)
        assert record["align_loss"] == pytest.approx(np.mean([a for _, a in chunk]), rel=1e-5)


def test_the_loop_applies_the_ema_decay_and_the_optimiser_flags(tmp_path, monkeypatch, small):
    """ema <- d ema + (1 - d) model; AdamW's --adam-* flags; --max-grad-norm."""
    clipped = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        clipped.append((len(parameters), max_norm))
        return real_clip(parameters, max_norm, *args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    flags = ["--ema-decay", "0.9", "--learning-rate", "3e-4", "--adam-beta1", "0.8",
             "--adam-beta2", "0.95", "--adam-epsilon", "1e-6", "--adam-weight-decay", "0.05",
             "--max-grad-norm", "0.5", "--max-train-steps", "2", "--checkpoint-steps", "1"]
    run_dir = run_main(tmp_path, *flags)
    args = sra.parse_args(TINY + flags)
    sra.build_dataset(args)
    model, _, _, _ = sra.build(args, torch.device("cpu"))  # the same initial weights (the seed)
    initial = model.state_dict()
    one, two = load(ckpt_path(run_dir, 1)), load(ckpt_path(run_dir, 2))
    for name, value in one["ema"].items():
        expected = 0.9 * initial[name] + 0.1 * one["model"][name]
        assert torch.allclose(value, expected, atol=1e-7), name
        expected = 0.9 * value + 0.1 * two["model"][name]
        assert torch.allclose(two["ema"][name], expected, atol=1e-7), name
    group = one["opt"]["param_groups"][0]
    assert (group["lr"], tuple(group["betas"]), group["eps"], group["weight_decay"]) == (
        3e-4, (0.8, 0.95), 1e-6, 0.05)
    # the blocks after the student's get no gradient at step 1 (the final layer starts at zero)
    name = "blocks.3.attn.qkv.weight"
    assert torch.allclose(one["model"][name], initial[name] * (1 - 3e-4 * 0.05), rtol=1e-6)
    moved = max((one["model"][k] - initial[k] * (1 - 3e-4 * 0.05)).abs().max().item()
                for k in initial)
    assert moved == pytest.approx(3e-4, rel=0.05)  # Adam's first step: lr g / |g|
    assert clipped == [(len(list(model.parameters())), 0.5)] * 2


def test_data_order_is_the_seeded_shuffle_across_epochs_and_resumes_go_on_in_it(tmp_path,
                                                                                monkeypatch, small):
    """Items in torch.randperm's order for (--seed, epoch), as DistributedSampler's. 8 images in
    batches of 2, 3 micro-batches a step: steps straddle epochs; --epochs E is E * (4 // 3) steps.
    Stopped at steps 1 and 3 and resumed: the same items, bit-identical to the whole run."""
    indices, real_item = [], datasets.ImageFolder.__getitem__

    def recording_item(self, index):
        indices.append(index)
        return real_item(self, index)
    monkeypatch.setattr(datasets.ImageFolder, "__getitem__", recording_item)
    data = make_image_folder(tmp_path / "img")
    flags = ["--data-dir", str(data), "--seed", "3", "--gradient-accumulation-steps", "3",
             "--checkpoint-steps", "1"]
    run_main(tmp_path, *flags, "--epochs", "2", exp="epochs")
    assert_finished(tmp_path / "epochs", 2)
    reference = run_main(tmp_path, *flags, "--max-train-steps", "5", exp="reference")
    for stop_at in (1, 3, 5):
        run_main(tmp_path, *flags, "--max-train-steps", str(stop_at), "--resume", "auto",
                 exp="resumed")
    assert_same_training_state(ckpt_path(tmp_path / "resumed", 5), ckpt_path(reference, 5))
    shuffles = [torch.randperm(8, generator=torch.Generator().manual_seed(3 + epoch)).tolist()
                for epoch in range(4)]
    order = [i for shuffle in shuffles for i in shuffle]  # the epochs one after the other
    assert indices == order[:12] + order[:30] + order[:30]  # 2 steps, then 5 steps twice


def deterministic_losses(model, ema, x, y, args, diffusion, generator):
    """sra.training_losses drawing nothing (t = 0.5, x_t = x), with the projector and teacher."""
    t = torch.full((len(x),), 0.5, device=x.device)
    output, student = model(x, t, y, block_out_s=args.block_out_s)
    with torch.no_grad():
        teacher = ema.forward_features(x, t, y, args.block_out_t)
    align, cos = sra.align_loss(student, teacher, args.loss_type)
    return ((output.float() - x) ** 2).mean(), 0.1 * align, cos


def identity_batch(x, kind, generator):
    """A stand-in for sra.prepare_batch: no random flips."""
    return x


def test_gradient_accumulation_equals_one_big_batch(tmp_path, monkeypatch):
    """2 micro-batches of 4 give the losses, gradient norms and weights of one batch of 8."""
    monkeypatch.setattr(sra, "training_losses", deterministic_losses)
    monkeypatch.setattr(sra, "prepare_batch", identity_batch)
    common = ["--cfg-prob", "0", "--max-train-steps", "3", "--checkpoint-steps", "3",
              "--learning-rate", "1e-3"]
    big = run_main(tmp_path, *common, "--batch-size", "8", exp="big")
    accumulated = run_main(tmp_path, *common, "--batch-size", "4",
                           "--gradient-accumulation-steps", "2", exp="accumulated")
    for a, b in zip(metrics(big), metrics(accumulated), strict=True):
        for key in ("gen_loss", "align_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    args = sra.parse_args(TINY + ["--cfg-prob", "0"])
    sra.build_dataset(args)
    initial = sra.build(args, torch.device("cpu"))[0].state_dict()
    a, b = load(ckpt_path(big, 3))["model"], load(ckpt_path(accumulated, 3))["model"]
    update = max((a[k] - initial[k]).abs().max().item() for k in a)
    assert update > 1e-3  # three steps of lr 1e-3 moved the weights
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3 * update  # float rounding


def test_main_with_compile_trains_and_saves_plain_names(tmp_path, monkeypatch):
    """The student and the teacher go through torch.compile; plain names in the checkpoint."""
    # Cheap: a 2-block, 64-wide T, and the aot_eager backend (Dynamo and AOTAutograd trace the
    # model and its backward; Inductor's C++ code generation, ~30 s cold on a CPU, is skipped).
    monkeypatch.setitem(sra.SIZES, "T", (2, 64, 2))
    # main sets suppress_errors globally; put it back by hand (monkeypatch would delete the entry of
    # Dynamo's config module on undo under pytest 9.2, as it is not in the module's __dict__)
    suppress_errors = torch._dynamo.config.suppress_errors
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return aot_eager(graph_module, example_inputs)
    compile_counted = functools.partial(torch.compile, backend=counting_backend)
    monkeypatch.setattr(torch, "compile", compile_counted)
    try:
        run_dir = run_main(tmp_path, "--compile", "--block-out-t", "2", "--max-train-steps", "2")
    finally:
        torch._dynamo.config.suppress_errors = suppress_errors
        torch._dynamo.reset()
    assert "torch.compile failed" not in (run_dir / "log.txt").read_text()
    codes = [g.code for g in graphs]  # the probe, the student, the teacher
    assert any("ap_head" in c and "final_layer" in c for c in codes)  # the student
    assert any("blocks" in c and "final_layer" not in c for c in codes)  # the early-exit teacher
    assert_finished(run_dir, 2)


def test_dit_with_the_cos_loss_grad_checkpointing_and_a_failed_compile_trains_eagerly(
        tmp_path, capsys, monkeypatch):
    """lambda 0.5, constant (the official code decays it for sml1 only); the failed compile said
    once in log.txt, and compile: false in the bench's lines."""

    def failing_compile(*args, **kwargs):
        """A torch.compile whose functions fail when called, as on a machine without a compiler."""
        def compiled(*a, **k):
            raise RuntimeError("no C++ compiler found")
        return compiled
    checkpoint = mock.Mock(wraps=torch.utils.checkpoint.checkpoint)  # a recording stub
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", checkpoint)
    monkeypatch.setattr(torch, "compile", failing_compile)
    run_dir = run_main(tmp_path, "--model", "DiT-T/8", "--loss-type", "cos", "--compile",
                       "--align-decay-start", "0", "--grad-checkpointing", "--max-train-steps", "2")
    assert checkpoint.call_count == 2 * 6  # the 6 blocks of the student, at each of the 2 steps
    log = (run_dir / "log.txt").read_text()
    assert log.count("torch.compile failed") == 1 and "no C++ compiler found" in log
    ckpt = assert_finished(run_dir, 2)
    assert ckpt["model"]["final_layer.linear.bias"].shape == (8 * 8 * 6,)  # C_out = 2C
    assert all(m["align_weight"] == 0.5 for m in metrics(run_dir))
    sra.bench(sra.parse_args(TINY + ["--bench", "--compile", "--bench-steps", "1"]))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line[0] == "{"]
    assert [line["compile"] for line in lines] == [False, False]


@pytest.mark.parametrize("model, precision, accum, checkpointing", [  # every pair of values
    ("SiT-T/8", "no", "1", False), ("SiT-T/8", "fp16", "2", False), ("SiT-T/8", "bf16", "2", True),
    ("DiT-T/8", "no", "2", True), ("DiT-T/8", "fp16", "1", True), ("DiT-T/8", "bf16", "1", False)])
def test_no_host_device_sync_inside_a_training_step(monkeypatch, model, precision, accum,
                                                     checkpointing):
    """From prepare_batch to update_ema. (--compile, DDP: the GPU check.)"""
    armed, hits = [False], []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        method = getattr(torch.Tensor, name)

        def guarded(tensor, *args, name=name, method=method, **kwargs):
            if armed[0]:
                hits.append(name)  # (recorded too, in case something swallows the error)
                raise AssertionError(f"host-device sync inside a training step: Tensor.{name}")
            return method(tensor, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, guarded)
    real_prepare, real_update = sra.prepare_batch, sra.update_ema
    arms = []

    def prepare_batch(*args):
        armed[0] = True
        arms.append(1)
        return real_prepare(*args)

    def update_ema(*args):
        real_update(*args)
        armed[0] = False
    monkeypatch.setattr(sra, "prepare_batch", prepare_batch)
    monkeypatch.setattr(sra, "update_ema", update_ema)
    args = sra.parse_args(["--bench", "--bench-steps", "1", "--bench-shape", "3", "16", "16",
                           "--batch-size", "2", "--num-workers", "0", "--model", model,
                           "--mixed-precision", precision, "--gradient-accumulation-steps", accum,
                           *(["--grad-checkpointing"] if checkpointing else [])])
    try:
        records = sra.main(args)
    finally:
        armed[0] = False
    assert hits == [] and len(arms) == (sra.BENCH_WARMUP + 1) * int(accum)  # every micro-batch
    assert len(records) == sra.BENCH_WARMUP + 1 and math.isfinite(records[-1]["gen_loss"])


def test_bench_is_the_training_loop_and_its_figures_follow_a_clock(capsys, monkeypatch):
    """Vanilla then SRA on a virtual clock: warm-up steps 5 s, timed ones 0.25 s and 0.375 s, so
    the medians, img/s (2 x 2 micro-batches), TFLOP/s, MFU (peak 1e12) are known numbers."""
    clock, steps, real_update = [0.0], [], sra.update_ema
    losses = mock.Mock(wraps=sra.training_losses)  # a recording stub

    def timed_update(*args):
        real_update(*args)
        steps.append(1)
        warm = len(steps) % (sra.BENCH_WARMUP + 2) in range(1, sra.BENCH_WARMUP + 1)
        with_sra = len(steps) > sra.BENCH_WARMUP + 2
        if warm:
            clock[0] += 5.0
        elif with_sra:
            clock[0] += 0.375
        else:
            clock[0] += 0.25
    monkeypatch.setattr(sra, "training_losses", losses)
    monkeypatch.setattr(sra, "update_ema", timed_update)
    monkeypatch.setattr(sra.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(sra, "peak_flops", lambda device: 1e12)
    sra.bench(sra.parse_args(["--bench", "--model", "SiT-T/4", "--bench-shape", "4", "32", "32",
                              "--batch-size", "2", "--gradient-accumulation-steps", "2",
                              "--bench-steps", "2", "--num-workers", "0"]))
    monkeypatch.undo()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    vanilla, with_sra = [json.loads(line) for line in lines]
    calls = [call.args[4].no_sra for call in losses.call_args_list]
    assert calls == [True] * 8 + [False] * 8  # (2 + 2 steps of 2 micro-batches each)
    args = sra.parse_args(["--model", "SiT-T/4"])
    with torch.device("meta"):
        student = sra.MODELS["SiT-T/4"](input_size=32, in_channels=4, num_classes=1000,
                                        projector=True)
    for record, seconds, no_sra in ((vanilla, 0.25, True), (with_sra, 0.375, False)):
        args.no_sra = no_sra
        assert (record["model"], record["sra"], record["batch"], record["shape"]) == (
            "SiT-T/4", not no_sra, 2, [4, 32, 32])
        assert (record["dtype"], record["device"], record["peak_mem_gb"]) == ("fp32", "cpu", None)
        assert record["step_s_median"] == seconds and record["img_per_s"] == 4 / seconds
        assert record["flops_per_img"] == sra.train_flops(student, args)
        assert record["tflops"] == pytest.approx(record["flops_per_img"] * 4 / seconds / 1e12)
        assert record["mfu"] == pytest.approx(record["tflops"])
    assert with_sra["sra_overhead_ratio"] == 1.5
    assert with_sra["flop_ratio"] == pytest.approx(with_sra["flops_per_img"]
                                                   / vanilla["flops_per_img"])


# ==================================================================================================
# sra.py, 8. Fault tolerance: kills, preemption, full disks, bad data, NaNs

STEPS = 12  # length of the reference runs


SLOW = r"""
import os, sys, time, torch
import sra
where = os.environ["SLOW"]
real_losses, real_save = sra.training_losses, torch.save
def slow_losses(*args):
    time.sleep(0.1)
    return real_losses(*args)
def slow_save(obj, f):
    real_save(obj, f)
    open(os.environ["SAVING"], "w").close()  # the file is half made: not yet fsynced, not renamed
    time.sleep(1)
if where == "step":
    sra.training_losses = slow_losses
if where == "save":
    torch.save = slow_save
sys.exit(sra.cli(sys.argv[1:]))
"""


@slow
@pytest.mark.parametrize("moment", ["step", "save"])
def test_sigterm_to_every_pid_of_the_job_checkpoints_and_resumes_bit_identical(moment, tmp_path):
    """As SLURM does, mid-step or mid-write; exit 0, no process left."""
    accum = ["--gradient-accumulation-steps", "2"] if moment == "step" else []
    script, saving = tmp_path / "slow.py", tmp_path / "saving"
    script.write_text(SLOW)
    ref = start(tmp_path, *accum, "--max-train-steps", str(STEPS), exp="ref", out="ref.out")
    proc = start(tmp_path, *accum, "--num-workers", "2", "--max-train-steps", "1000",
                 "--checkpoint-steps", "2" if moment == "save" else "1000", script=script,
                 env=dict(ENV, SLOW=moment, SAVING=str(saving)))
    run_dir, log_path, pids = tmp_path / "run", tmp_path / "run" / "log.txt", []
    try:
        if moment == "save":
            wait_for(saving.exists, "a checkpoint write", proc=proc)
        else:
            wait_for(lambda: "step 3/" in read(log_path), "step 3", proc=proc)
        pids = job_pids(proc.pid)
        assert len(pids) == 3, pids  # the trainer and its two workers
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        proc.wait(timeout=60)
        wait_for(lambda: not any(map(alive, pids)), "every process to exit", timeout=10)
        ref.wait(timeout=120)
    finally:
        stop(proc, *pids)
        stop(ref)
    assert proc.returncode == 0, read(tmp_path / "run.out")[-3000:]
    assert ref.returncode == 0, read(tmp_path / "ref.out")[-3000:]
    step = steps_saved(run_dir)[-1]
    assert step < STEPS and load(ckpt_path(run_dir, step))["step"] == step
    assert f"SIGTERM: stopped at step {step}; continue with --resume auto" in read(log_path)
    assert not glob.glob(str(run_dir / "checkpoints" / "*.tmp"))
    proc = train(tmp_path, *accum, "--resume", "auto", "--max-train-steps", str(STEPS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_training_state(ckpt_path(run_dir, STEPS), ckpt_path(tmp_path / "ref", STEPS))


@slow
def test_sigkill_of_a_dataloader_worker_is_one_line_and_the_checkpoint_stays(tmp_path):
    """As by an OOM killer: one line, exit 2, no hang, no half-written file; the last one loads."""
    proc = start(tmp_path, "--num-workers", "2", "--max-train-steps", "1000", "--checkpoint-steps",
                 "2")
    run_dir = tmp_path / "run"
    try:
        wait_for(lambda: "saved checkpoint" in read(run_dir / "log.txt"), "a checkpoint", proc=proc)
        worker = job_pids(proc.pid)[-1]
        os.kill(worker, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        stop(proc)
    lines = read(tmp_path / "run.out").strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in read(tmp_path / "run.out"), lines[-5:]
    assert lines[-1].startswith("error: the data loader failed: "), lines[-1]
    assert load(ckpt_path(run_dir, steps_saved(run_dir)[-1]))
    assert not glob.glob(str(run_dir / "checkpoints" / "*.tmp"))


@slow
def test_checkpoint_that_cannot_be_written_is_one_line_and_leaves_no_partial_file(tmp_path):
    """EFBIG, as a full disk: one line with the file and the reason, exit 2, the last intact."""
    assert train(tmp_path, "--max-train-steps", "2").returncode == 0
    good = ckpt_path(tmp_path / "run", 2)
    before = open(good, "rb").read()
    proc = train(tmp_path, "--resume", "auto", "--max-train-steps", "4",
                 preexec_fn=limit_file_size())
    assert proc.returncode == 2 and proc.stderr == (
        f"error: cannot write checkpoint {ckpt_path(tmp_path / 'run', 4)}: File too large\n")
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["0000002.pt"]
    assert open(good, "rb").read() == before


@slow
def test_sigterm_to_one_ddp_rank_stops_every_rank_within_a_step_and_resumes_bit_identical(tmp_path):
    """The ranks vote; rank 0 alone logs and saves both ranks' streams."""
    flags = ["--checkpoint-steps", "1000", "--num-workers", "1"]
    ref = start(tmp_path, *flags, "--max-train-steps", str(STEPS), exp="ref", out="ref.out",
                nproc=2)
    proc = start(tmp_path, *flags, "--max-train-steps", "1000", nproc=2)
    run_dir, log_path = tmp_path / "run", tmp_path / "run" / "log.txt"
    try:
        wait_for(lambda: "step 3/" in read(log_path), "step 3", proc=proc)
        workers = {}
        for pid in children(proc.pid):  # each rank's pid, from its environment
            env = read(f"/proc/{pid}/environ").split("\0")
            workers[int(next(v[5:] for v in env if v.startswith("RANK=")))] = pid
        assert sorted(workers) == [0, 1], workers
        last = int(re.findall(r"\] step (\d+)/", read(log_path))[-1])  # just before the signal
        os.kill(workers[1], signal.SIGTERM)
        proc.wait(timeout=60)
        ref.wait(timeout=120)
    finally:
        stop(proc)
        stop(ref)
    assert proc.returncode == 0, read(tmp_path / "run.out")[-3000:]
    assert ref.returncode == 0, read(tmp_path / "ref.out")[-3000:]
    [step] = steps_saved(run_dir)
    assert last < step <= last + 2 and step < STEPS, (last, step)  # acted on within a step
    log = read(log_path)
    assert "2 process(es)" in log and "global batch 4" in log and log.count(" done: ") == 1
    assert f"SIGTERM: stopped at step {step}; continue with --resume auto" in log
    rng = load(ckpt_path(run_dir, step))["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0], rng[1])  # a stream per rank
    proc = start(tmp_path, *flags, "--max-train-steps", str(STEPS), "--resume", "auto",
                 out="resume.out", nproc=2)
    try:
        proc.wait(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode == 0, read(tmp_path / "resume.out")[-3000:]
    assert_same_training_state(ckpt_path(run_dir, STEPS), ckpt_path(tmp_path / "ref", STEPS))


DDP_SCRIPT = r"""
import sys
import sra
import test_sra
sra.training_losses, sra.prepare_batch = test_sra.deterministic_losses, test_sra.identity_batch
sys.exit(sra.cli(sys.argv[1:]))
"""


@slow
def test_ddp_with_accumulation_equals_one_process_with_the_same_global_batch(tmp_path, monkeypatch):
    """2 ranks x 2 micro-batches of 2 (no_sync on the first) as batches of 8."""
    exact = ["--cfg-prob", "0", "--max-train-steps", "3", "--learning-rate", "0.1",
             "--adam-epsilon", "1", "--max-grad-norm", "1e6", "--ema-decay", "0.5"]
    (tmp_path / "ddp.py").write_text(DDP_SCRIPT)
    proc = start(tmp_path, *exact, "--batch-size", "2", "--gradient-accumulation-steps", "2",
                 exp="ddp", script=tmp_path / "ddp.py", nproc=2)
    try:
        monkeypatch.setattr(sra, "training_losses", deterministic_losses)
        monkeypatch.setattr(sra, "prepare_batch", identity_batch)
        run_main(tmp_path, *exact, "--batch-size", "8", exp="single")
        proc.wait(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode == 0, read(tmp_path / "run.out")[-3000:]
    ddp, single = load(ckpt_path(tmp_path / "ddp", 3)), load(ckpt_path(tmp_path / "single", 3))
    assert single["model"]["final_layer.linear.weight"].abs().max() > 1e-3  # (zero at init)
    for part in ("model", "ema"):
        assert ddp[part].keys() == single[part].keys()
        for name, value in single[part].items():
            torch.testing.assert_close(ddp[part][name], value, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fault", ["truncated", "wrong-shape", "missing"])
def test_bad_latent_is_one_line_naming_it_when_first_read(tmp_path, latents, fault, small, capsys):
    """Truncated, wrong-shaped or missing: not at start-up."""
    bad = latents / "vae-sd" / "00" / "2.npy"
    if fault == "truncated":
        bad.write_bytes(bad.read_bytes()[:100])
    elif fault == "wrong-shape":
        np.save(bad, np.zeros((8, 8, 8), np.float32))  # a 64 px latent in a 32 px dataset
    else:
        bad.unlink()
    assert len(sra.LatentDataset(str(latents), 32)) == 6  # start-up does not open the files
    status, line = run_cli(capsys, *LATENT_FLAGS, "--model", "SiT-T/4", "--data-dir", latents,
                           "--max-train-steps", "20", "--output-dir", tmp_path, "--exp-name", "run")
    assert status == 2
    one_line_naming(line, bad)
    assert "steps 0 -> 20" in read(tmp_path / "run" / "log.txt")  # training had started


def nan_loss(loss):
    return loss * math.nan


def nan_gradient(loss):
    """sqrt(0 * loss) is 0, and its gradient 0 * (1 / (2 sqrt(0))) = 0 * inf = NaN."""
    return loss + torch.sqrt(0 * loss)


@pytest.mark.parametrize("fault, precision", [(nan_loss, "no"), (nan_gradient, "no"),
                                              (nan_gradient, "bf16")])
def test_a_nonfinite_loss_or_gradient_stops_the_run_at_the_last_good_checkpoint(
        tmp_path, monkeypatch, small, fault, precision):
    """At step 4, a checkpoint step: checkpoint 2 is the last, finite."""
    real_losses = sra.training_losses
    calls = []

    def losses(*args):
        denoise, align, cos = real_losses(*args)
        calls.append(denoise)
        return (fault(denoise) if len(calls) == 4 else denoise), align, cos
    monkeypatch.setattr(sra, "training_losses", losses)
    with pytest.raises(sra.UserError) as error:
        run_main(tmp_path, "--max-train-steps", "10", "--checkpoint-steps", "2",
                 "--log-every", "100", "--mixed-precision", precision)
    run_dir = tmp_path / "run"
    assert re.fullmatch(rf"non-finite loss or gradient by step 4; stopping. Last good checkpoint: "
                        rf"{ckpt_path(run_dir, 2)} \(.*\)", str(error.value)), str(error.value)
    assert len(calls) == 4 and steps_saved(run_dir) == [2]
    ckpt = load(ckpt_path(run_dir, 2))
    assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in ckpt[part].values())


def test_fp16_overflow_is_a_counted_skipped_step(tmp_path, monkeypatch, small):
    """In metrics.jsonl's skipped_steps, at that step; the run goes on. The backward overflows
    at a huge scale (steps 1-3 and 5), and step 7's forward does (an infinite loss)."""
    scales = []
    calls = []
    real_losses = sra.training_losses

    def losses(*args):
        denoise, align, cos = real_losses(*args)
        calls.append(1)
        return (denoise * math.inf if len(calls) == 7 else denoise), align, cos

    class HugeScaler(torch.amp.GradScaler):
        """Starts at 2^24, so that the first fp16 backwards overflow; records its scales."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "init_scale": 2.0 ** 24})

        def update(self, new_scale=None):
            super().update(new_scale)
            if self.is_enabled():
                scales.append(self.get_scale())
    monkeypatch.setattr(torch.amp, "GradScaler", HugeScaler)
    monkeypatch.setattr(sra, "training_losses", losses)
    run_main(tmp_path, "--mixed-precision", "fp16", "--max-train-steps", "8",
             "--checkpoint-steps", "1000")
    records = metrics(tmp_path / "run")
    # the scale halves at each skipped step
    halvings = [round(math.log2(2.0 ** 24 / scale)) for scale in scales]
    assert len(halvings) == 8 and 0 < halvings[-1] < 8  # some steps skipped, some taken
    assert records[6]["gen_loss"] == math.inf  # step 7: a forward overflow
    # steps 6 and 8 taken (6 at the scale step 7 had): step 7 skipped for its infinite loss
    assert [m["skipped_steps"] for m in records][5:] == [0, 1, 0]
    assert [m["step"] for m in records] == list(range(1, 9))
    # one skipped step in the record of each step that overflowed
    assert [m["skipped_steps"] for m in records] == np.diff([0] + halvings).tolist()
    ckpt = load(ckpt_path(tmp_path / "run", 8))
    assert ckpt["scaler"]["scale"] == scales[-1]
    assert all(torch.isfinite(v).all() for part in ("model", "ema") for v in ckpt[part].values())


CIFAR_SCRIPT = r"""
import os, sys, time
import torch.distributed as dist
from torchvision import datasets
import sra
def recording_cifar10(root, download, transform):  # a slow download, a failed read of nothing
    if download:
        time.sleep(1)
        os.makedirs(root)
    os.listdir(root)
    print(os.environ["RANK"], download, file=open(os.path.join(root, "calls"), "a"), flush=True)
datasets.CIFAR10 = recording_cifar10
dist.init_process_group("gloo")
sra.build_dataset(sra.parse_args(["--dataset", "cifar10", "--data-dir", sys.argv[1]]))
"""


@slow
def test_under_torchrun_rank_0_downloads_cifar10_while_the_others_wait(tmp_path):
    """Rank 1 reads after rank 0's download (both at once overwrite each other's files)."""
    (tmp_path / "cifar.py").write_text(CIFAR_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", tmp_path / "cifar.py", tmp_path / "data"],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read(tmp_path / "data" / "calls").splitlines() == ["0 True", "1 False"]


# ==================================================================================================
# sra.py, 9. The command line: the paper's defaults, the official commands, help, bad input, resume

def test_defaults_are_the_papers_and_the_official_commands_parse():
    """The paper's recipe, lambdas and block pairs (S as B, T 1 -> 4); the official SiT command,
    DiT's with --block-out-t 20 (older README) and 16 (the paper)."""
    args = sra.parse_args(["--model", "SiT-XL/2"])
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2, args.adam_weight_decay,
            args.adam_epsilon, args.max_grad_norm) == (1e-4, 0.9, 0.999, 0.0, 1e-8, 1.0)
    assert (args.batch_size, args.ema_decay, args.cfg_prob, args.t_max) == (32, 0.9999, 0.1, 0.2)
    assert (args.loss_type, args.align_weight, args.path_type, args.weighting) == (
        "sml1", 0.2, "linear", "uniform")
    assert (args.align_decay_start, args.align_decay_steps) == (745_596, 5_004_000)
    assert (args.epochs, args.max_train_steps) == (801, None)  # 801 epochs unless steps are given
    pairs = {"SiT-B/2": (3, 8), "SiT-L/2": (6, 16), "SiT-XL/2": (8, 20), "DiT-B/2": (3, 7),
             "DiT-L/2": (6, 14), "DiT-XL/2": (8, 16), "SiT-S/4": (3, 8), "DiT-S/2": (3, 7),
             "SiT-L/4": (6, 16), "SiT-T/8": (1, 4), "DiT-T/2": (1, 4)}
    for name, pair in pairs.items():
        args = sra.parse_args(["--model", name])
        assert (args.block_out_s, args.block_out_t) == pair, name
        assert args.align_weight == (0.2 if name.startswith("SiT") else 0.04)
        assert args.learn_sigma == name.startswith("DiT")  # the value used, as args.json says
    args = sra.parse_args(["--model", "SiT-B/2", "--loss-type", "cos"])
    assert (args.align_weight, args.align_decay_steps) == (0.5, 0)
    with torch.device("meta"):  # build_model alone resolves learn_sigma the same way
        dit = sra.build_model("DiT", "XL", 2, learn_sigma=None)
        sit = sra.build_model("SiT", "XL", 2, learn_sigma=None)
    assert (dit.out_channels, sit.out_channels) == (8, 4)
    sit = ("--allow-tf32 --mixed-precision=fp16 --seed=0 --path-type=linear --prediction=v "
           "--resolution=256 --batch-size=32 --weighting=uniform --model=SiT-XL/2 --block-out-s=8 "
           "--block-out-t=20 --t-max=0.2 --output-dir=exps --exp-name=sitxl-ab820-t0.2-res256 "
           "--data-dir=/data").split()
    args = sra.parse_args(sit)
    assert (args.model, args.block_out_s, args.block_out_t, args.mixed_precision) == (
        "SiT-XL/2", 8, 20, "fp16")
    assert (args.batch_size, args.t_max, args.allow_tf32, args.data_dir) == (32, 0.2, True, "/data")
    for teacher in (20, 16):
        dit = ("--allow-tf32 --mixed-precision=fp16 --seed=0 --resolution=256 --batch-size=32 "
               f"--model=DiT-XL/2 --block-out-s=8 --block-out-t={teacher} --t-max=0.2 "
               "--output-dir=exps --exp-name=ditxl-ab820-t0.2-res256 --data-dir=/data "
               "--cfg-prob 0.1 --learning-rate 1e-4 --adam-beta1 0.9 --adam-beta2 0.999 "
               "--adam-weight-decay 0 --adam-epsilon 1e-8 --max-grad-norm 1 --num-workers 4 "
               "--num-classes 1000 --resume-ckpt ckpt.pt").split()
        args = sra.parse_args(dit)
        assert (args.family, args.block_out_s, args.block_out_t, args.num_classes) == (
            "DiT", 8, teacher, 1000)
        assert (args.exp_name, args.resume) == ("ditxl-ab820-t0.2-res256", "ckpt.pt")


BAD_INPUT = {  # flags -> what the one line says
    "model": (["--model", "SiT-XL2"], ["unknown model 'SiT-XL2'", "SiT|DiT-{T,S,B,L,XL}/{2,4,8}"]),
    "data-dir": (["--data-dir", "/nonexistent/imagenet"],
                 ["No such file or directory", "/nonexistent/imagenet"]),
    "latent-dir": (["--data-dir", "/nonexistent", "--dataset", "latents"],
                   ["No such file or directory", "/nonexistent/vae-sd/dataset.json"]),
    "block-out-t": (["--block-out-t", "7"], ["block 7 is out of range: SiT-T/8 has blocks 1..6"]),
    "block-out-s": (["--block-out-s", "-1"], ["block -1 is out of range"]),
    "resume-text": (["--resume", "{tmp}/img/cat/0.png"],
                    ["cannot resume from {tmp}/img/cat/0.png"]),
    "batch-size": (["--batch-size", "0"], ["--batch-size, --gradient-accumulation-steps"]),
    "no-class-folders": (["--data-dir", "{tmp}/img/cat"], ["class folder", "{tmp}/img/cat"]),
    "empty-class-folder": (["--data-dir", "{tmp}/img"], ["no valid file for the classes hollow"]),
    "cifar-offline": (["--dataset", "cifar10", "--data-dir", "{tmp}/cifar"],
                      ["name resolution"]),
    "flag": (["--bench-steps", "many"], ["invalid int value: 'many'"]),
    "pixel-tokens": (["--model", "SiT-T/2", "--resolution", "256"],  # 64x the paper's tokens
                     ["SiT-T/2 on 256 px images is 16384 tokens", "--encode DIR", "--resolution",
                      "patch"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    """Each first-hour mistake, before the run folder exists (CIFAR-10 offline: torchvision's)."""
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    make_image_folder(tmp_path / "img", classes=("cat", "hollow"), per_class=1)
    (tmp_path / "img" / "hollow" / "0.png").unlink()
    flags, names = [[s.replace("{tmp}", str(tmp_path)) for s in part] for part in BAD_INPUT[case]]
    with pytest.raises(SystemExit) if case == "flag" else contextlib.nullcontext():
        status, line = run_cli(capsys, *TINY, "--output-dir", tmp_path / "out", *flags)
    if case == "flag":
        status, line = 2, capsys.readouterr().err.strip().splitlines()[-1]
    assert status == 2
    one_line_naming(line, *names)
    assert not (tmp_path / "out").exists()


RUN_FLAGS = ["--learning-rate", "3e-4", "--ema-decay", "0.99", "--checkpoint-steps", "3",
             "--loss-type", "cos"]


def test_a_rerun_needs_resume_which_takes_the_runs_settings_and_logs_what_changes(tmp_path, small):
    """Without --resume: one line, the files as they were; `--resume auto`, only --exp-name: the
    run's settings, --max-train-steps logged as changed; bit-identical to an uninterrupted run."""
    run_main(tmp_path, *RUN_FLAGS, "--max-train-steps", "6", exp="ref")
    run_dir = run_main(tmp_path, *RUN_FLAGS, "--max-train-steps", "3")
    saved = json.loads((run_dir / "args.json").read_text())
    assert (saved["learn_sigma"], saved["align_weight"], saved["model"]) == (False, 0.5, "SiT-T/8")
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    with pytest.raises(sra.UserError) as error:
        run_main(tmp_path, *RUN_FLAGS, "--max-train-steps", "6")
    one_line_naming(str(error.value), "--resume auto", "--exp-name", run_dir)
    assert {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()} == before
    run_main(tmp_path, "--resume", "auto", "--max-train-steps", "6", base=[])  # no TINY flags
    log = read(run_dir / "log.txt")
    assert (f"resumed from {ckpt_path(run_dir, 3)} at step 3, with the run's settings; "
            f"--max-train-steps 6 (was 3)") in log
    assert_same_training_state(ckpt_path(run_dir, 6), ckpt_path(tmp_path / "ref", 6))
    assert json.loads((run_dir / "args.json").read_text())["changes"] == [
        "--max-train-steps 6 (was 3)"]


def test_resume_refuses_fixed_flags_and_unfitting_checkpoints_and_a_path_finds_its_moved_run(
        tmp_path, small, monkeypatch):
    """One line naming a fixed flag (nothing written), or an unfitting checkpoint's keys and shapes;
    `--resume PATH` alone, from elsewhere, goes on in the checkpoint's moved run folder."""
    run_dir = run_main(tmp_path, *RUN_FLAGS, "--max-train-steps", "1")
    before = sorted(run_dir.rglob("*"))
    for flags, named in [
            (["--model", "SiT-T/4"], "--model cannot change in a resumed run (it was SiT-T/8)"),
            (["--loss-type", "sml1"], "--loss-type cannot change in a resumed run (it was cos)"),
            (["--resolution", "32"], "--resolution cannot change in a resumed run (it was 16)"),
            (["--no-sra"], "--no-sra cannot change in a resumed run (it was False)")]:
        with pytest.raises(sra.UserError) as error:
            run_main(tmp_path, "--resume", "auto", *flags, base=[])
        one_line_naming(str(error.value), named, "--exp-name")
        assert sorted(run_dir.rglob("*")) == before
    ckpt = load(ckpt_path(run_dir, 1))
    del ckpt["model"]["blocks.0.attn.qkv.bias"]
    ckpt["model"]["pos_embed"] = torch.zeros(1, 9, 32)
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(sra.UserError) as error:
        run_main(tmp_path, "--resume", str(tmp_path / "edited.pt"), exp="other")
    one_line_naming(str(error.value), "edited.pt", "blocks.0.attn.qkv.bias", "pos_embed",
                    "torch.Size([1, 9, 32])")
    moved = tmp_path / "elsewhere" / "renamed"
    os.makedirs(moved.parent)
    os.rename(run_dir, moved)
    monkeypatch.chdir(tmp_path / "elsewhere")
    sra.main(sra.parse_args(["--resume", ckpt_path(moved, 1), "--max-train-steps", "2"]))
    assert "resumed from" in read(moved / "log.txt")
    assert steps_saved(moved) == [1, 2] and not (tmp_path / "elsewhere" / "exps").exists()
    assert json.loads((moved / "args.json").read_text())["model"] == "SiT-T/8"


# ==================================================================================================
# sample.py, 1. Random streams

def test_streams_are_per_sample_and_seeded():
    """Label then noise from stream_seed(seed, i); other seeds: not shifted."""
    z, y, _ = sample.sample_inputs([5, 3000], 7, 10, (3, 2, 2))
    for row, i in enumerate([5, 3000]):
        g = torch.Generator().manual_seed(sample.stream_seed(7, i))
        assert y[row] == torch.randint(10, (), generator=g)
        assert torch.equal(z[row], torch.randn((3, 2, 2), generator=g))
    z_one, _, _ = sample.sample_inputs(range(1003), 0, 4, (3, 1, 2))
    z_other, _, _ = sample.sample_inputs(range(1003), 1, 4, (3, 1, 2))
    first_values = {tuple(row) for row in z_one[:, 0, 0].tolist()}
    assert not first_values & {tuple(row) for row in z_other[:, 0, 0].tolist()}  # not shifted
    seeds = [sample.stream_seed(0, i) for i in range(100_000)]  # 32-bit, distinct, spread out
    assert len(set(seeds)) == len(seeds) and max(seeds) < 2 ** 32
    assert max(seeds[:100]) - min(seeds[:100]) > 2 ** 31  # not a run of consecutive seeds


# ==================================================================================================
# sample.py, 2. Samplers on closed-form Gaussian toys; classifier-free guidance

M, S = 0.3, 0.5  # toy data: every coordinate ~ N(M, S^2)


def gaussian_velocity(path_type):
    """Exact v(x, t) = E[d_alpha x0 + d_sigma eps | x_t] for x0 ~ N(M, S^2) per coordinate."""
    def v(x, t, t_start=None):
        alpha, sigma, d_alpha, d_sigma = (float(a) for a in sra.interpolant(
            torch.tensor(t, dtype=torch.float64), path_type))
        var = alpha ** 2 * S ** 2 + sigma ** 2  # Var(x_t)
        x0 = M + alpha * S ** 2 * (x - alpha * M) / var  # E[x0 | x_t]
        eps = sigma * (x - alpha * M) / var  # E[eps | x_t]
        return d_alpha * x0 + d_sigma * eps
    return v



class SiTRepoToy(torch.nn.Module):
    """The SiT repository's exact toy velocity (t = 0 noise, 2C outputs), Linear or GVP."""
    in_channels, num_classes, reverse_time = 1, 4, True

    def __init__(self, path_type):
        super().__init__()
        self.gvp = path_type == "GVP"
        self.dummy = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x, tau, y):
        """d/dtau of E[x_tau | x], in the SiT repository's time, and junk sigma channels."""
        h = math.pi / 2 * tau.double().view(-1, 1, 1, 1)
        a, s = (h.sin(), h.cos()) if self.gvp else (2 * h / math.pi, 1 - 2 * h / math.pi)
        d_a, d_s = (h.cos() * math.pi / 2, -h.sin() * math.pi / 2) if self.gvp else (1, -1)
        var = a ** 2 * S ** 2 + s ** 2
        x0, eps = M + a * S ** 2 * (x - a * M) / var, s * (x - a * M) / var
        return torch.cat([d_a * x0 + d_s * eps, torch.full_like(x, 7.0)], dim=1)


@pytest.mark.parametrize("path_type, sit_path", [("linear", "Linear"), ("cosine", "GVP")])
def test_samplers_reach_the_gaussian_toy(path_type, sit_path):
    """ODE exactly (Heun closer), SDE and DDPM in moments; SiT-repo networks."""

    def moment_error(x):
        """|mean - M| + |std - S| over all coordinates."""
        return abs(x.mean().item() - M) + abs(x.std().item() - S)
    z = torch.randn(20_000, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    exact = M + S * z[:2000].double()
    v = gaussian_velocity(path_type)
    err = {(heun, n): (sample.sample_ode(v, z[:2000], n, heun=heun) - exact).abs().max().item()
           for heun in (False, True) for n in (32, 128)}
    assert err[False, 128] < err[False, 32] / 3.5 and err[True, 128] < err[True, 32] / 3.5
    assert err[True, 32] < err[False, 32] / 3 and err[True, 128] < min(err[False, 128] / 10, 1e-3)
    errs = [moment_error(sample.sample_sde(v, z, n, path_type, torch.Generator().manual_seed(2)))
            for n in (10, 100)]
    assert errs[1] < errs[0] and errs[1] < 0.02, errs
    abar = ddpm_tables()["abar"]

    def eps(x, step):
        """Exact DDPM E[eps | x_t]; on the cosine run with a learned-range channel too."""
        a = abar[step]
        out = (1 - a) ** 0.5 * (x - a ** 0.5 * M) / (a * S ** 2 + 1 - a)
        return out if path_type == "linear" else torch.cat([out, torch.zeros_like(out)], dim=1)
    errs = [moment_error(sample.sample_ddpm(eps, z[:5000], n, torch.Generator().manual_seed(4)))
            for n in (50, 250, 1000)]
    assert errs[0] > errs[1] > errs[2] and errs[1] < 0.02 and errs[2] < 0.01, errs
    model, y = SiTRepoToy(sit_path), torch.zeros(20_000, dtype=torch.long)
    x = sample.generate(model, z[:2000], y[:2000], mode="ode", num_steps=100, heun=True)
    assert (x - exact).abs().max() < 1e-3
    x = sample.generate(model, z, y, mode="sde", num_steps=100, path_type=path_type,
                        generator=torch.Generator().manual_seed(6))
    assert moment_error(x) < 0.02


def test_sde_and_ddpm_steps_by_hand():
    """SDE: REPA's grid 1, 0.52, 0.04, 0, w = 2t, the last step noiseless; DDPM: DiT's respacing
    for every K, steps fed as ints, "fixed large" variance."""
    exact = gaussian_velocity("cosine")
    velocity = mock.Mock(side_effect=exact)  # a recording stub
    x = torch.randn(6, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample.sample_sde(velocity, x, 3, "cosine", torch.Generator().manual_seed(1))
    seen = [call.args for call in velocity.call_args_list]
    noise = torch.Generator().manual_seed(1)
    grid = [1.0, 0.52, 0.04, 0.0]
    assert [t for _, t in seen] == pytest.approx(grid[:3], abs=1e-12)
    states = [x for x, _ in seen] + [out]
    for i in range(3):
        t, dt, state = grid[i], grid[i + 1] - grid[i], states[i]
        alpha, sigma = math.cos(math.pi / 2 * t), math.sin(math.pi / 2 * t)
        score = -(state - alpha * M) / (alpha ** 2 * S ** 2 + sigma ** 2)
        expected = state + (exact(state, t) - t * score) * dt
        if i < 2:  # (the noise is drawn in float32)
            expected += math.sqrt(2 * t) * math.sqrt(-dt) * torch.randn(x.shape, generator=noise)
        assert torch.allclose(states[i + 1], expected, atol=1e-10), i

    def dit_steps(K, T=1000):
        """DiT's space_timesteps(T, [K]): a float stride added up step by step, each sum rounded."""
        stride = (T - 1) / (K - 1) if K > 1 else 1
        position, steps = 0.0, []
        for _ in range(K):
            steps.append(round(position))
            position += stride
        return steps
    base = sra.GaussianDiffusion.linear()
    for K in range(1, 1001):
        assert sample.respace(base, K).timestep_map == dit_steps(K), K
    respaced = sample.respace(base, 21)  # one of the counts where round(i * 999 / 20) differs
    abar = torch.from_numpy(ddpm_tables()["abar"])
    assert torch.allclose(respaced.alphas_cumprod, abar[dit_steps(21)], rtol=1e-12)
    fed = []

    def eps_model(x, step):
        fed.append(step)
        return 0.3 * x + 0.1
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample.sample_ddpm(eps_model, x, 2, torch.Generator().manual_seed(1))
    assert fed == [999, 0] and all(type(step) is int for step in fed)
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).double()
    a999, a0 = abar[999].item(), abar[0].item()
    beta = 1 - a999 / a0  # the respaced step from 999 to 0
    x0 = (x - math.sqrt(1 - a999) * (0.3 * x + 0.1)) / math.sqrt(a999)
    mean = beta * math.sqrt(a0) / (1 - a999) * x0 + (1 - a0) * math.sqrt(1 - beta) / (1 - a999) * x
    x1 = mean + math.sqrt(beta) * z
    expected = (x1 - math.sqrt(1 - a0) * (0.3 * x1 + 0.1)) / math.sqrt(a0)  # step 0: x0 itself
    assert torch.allclose(out, expected, atol=1e-10)
    fed.clear()
    sample.sample_ddpm(eps_model, x, 10, torch.Generator().manual_seed(1))
    assert fed == dit_steps(10)[::-1]


def test_cfg_interval_formula_and_null_label():
    """Guided steps start in [low, high]; eps = u + w (c - u); DiT's variance c."""
    calls = []

    def record(module, inputs):
        """A forward pre-hook: logs (batch size, t, labels) of every network call."""
        calls.append((len(inputs[0]), inputs[1][0].item(), inputs[2].tolist()))
    model = tiny_named()
    model.register_forward_pre_hook(record)
    z, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 3])
    sample.generate(model, z, y, mode="ode", num_steps=10, heun=True, cfg_scale=2.0,
                    guidance_low=0.25, guidance_high=0.65)  # bounds off the time grid
    grid = [1 - i / 10 for i in range(11)]
    expected = [(start, t) for start, t_next in zip(grid[:9], grid[1:])
                for t in (start, t_next)] + [(0.1, 0.1)]
    assert len(calls) == len(expected) == 19  # Heun: two calls a step, one on the last step
    for (n, t, labels), (start, t_call) in zip(calls, expected):
        inside = 0.25 <= start <= 0.65
        assert n == (6 if inside else 3) and abs(t - t_call) < 1e-6, (n, t, start)
        assert labels == ([0, 1, 3, 4, 4, 4] if inside else [0, 1, 3])
    calls.clear()  # the interval is closed: the default [0, 1] guides every step, t = 1 too
    sample.generate(model, z, y, mode="ode", num_steps=4, cfg_scale=2.0)
    assert [(n, t) for n, t, _ in calls] == [(6, 1.0), (6, 0.75), (6, 0.5), (6, 0.25)]
    calls.clear()
    sample.generate(model, z, y, mode="ode", num_steps=4, cfg_scale=1.0, guidance_low=0.2)
    assert [(n, labels) for n, _, labels in calls] == [(3, [0, 1, 3])] * 4
    model = tiny_named("DiT-T/4")  # guided eps = u + w (c - u) on every data channel
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 2])
    cond = model(x.float(), torch.full((2,), 500.0), y).double()
    uncond = model(x.float(), torch.full((2,), 500.0), torch.full_like(y, 4)).double()
    out = sample.model_fn(model, y, cfg_scale=3.0, ddpm=True)(x, 500)
    assert torch.allclose(out[:, :3], uncond[:, :3] + 3 * (cond[:, :3] - uncond[:, :3]), atol=1e-5)
    assert torch.allclose(out[:, 3:], cond[:, 3:], atol=1e-6)
    calls.clear()
    model.register_forward_pre_hook(record)
    sample.generate(model, x.float(), y, mode="ddpm", num_steps=20, cfg_scale=2.0,
                    guidance_high=0.5)
    assert all((n == 4) == (t <= 500) for n, t, _ in calls)


# ==================================================================================================
# sample.py, 3. Checkpoints of every layout

def backbone(state):
    """A state dict without the SRA/REPA projectors (training only)."""
    return {k: v for k, v in state.items() if not k.startswith(("ap_head.", "projectors."))}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoint files of each layout, with the networks they should load into."""
    d = tmp_path_factory.mktemp("ckpts")
    raw, ema = tiny_named(seed=1), tiny_named(seed=2)
    dit = tiny_named("DiT-T/4", seed=3)
    sit_raw = tiny_named("SiT-T/4", seed=4, learn_sigma=True)
    sit_ema = tiny_named("SiT-T/4", seed=6, learn_sigma=True)
    nonull = tiny_named("DiT-T/4", seed=5, class_dropout_prob=0.0)  # no null row: CFG impossible
    projector = {"ap_head.linear1.weight": torch.randn(384, 192)}  # SRA's projector
    projectors = {"projectors.0.0.weight": torch.randn(8, 192)}  # REPA's
    namespace = argparse.Namespace(model="SiT-T/4", path_type="cosine", num_classes=4, resolution=8,
                                   encoder_depth=3, prediction="v")  # the official trainers'
    ours = dict(model="SiT-T/4", path_type="linear", num_classes=4, resolution=8)  # sra.py's args
    files = {  # key -> (checkpoint, the network it holds)
        "ours": (dict(model={**raw.state_dict(), **projector}, ema=ema.state_dict(), opt={},
                      scaler={}, args=ours, step=2, epoch=0, rng=[]), ema),
        "official_sra": (dict(model=raw.state_dict(), ema={**raw.state_dict(), **projector},
                              opt={}, args=namespace, steps=5), raw),
        "official_repa": (dict(model={**raw.state_dict(), **projectors}, opt={}, args=namespace,
                               ema={**raw.state_dict(), **projectors}, steps=5), raw),
        "ema_only": (dict(ema=raw.state_dict()), raw),  # e.g. a released file keeping the EMA
        "dit_bare": (dit.state_dict(), dit),
        "sit_bare": (sit_ema.state_dict(), sit_ema),
        "dit_no_null": (dict(model=nonull.state_dict(), ema=nonull.state_dict(), opt={}, step=1,
                             args={**ours, "model": "DiT-T/4", "cfg_prob": 0.0}), nonull),
        "latent": (tiny_named("SiT-T/4", input_size=4, in_channels=4).state_dict(), None),
        "edm_path": (dict(ema=ema.state_dict(), args={**ours, "path_type": "edm"}), None),
        "foreign": ({"weights": {"w": torch.ones(2)}, "note": "hello"}, None),
        "unsafe": ({"ema": {}, "args": SimpleNamespace()}, None),  # weights_only refuses it
        "short": ({k: v for k, v in dit.state_dict().items() if "blocks.5." not in k}, None),
    }
    for key, path_type, prediction in [("sit_repo_linear", "Linear", "velocity"),
                                       ("sit_repo_gvp", "GVP", "velocity"),
                                       ("sit_repo_score", "Linear", "score")]:
        args = argparse.Namespace(model="SiT-T/4", image_size=64, num_classes=4, cfg_scale=4.0,
                                  path_type=path_type, prediction=prediction)  # the SiT repo's
        files[key] = (dict(model=sit_raw.state_dict(), ema=sit_ema.state_dict(), args=args),
                      sit_ema)
    for key, (obj, expected) in files.items():
        torch.save(obj, d / f"{key}.pt")
        files[key] = (str(d / f"{key}.pt"), expected)
    (d / "corrupt.pt").write_bytes((d / "dit_bare.pt").read_bytes()[:5000])  # cut short
    files["corrupt"] = (str(d / "corrupt.pt"), None)
    files["ours_raw"] = (files["ours"][0], raw)  # --use-raw-model: `model`, without projector
    return files


LAYOUTS = {  # key -> (flags, expected family, path type, SiT-repository time)
    "ours": ([], "SiT", "linear", False),
    "ours_raw": (["--use-raw-model"], "SiT", "linear", False),
    "official_sra": (["--model", "SiT-T/4"], "SiT", "cosine", False),
    "official_repa": ([], "SiT", "cosine", False),
    "ema_only": (["--model", "SiT-T/4"], "SiT", "linear", False),
    "dit_bare": (["--model", "DiT-T/4"], "DiT", "linear", False),
    "sit_bare": (["--model", "SiT-T/4"], "SiT", "linear", True),
    "sit_repo_linear": ([], "SiT", "linear", True),
    "sit_repo_gvp": ([], "SiT", "cosine", True),
}


@pytest.mark.parametrize("key", list(LAYOUTS))
def test_checkpoint_layouts_load_and_sample(key, ckpts, tmp_path, monkeypatch):
    """Strictly, no projector, mmap, weights_only; SiT-repo time reversed."""
    path, expected = ckpts[key]
    flags, family, path_type, reverse = LAYOUTS[key]
    args = sample.parse_args(["--ckpt", path, *flags])
    load = mock.Mock(wraps=torch.load)  # a recording stub
    monkeypatch.setattr(torch, "load", load)
    model, info = sample.load_model(path, args.model, args.use_raw_model)
    assert load.call_args.kwargs == dict(map_location="cpu", weights_only=True, mmap=True)
    assert (info["family"], info["path_type"], model.reverse_time) == (family, path_type, reverse)
    assert (model.num_classes, model.input_size) == (4, 8)
    torch.testing.assert_close(model.state_dict(), backbone(expected.state_dict()), rtol=0, atol=0)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 3])
    velocity = sample.model_fn(model, y)(x.double(), 0.2)
    f = model(x, torch.full((2,), 0.8 if reverse else 0.2), y)[:, :3].double()
    assert torch.allclose(velocity, -f if reverse else f, atol=1e-6)
    assert sample_cli(path, tmp_path, "--grid", "--num-steps", 3, "--cfg-scale", 2, *flags) == 0


# ==================================================================================================
# sample.py, 4. Output: images, the .npz and its resume, grids

def test_images_decode_scaled_latents_in_chunks_and_round_to_uint8():
    """Latents / 0.18215, decoded 32 at a time (~128 pass 2^31 elements); uint8 rounds, clamps."""
    levels = torch.tensor([-1.2, -1.0, 10.6 / 127.5 - 1, 200.4 / 127.5 - 1, 1.0, 1.5])
    x = levels.view(1, 1, 2, 3).repeat(2, 3, 1, 1)
    assert sample.to_images(x)[0, :, :, 0].ravel().tolist() == [0, 0, 11, 200, 255, 255]
    inputs = []

    def decode(z):
        """The SD-VAE's decoder: records its input, returns 3 of its channels."""
        inputs.append(z)
        return SimpleNamespace(sample=z[:, :3])
    z = torch.randn(70, 4, 2, 3) * 0.18215
    images = sample.to_images(z, SimpleNamespace(decode=decode))
    assert [len(chunk) for chunk in inputs] == [32, 32, 6]
    assert torch.allclose(torch.cat(inputs), z / 0.18215)
    expected = ((z[:, :3] / 0.18215 + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1)
    assert np.array_equal(images, expected.to(torch.uint8).numpy())


def npz_of(folder):
    """(images, labels) of the single .npz in a sample folder."""
    (path,) = glob.glob(os.path.join(folder, "*.npz"))
    with np.load(path) as data:
        return data["arr_0"], data["arr_1"]


def sample_cli(ckpt, out, *extra):
    """sample.py's command line, 8 steps, into `out`."""
    return sample.cli(["--ckpt", ckpt, "--sample-dir", str(out), "--num-steps", "8",
                       *map(str, extra)])


def euler_by_hand(net, z, y, steps):
    """Euler for dx/dt = net(x, t, y), t = 1 -> 0, in float64 (the net float32) -> uint8 images."""
    x = z.double()
    with torch.no_grad():
        for i in range(steps):
            x = x - net(x.float(), torch.full((len(x),), 1 - i / steps), y).double() / steps
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def test_npz_holds_the_samples_of_the_streams_with_pngs_and_a_preview(ckpts, tmp_path, capsys):
    """ADM's .npz from Euler on the EMA; --save-png; a preview; a name per setting."""
    flags = ("--num-fid-samples", 10, "--per-proc-batch-size", 4, "--mode", "ode", "--num-steps", 3)
    assert sample_cli(ckpts["ours"][0], tmp_path, *flags, "--save-png") == 0
    images, labels = npz_of(tmp_path)
    z, y, _ = sample.sample_inputs(range(10), 0, 4, (3, 8, 8))
    assert images.dtype == np.uint8 and labels.dtype == np.int64 and np.array_equal(labels, y)
    expected = euler_by_hand(ckpts["ours"][1], z, y, 3).numpy()
    assert np.abs(images.astype(int) - expected).max() <= 1  # (batching: a last-bit rounding)
    assert (images != expected).mean() < 1e-3 and images.std() > 0
    (npz,) = glob.glob(str(tmp_path / "*.npz"))
    stem = npz[:-len(".npz")]
    assert sorted(glob.glob(f"{tmp_path}/*")) == [stem + end for end in ("", ".npz", ".png")]
    pngs = sorted(glob.glob(os.path.join(stem, "png", "*.png")))
    assert [os.path.basename(p) for p in pngs] == [f"{i:06d}.png" for i in range(10)]
    assert all(np.array_equal(np.asarray(Image.open(p)), image) for p, image in zip(pngs, images))
    assert np.array_equal(np.asarray(Image.open(stem + ".png"))[:8, :8 * 8], np.concatenate(
        images[:8], axis=1))  # the first row of the preview: samples 0-7
    out = capsys.readouterr().out
    assert f"wrote {npz}" in out and f"wrote 10 PNGs to {stem}/png" in out
    assert sample_cli(ckpts["ours"][0], tmp_path, *flags, "--heun") == 0  # another setting
    assert len(glob.glob(str(tmp_path / "*.npz"))) == 2


@slow
def test_same_npz_from_one_and_two_processes(ckpts, tmp_path):
    """Per-sample streams and batches cut at index multiples: 1 or 2 processes, the same .npz."""
    flags = ["--num-fid-samples", "10", "--per-proc-batch-size", "2"]
    assert sample_cli(ckpts["ours"][0], tmp_path / "one", *flags) == 0
    flags += ["--ckpt", ckpts["ours"][0], "--sample-dir", str(tmp_path / "two"), "--num-steps", "8"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*torchrun, "sample.py", *flags], cwd=HERE, env=ENV, text=True,
                          capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = npz_of(tmp_path / "one"), npz_of(tmp_path / "two")
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])


@pytest.mark.parametrize("fails", ["part", "npz", "lost"])
def test_failed_writes_then_rerun_resumes(fails, ckpts, tmp_path, capsys, monkeypatch):
    """ENOSPC or a bad read-back: one line, parts kept; rerun: as uninterrupted."""
    ckpt, flags = ckpts["ours"][0], ("--num-fid-samples", 10, "--per-proc-batch-size", 4)
    writes_left = [1] * (1 if fails == "part" else 3)  # the first part, or all three
    done = ["0000000-0000004.npz", "0000004-0000008.npz", "0000008-0000010.npz"][:len(writes_left)]
    savez = np.savez

    def savez_until_the_disk_is_full(file, *args, **kwargs):
        """np.savez: `writes_left` files, then a full disk's half-written failure, or a loss."""
        if not writes_left and fails == "lost":
            return savez(file, arr_0=kwargs["arr_0"][:-1], arr_1=kwargs["arr_1"])
        if not writes_left:
            file.write(b"PK\x03\x04")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        writes_left.pop()
        return savez(file, *args, **kwargs)
    monkeypatch.setattr(np, "savez", savez_until_the_disk_is_full)
    assert sample_cli(ckpt, tmp_path, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the progress bar)
    (parts,) = glob.glob(str(tmp_path / "*-parts"))
    assert sorted(os.listdir(parts)) == done
    failed = os.path.join(parts, "0000004-0000008.npz") if fails == "part" else parts[:-6] + ".npz"
    what = "part file" if fails == "part" else ".npz"
    reason = "it does not read back as written" if fails == "lost" else os.strerror(errno.ENOSPC)
    assert err == f"error: cannot write {what} {failed}: {reason}"
    assert not glob.glob(str(tmp_path / "**" / "*.tmp"), recursive=True)
    monkeypatch.undo()
    assert sample_cli(ckpt, tmp_path, *flags) == 0
    assert f"{3 - len(done)} of 3 batches to make" in capsys.readouterr().out
    assert not os.path.exists(parts)
    assert sample_cli(ckpt, tmp_path / "ref", *flags) == 0
    assert all(np.array_equal(a, b) for a, b in zip(npz_of(tmp_path), npz_of(tmp_path / "ref")))
    (npz,) = glob.glob(str(tmp_path / "*.npz"))
    stamp = os.stat(npz).st_mtime_ns
    assert sample_cli(ckpt, tmp_path, *flags) == 0
    assert f"{npz} already exists" in capsys.readouterr().out and os.stat(npz).st_mtime_ns == stamp


def test_grid_columns_classes_and_seeds(trained, ckpts, tmp_path, capsys, monkeypatch):
    """Euler on the EMA from --global-seed's streams, 8 rows, column c of class c; the full path."""
    ckpt = str(trained / "checkpoints" / "0000030.pt")
    net = sra.MODELS["SiT-T/8"](input_size=16, in_channels=3, num_classes=10)
    net.load_state_dict(backbone(torch.load(ckpt, weights_only=True)["ema"]))
    monkeypatch.chdir(tmp_path)
    for ckpt, net, k, size, seed in [(ckpt, net.eval(), 10, 16, 0), (*ckpts["ours"], 4, 8, 1)]:
        argv = ["--ckpt", ckpt, "--grid", "--num-steps", "4", "--mode", "ode", "--cfg-scale", "1"]
        assert sample.cli(argv + ["--sample-dir", "out", "--global-seed", str(seed)]) == 0
        path = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("wrote ")
        assert os.path.dirname(path) == str(tmp_path / "out") and path.endswith("-grid.png")
        grid = np.asarray(Image.open(path))
        z, _, _ = sample.sample_inputs(range(8 * k), seed, k, (3, size, size))
        expected = euler_by_hand(net, z, torch.arange(k).repeat(8), 4).numpy()
        tiles = grid.reshape(8, size, k, size, 3).transpose(0, 2, 1, 3, 4).reshape(expected.shape)
        assert np.abs(tiles.astype(int) - expected).max() <= 1 and grid.std() > 0


# ==================================================================================================
# sample.py, 5. Command line

def test_sampler_defaults_and_help(capsys, monkeypatch):
    """SiT: SDE 250; grid: 50, CFG 4; given flags win; DiT: DDPM; --help."""
    sit, dit = dict(family="SiT", path_type="cosine"), dict(family="DiT", path_type="linear")
    fid = dict(mode="sde", num_steps=250, path_type="cosine", cfg_scale=1.0, guidance_low=0.0,
               guidance_high=1.0, heun=False)  # a SiT's, for FID; the other cases change:
    given = ["--cfg-scale", "1.8", "--guidance-low", "0.1", "--guidance-high", "0.7"]
    chosen = dict(cfg_scale=1.8, guidance_low=0.1, guidance_high=0.7)  # what the flags give
    for flags, info, changes in [([], sit, {}), (["--grid"], sit, dict(num_steps=50, cfg_scale=4)),
                                 (["--grid", "--cfg-scale", "1"], sit, dict(num_steps=50)),
                                 (given, sit, chosen),
                                 ([], dit, dict(mode="ddpm", path_type="linear"))]:
        args = sample.parse_args(["--ckpt", "c.pt", *flags])
        assert sample.sampler_settings(args, info, tiny_named()) == {**fid, **changes}, flags
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    text = capsys.readouterr().out
    groups = re.findall(r"^(\S[^\n]*):$", text, flags=re.M)
    assert groups == ["options", "checkpoint", "sampler", "output"]
    entries = {e.split()[0]: " ".join(e.split()) for e in re.split(r"\n(?=  -)", text)[1:]}
    assert all(e.count("(default") <= 1 for e in entries.values()) and "(default: None)" not in text
    assert entries["--num-steps"].endswith("(default: 250; 50 with --grid)")
    assert entries["--cfg-scale"].endswith("(default: 1 = off; 4 with --grid)")


BAD = {  # name -> (checkpoint key or path, extra flags, expected message)
    "corrupt": ("corrupt", [], "cannot load checkpoint"),
    "unsafe": ("unsafe", [], "refusing to load"),
    "foreign": ("foreign", [], "holds no DiT/SiT weights under 'ema'"),
    "bare_without_model": ("dit_bare", [], "needs --model, one of SiT-T/2"),
    "does_not_fit": ("short", ["--model", "DiT-T/4"], "does not fit DiT-T/4: Missing key(s)"),
    "model_disagrees": ("ours", ["--model", "SiT-B/4"], "holds a SiT-T/4; --model says SiT-B/4"),
    "ema_only_raw": ("ema_only", ["--model", "SiT-T/4", "--use-raw-model"], "under 'model'"),
    "sit_repo_score": ("sit_repo_score", [], "path type 'Linear', prediction 'score': only"),
    "unknown_path_type": ("edm_path", [], "path type 'edm'"),
    "dit_with_sde": ("dit_bare", ["--model", "DiT-T/4", "--mode", "sde"], "use --mode ddpm"),
    "sit_with_ddpm": ("ours", ["--mode", "ddpm"], "use --mode sde or ode"),
    "ddpm_steps": ("dit_bare", ["--model", "DiT-T/4", "--num-steps", "1001"], "between 1 and 1000"),
    "cfg_without_null_label": ("dit_no_null", ["--cfg-scale", "2"], "no null label"),
    "resolution": ("ours", ["--resolution", "256"], "makes 8px images"),
    "latent_without_diffusers": ("latent", ["--model", "SiT-T/4"], "pip install diffusers"),
    "unwritable_sample_dir": ("ours", ["--sample-dir", "/dev/null/out"], "Not a directory"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_sample_bad_input_is_one_line_and_exit_2(name, ckpts, tmp_path, capsys, monkeypatch):
    """Naming the problem, and the checkpoint by its full path (given relative)."""
    for module in ("diffusers", "diffusers.models"):  # as on a machine without diffusers
        monkeypatch.setitem(sys.modules, module, None)
    ckpt, extra, message = BAD[name]
    ckpt = os.path.relpath(ckpts[ckpt][0])
    assert sample.cli(["--ckpt", ckpt, "--grid", "--sample-dir", str(tmp_path), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    named = [word for word in err.split() if os.path.basename(ckpt) in word]
    assert all(word.startswith(os.path.abspath(ckpt)) for word in named), err


# ==================================================================================================
# Fake CUDA: the SRA step's forward and every sampler on tensors that say "cuda" (issue 33)
#
# FakeTensorMode's tensors carry a device, shape and dtype but no data, and fail where a GPU would:
# a CPU tensor (other than a 0-d scalar) meeting a CUDA one. So CI, without a GPU, catches a table
# or a noise draw left on the CPU. Backward, autocast and host reads (.item()) do not run there.
# torch.Generator("cuda") cannot be made without a GPU: the step and the samplers get
# generator=None (the global stream, on the input's device), which their APIs allow.

def fake_cuda_step(name, mode):
    """A tiny student and EMA teacher on a fake GPU, one SRA step forward -> teacher, y, losses."""
    args = sra.parse_args(["--model", name, "--mixed-precision", "no"])
    spec = dict(input_size=8, in_channels=4, num_classes=5, class_dropout_prob=args.cfg_prob)
    # Made on the device: Module.to() cannot move fake tensors (it swaps each parameter, and the
    # mode holds a weakref to every fake tensor). Only construction sees a default device.
    with mode, torch.device("cuda"):
        model = sra.MODELS[name](**spec, projector=True)
        ema = sra.MODELS[name](**spec).requires_grad_(False).eval()
    with mode:
        x = torch.randn(3, 4, 8, 8, device="cuda")  # (N, C, H, W) latents
        y = torch.randint(5, (3,), device="cuda")
        diffusion = sra.GaussianDiffusion.linear(device="cuda") if name.startswith("DiT") else None
        losses = sra.training_losses(model, ema, x, y, args, diffusion, None)
    return ema, y, losses


def test_fake_cuda_sra_step_and_guided_samplers_stay_on_the_gpu(monkeypatch):
    """The SRA step's losses and the guided samplers' states stay on the fake GPU; DiT's tables
    left on the CPU fail there, as on a GPU."""

    def in_mode(mode, function):
        """`function` run under the fake mode, for a sampler that runs outside it."""
        def run(*args, **kwargs):
            """Call `function` with the mode active."""
            with mode:
                return function(*args, **kwargs)
        return run
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    sit, y, sit_losses = fake_cuda_step("SiT-T/2", mode)
    dit, _, dit_losses = fake_cuda_step("DiT-T/2", mode)
    for loss in sit_losses + dit_losses:  # denoising loss, alignment loss, mean cosine
        assert isinstance(loss, FakeTensor) and loss.device.type == "cuda" and loss.shape == ()
    with mode:  # 3 steps from t = 1 run both branches of model_fn: unguided, then guided
        z = torch.randn(3, 4, 8, 8, device="cuda")
        velocity = in_mode(mode, sample.model_fn(sit, y, cfg_scale=1.8, guidance_high=0.7))
        eps = sample.model_fn(dit, y, cfg_scale=1.8, guidance_high=0.7, ddpm=True)
        outputs = [sample.sample_ddpm(eps, z, 3, generator=None)]  # steps 999, 500, 0
    # The ODE and the SDE read their time grid on the host (.tolist(), .item()), which a fake
    # tensor cannot: they run outside the mode, the network and the noise inside it
    outputs += [sample.sample_ode(velocity, z, 3), sample.sample_ode(velocity, z, 3, heun=True)]
    monkeypatch.setattr(sample, "randn_like", in_mode(mode, sample.randn_like))
    # The SDE's grid is real: its 0-d CPU scalars are let in (CUDA takes them too); any larger
    # CPU tensor still fails on the device check
    monkeypatch.setattr(mode, "allow_non_fake_inputs", True)
    outputs.append(sample.sample_sde(velocity, z, 3, generator=None))
    for x in outputs:
        assert isinstance(x, FakeTensor) and x.device.type == "cuda" and x.shape == (3, 4, 8, 8)

    def linear_on_cpu(num_timesteps=1000, device="cpu"):
        """Issue 33's slip: DiT's DDPM tables on the CPU, whatever the device asked for."""
        return sra.GaussianDiffusion(torch.linspace(1e-4, 0.02, num_timesteps, dtype=torch.double))
    monkeypatch.setattr(sra.GaussianDiffusion, "linear", linear_on_cpu)
    with pytest.raises(RuntimeError, match="devices"):
        fake_cuda_step("DiT-T/2", FakeTensorMode(allow_non_fake_inputs=False))


# ==================================================================================================
# The README and figures/: every recipe runs as written, every figure comes from its script

def commands(text):
    """The python/torchrun/pip commands of a text's ```bash blocks (or all of it) -> word lists."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S) or [text]
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines
            if line.split()[:1] in (["python"], ["torchrun"], ["pip"])]


def test_readme_recipes_parse_sample_their_last_checkpoint_and_the_first_screen_is_true(tmp_path):
    """Each `sample.py --ckpt exps/NAME/checkpoints/STEP.pt` names the step where NAME stops; the
    first screen installs, runs compare.py's DEMO, shows its grid, tests as .ci/run."""
    text = pathlib.Path(HERE, "README.md").read_text()
    sizes = {None: 50_000, "data/cifar10": 50_000, "data/subset256": 130_000}
    stops, named = {}, []  # --exp-name -> its last step; (name, step) of each sample.py --ckpt
    for words in [words for doc in (text, sra.__doc__, sample.__doc__) for words in commands(doc)]:
        if "sample.py" in words:
            args = sample.parse_args(words[words.index("sample.py") + 1:])
            named += re.findall(r"exps/(.+)/checkpoints/(\d{7})\.pt$", args.ckpt)
        elif "sra.py" in words:
            args = sra.parse_args(words[words.index("sra.py") + 1:])
            batches = sizes.get(args.data_dir, 1_281_167) // args.batch_size
            if not (args.encode or args.bench or args.resume or "torchrun" in words):
                stops[args.exp_name] = sra.run_length(
                    args, batches // args.gradient_accumulation_steps)
    assert len(named) >= 4  # the demo (README and sra.py's docstring), the subset, CIFAR-10
    assert all(stops.get(name) == int(step) for name, step in named), (named, stops)
    first = "\n".join(text.splitlines()[:30])
    lines = [" ".join(words) for words in commands(first)]
    import compare
    assert lines == ["pip install -r requirements.txt",
                     " ".join(["python", "sra.py", *compare.DEMO, "--exp-name", "demo"]),
                     "python sample.py --ckpt exps/demo/checkpoints/0001500.pt --grid",
                     "python -m pytest -q test_sra.py"]
    assert "--index-url" in first and re.search(r"!\[[^\]]*\]\(figures/demo-grid\.png\)", first)
    assert lines[3] + "\n" in pathlib.Path(HERE, ".ci", "run").read_text()
    table = text[text.index("| part of the method |"):text.index("The training loop")]
    for row in table.strip().splitlines()[2:]:  # the last column: `name`, `Class.method`
        for dotted in re.findall(r"`([\w.]+)`", row.split("|")[-2]):
            assert functools.reduce(getattr, dotted.split("."), sra), dotted
    results = json.loads(pathlib.Path(HERE, "figures", "compare-results.json").read_text())
    assert compare.table(results) in text
    compare.plot(results, tmp_path / "figure.png")
    assert Image.open(tmp_path / "figure.png").size == (1200, 420)


def test_shape_score_by_grid_column_and_the_frechet_distance_closed_form(tmp_path):
    """Column c asks for class c; FID on covariances that do not commute, and on a singular one."""
    import compare
    import shapes

    def first_row_classifier(x):
        """Stands in for the shape classifier: the class is the brightest of the first row."""
        return x[:, 0, 0, :10]
    grid = np.zeros((3 * 32, 10 * 32, 3), np.uint8)
    wrong = {(0, 3): 1, (2, 5): 6, (1, 9): 0}  # (row, column): the class drawn there
    for row, column in np.ndindex(3, 10):
        grid[32 * row, 32 * column + wrong.get((row, column), column)] = 255
    Image.fromarray(grid).save(tmp_path / "grid.png")
    score = shapes.score(tmp_path / "grid.png", first_row_classifier)
    assert np.allclose(score, (14 / 15, 13 / 15))
    # tr (S1^1/2 S2 S1^1/2)^1/2 = sqrt(tr S1 S2 + 2 sqrt(det S1 det S2)), not tr(S1^1/2 S2^1/2)
    s1, s2 = np.array([[3.0, 0.0], [0.0, 0.2]]), np.array([[1.0, 0.9], [0.9, 1.0]])
    m1, m2 = np.array([0.5, -1.0]), np.array([0.0, 2.0])
    root = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = 0.25 + 9 + np.trace(s1) + np.trace(s2) - 2 * root
    assert np.isclose(compare.frechet_distance(m1, s1, m2, s2), expected, rtol=1e-12)
    assert np.isclose(compare.frechet_distance(m2, s2, m1, s1), expected, rtol=1e-12)
    few = compare.statistics_of(np.random.default_rng(0).normal(size=(4, 6)))  # rank 3 in 6 dims
    assert abs(compare.frechet_distance(*few, *few)) < 1e-6


def test_demo_figures_from_a_run_and_its_grid(trained, tmp_path, capsys):
    """figures/demo.py: the grid doubled (2 x 2 blocks, 128 colours), the loss plot, captions."""
    assert sample.cli(["--ckpt", str(trained / "checkpoints" / "0000030.pt"), "--grid",
                       "--num-steps", "4", "--sample-dir", str(tmp_path)]) == 0
    (grid,) = tmp_path.rglob("*grid*.png")
    import demo
    import shapes
    shapes.load(str(tmp_path / "classifier.pt"), steps=30, batch=16)
    demo.main(["--run", str(trained), "--grid", str(grid), "--out", str(tmp_path),
               "--classifier", str(tmp_path / "classifier.pt")])
    original = np.asarray(Image.open(grid).convert("RGB")).astype(int)
    copied = np.asarray(Image.open(tmp_path / "demo-grid.png").convert("RGB")).astype(int)
    assert copied.shape == (2 * original.shape[0], 2 * original.shape[1], 3)
    assert np.array_equal(copied[::2, ::2], copied[1::2, 1::2])  # each pixel a 2 x 2 block
    assert np.corrcoef(copied[1::2, 1::2].ravel(), original.ravel())[0, 1] > 0.9  # 128 colours
    assert Image.open(tmp_path / "demo-loss.png").size == (1000, 360)
    log = metrics(trained)
    out = capsys.readouterr().out
    assert re.search(r"names \d+\.\d% of the filled shapes and \d+\.\d% of the outlines", out)
    assert f"loss {log[0]['gen_loss']:.3f} at step 1, {log[-1]['gen_loss']:.3f} at step 30" in out


@slow
def test_compare_quick_trains_scores_plots_and_resumes(tmp_path):
    """compare.py --quick: 3 runs scored at steps 2, 4, plotted; rerun: trains none; resumes."""
    out = tmp_path / "quick"
    command = [sys.executable, f"{HERE}/figures/compare.py", "--quick", "--out", str(out)]
    first = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == [2, 4] and results["num_samples"] == 16
    for variant, flags in (("sra", [False, 4]), ("vanilla", [True, 4]), ("self", [False, 1])):
        args = json.loads((out / f"{variant}-seed0" / "args.json").read_text())
        assert [args["no_sra"], args["block_out_t"], args["batch_size"]] == flags + [4]
        assert np.isfinite(results["fd"][variant]["mean"]).all()
    assert Image.open(out / "sra-vs-vanilla.png").size == (1200, 420)
    checkpoints = {path: path.stat().st_mtime_ns for path in out.glob("*/checkpoints/*.pt")}
    second = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert second.returncode == 0 and "[train]" not in second.stdout
    assert checkpoints == {path: path.stat().st_mtime_ns for path in checkpoints}
    os.remove(out / "sra-seed0" / "checkpoints" / "0000004.pt")
    third = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert third.returncode == 0 and third.stdout.count("[train]") == 1
    assert re.search(r"resumed from \S*0000002\.pt", (out / "sra-seed0.out").read_text())
    assert json.loads((out / "results.json").read_text()) == results
