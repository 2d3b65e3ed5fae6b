"""Tests for sra.py, sample.py and the README's figures: CPU only, tiny configs, seeded.

    python -m pytest -q test_sra.py                 # everything (CI): a few minutes on 2 cores
    python -m pytest -q test_sra.py -m "not slow"   # the unit tests, under a minute: after an edit

`slow` marks the tests that start processes: torchrun, signals to every pid, real write failures,
the figure script. Sections follow the files they guard, in their order: sra.py (embedders, the
transformer, objectives, the SRA term, data, helpers, the training loop, fault tolerance, the
command line), then sample.py, then the README and figures/. Each expected value comes from
somewhere else than the code under test: a closed form, a hand computation here, a recording stub,
a published number (the SRA, DiT and SiT papers and their official code). `python .ci/mutants.py`
applies one-line slips to a copy of the code and reports the ones these tests let through.
"""
import argparse
import ast
import errno
import fcntl
import functools
import gc
import glob
import importlib.util
import json
import math
import os
import pty
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import sample
import sra

# The `slow` marker, registered here rather than in a pytest.ini (the repository keeps its top level
# to its five files). Outside pytest (a script that imports this file) there is nothing to register.
if getattr(pytest.mark, "_config", None) is not None:
    pytest.mark._config.addinivalue_line("markers", "slow: starts processes (-m 'not slow' skips)")
slow = pytest.mark.slow


# ==================================================================================================
# Shared helpers and fixtures

HERE = os.path.dirname(os.path.abspath(sra.__file__))
SRA = os.path.join(HERE, "sra.py")
# One thread per process: the runs of a test compare bit for bit, and the tests share two cores.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE)
# A 6-block, 192-wide model on 16 px images (2 x 2 tokens): tens of milliseconds per step.
TINY = ["--model", "SiT-T/8", "--resolution", "16", "--batch-size", "2", "--num-workers", "0",
        "--log-every", "1"]
# The same on pre-encoded latents of 32 px images (4 x 4 x 4), 2 x 2 tokens
LATENT_FLAGS = ["--model", "SiT-T/2", "--resolution", "32", "--batch-size", "2", "--num-workers",
                "0", "--log-every", "1"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: tiny tensors run faster, and a busy CI machine does not make threads
    spin. Also puts back the SIGTERM handler that sra.main installs."""
    threads = torch.get_num_threads()
    handler = signal.getsignal(signal.SIGTERM)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    signal.signal(signal.SIGTERM, handler)


@pytest.fixture(autouse=True)
def keep_sigterm_handler():
    """sra.main() installs its SIGTERM handler: give pytest its own back after in-process runs."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


@pytest.fixture
def small(monkeypatch):
    """In-process runs whose bits are not compared with a subprocess: a 4-block, 32-wide "T" model,
    so that steps and checkpoint writes cost next to nothing (SRA's T blocks (1, 4) still exist)."""
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
    """A tiny model with random (non-zero) weights, so that sampling depends on every tensor."""
    torch.manual_seed(seed)
    net = sra.MODELS[name](input_size=input_size, in_channels=in_channels, num_classes=num_classes,
                           **kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def sra_args(family="SiT", **kw):
    """Parsed default flags of a T model, with attributes overridden."""
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


class RecordingNet(torch.nn.Module):
    """Stands in for the student and for the EMA teacher in sra.training_losses: records what it
    is given (and whether autograd is on) and returns zeros of the right shapes."""

    def __init__(self, num_classes=4, out_channels=3):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.num_classes, self.out_channels, self.calls = num_classes, out_channels, {}

    def forward(self, x, t, y, block_out_s=None):
        self.calls["student"] = dict(x=x, t=t, y=y, block=block_out_s, grad=torch.is_grad_enabled())
        out = torch.zeros(len(x), self.out_channels, *x.shape[2:]) + self.weight
        return out if block_out_s is None else (out, torch.ones(len(x), 2, 3) + self.weight)

    def forward_features(self, x, t, y, depth):
        self.calls["teacher"] = dict(x=x, t=t, y=y, block=depth, grad=torch.is_grad_enabled())
        return torch.ones(len(x), 2, 3)


def ddpm_tables():
    """DDPM's linear schedule from its definition (Ho et al.), in numpy float64: beta, abar,
    abar_prev, the posterior variance beta tilde and the two coefficients of the posterior mean."""
    beta = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - beta)
    prev = np.append(1.0, abar[:-1])
    return dict(beta=beta, abar=abar, prev=prev, tilde=beta * (1 - prev) / (1 - abar),
                coef1=beta * np.sqrt(prev) / (1 - abar),
                coef2=(1 - prev) * np.sqrt(1 - beta) / (1 - abar))


def normal_cdf(x):
    """The exact standard normal CDF."""
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def dit_steps(K, T=1000):
    """DiT's space_timesteps(T, [K]): a float stride added up step by step, each sum rounded."""
    stride, position, steps = (T - 1) / (K - 1) if K > 1 else 1, 0.0, []
    for _ in range(K):
        steps.append(round(position))
        position += stride
    return steps


def run_main(out, *flags, exp="run", base=TINY):
    """sra.main in this process, on the tiny flags, writing to out/exp; returns the run folder."""
    sra.main(sra.parse_args([*base, "--output-dir", str(out), "--exp-name", exp, *flags]))
    return out / exp


def train(tmp_path, *flags, exp="run", timeout=180, base=TINY):
    """Run sra.py to completion in tmp_path; returns the CompletedProcess (text stdout/stderr)."""
    cmd = [sys.executable, SRA, *base, "--output-dir", str(tmp_path), "--exp-name", exp, *flags]
    return subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def start(tmp_path, *flags, exp="run", out="run.out"):
    """Start sra.py in the background, output to a file (a pipe nobody reads could fill up)."""
    cmd = [sys.executable, SRA, *TINY, "--output-dir", str(tmp_path), "--exp-name", exp, *flags]
    return subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=open(tmp_path / out, "w"),
                            stderr=subprocess.STDOUT)


def torchrun(tmp_path, *flags, exp="run", out=None, script=SRA):
    """Start `script` (sra.py) under torchrun, 2 gloo processes on the CPU, in the background."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           script, *TINY, "--output-dir", str(tmp_path), "--exp-name", exp, *flags]
    return subprocess.Popen(cmd, cwd=tmp_path, env=ENV,
                            stdout=open(tmp_path / (out or f"{exp}.out"), "w"),
                            stderr=subprocess.STDOUT)


def metrics(run_dir):
    """The records of metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_finished(run_dir, steps):
    """The run logged finite losses up to `steps` and its last checkpoint holds plain parameter
    names (no `_orig_mod.` of torch.compile, no `module.` of DDP); returns the checkpoint."""
    records = metrics(run_dir)
    assert [m["step"] for m in records] == list(range(1, steps + 1))
    assert all(math.isfinite(m["gen_loss"]) and math.isfinite(m["align_loss"]) for m in records)
    ckpt = sra.load_checkpoint(str(run_dir / "checkpoints" / f"{steps:07d}.pt"))
    for part in ("model", "ema"):
        assert "pos_embed" in ckpt[part] and "blocks.0.attn.qkv.weight" in ckpt[part]
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt[part])
    return ckpt


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


def stop(proc, *pids):
    """Kill a process this test started (by its pid) if it is still running, and reap it; and
    SIGKILL any of `pids` (its children, say) still alive."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def ckpt_path(run_dir, step):
    return os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")


def steps_saved(run_dir):
    """The steps of the checkpoints in a run folder, ascending."""
    return sorted(int(os.path.basename(p)[:-3]) for p in sra.list_checkpoints(run_dir))


def logged_steps(log):
    """The N of every `step N/M |` line of a log."""
    return [int(n) for n in re.findall(r"\] step (\d+)/\d+ \|", log)]


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
    """Model, EMA, optimizer, loss scaler, random streams and step agree exactly (not args)."""
    a, b = load(path_a), load(path_b)
    for key in ("model", "ema", "opt", "scaler", "rng", "step"):
        assert_identical(a[key], b[key], key)


def all_finite(state):
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


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


def job_pids(pid):
    """`pid` and all its descendants: every process of the job, as a scheduler signals them."""
    return [pid] + [p for child in children(pid) for p in job_pids(child)]


def rank_of(pid):
    """The RANK that torchrun gave a worker process."""
    environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return int(next(v for v in environ if v.startswith(b"RANK=")).split(b"=", 1)[1])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_line_naming(error, *names):
    """sra.error_line(error) (or that line itself): one line that names every one of `names`."""
    line = error if isinstance(error, str) else sra.error_line(error)
    assert line and "\n" not in line and "Traceback" not in line, repr(line)
    for name in names:
        assert str(name) in line, f"{name} not named in: {line}"
    return line


def folder_bytes(root):
    """{relative path: bytes} of every file below root."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def make_image_folder(root, classes=("dog", "cat"), per_class=4):
    """root/<class>/<i>.png, random 40x60 RGB images; returns root."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.png")
    return root


def make_latent_folder(root):
    """root/vae-sd/dataset.json and six (1, 8, 4, 4) fp16 moment files 00/<i>.npy (32 px images),
    labels i % 3; returns root."""
    rng = np.random.default_rng(0)
    (root / "vae-sd" / "00").mkdir(parents=True)
    labels = []
    for i in range(6):
        moments = rng.standard_normal((1, 8, 4, 4)).astype(np.float16)
        np.save(root / "vae-sd" / "00" / f"{i}.npy", moments)
        labels.append([f"00/{i}.npy", i % 3])
    (root / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """A tiny pre-encoded data folder, shared by the tests that only read it."""
    return make_latent_folder(tmp_path_factory.mktemp("latents"))


def limit_file_size():
    """In the child, before it runs: files cannot grow past 1 MB, and a write past that fails
    with EFBIG instead of killing the process (SIGXFSZ ignored): a full disk, without a mount."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


# ==================================================================================================
# sra.py, 1. Embedders: timesteps, positions

def test_timestep_embedding_formula():
    """256-dim sinusoid, frequencies exp(-ln(10000) i / 128), cos first then sin."""
    t = torch.tensor([0.0, 0.3, 17.0, 999.0])
    emb = sra.TimestepEmbedder.timestep_embedding(t, 256)
    for n, tn in enumerate(t.tolist()):
        for i in (0, 5, 127):
            freq = math.exp(-math.log(10000) * i / 128)
            assert emb[n, i].item() == pytest.approx(math.cos(tn * freq), abs=1e-4)  # cos first
            assert emb[n, 128 + i].item() == pytest.approx(math.sin(tn * freq), abs=1e-4)


def test_positional_embedding_formula():
    """MAE's 2D sin-cos table: columns in the first half, rows in the second; fixed, not trained."""
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
    table = torch.from_numpy(sra.get_2d_sincos_pos_embed(64, 4)).float()
    assert torch.allclose(model.pos_embed[0], table)


# ==================================================================================================
# sra.py, 2. The transformer: attention, adaLN-Zero block, final layer, the model table

def linear(P, name, v):
    """v through the Linear layer `name` of the state dict P."""
    return v @ P[f"{name}.weight"].T + P[f"{name}.bias"]


def layer_norm(v):
    """LayerNorm over the last axis without affine parameters, eps 1e-6 (DiT's)."""
    variance = v.var(-1, unbiased=False, keepdim=True)
    return (v - v.mean(-1, keepdim=True)) / torch.sqrt(variance + 1e-6)


def gelu_tanh(v):
    """GELU's tanh approximation (Hendrycks and Gimpel), which DiT's MLP uses."""
    return 0.5 * v * (1 + torch.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))


def reference_block(P, b, x, c, heads):
    """One adaLN-Zero block written out op by op (DiT's paper and models.py): P a state dict, b
    the block's prefix, x (N, T, D) tokens, c (N, D) the conditioning."""
    N, T, D = x.shape
    mod = linear(P, f"{b}.adaLN_modulation.1", F.silu(c))[:, None]  # (N, 1, 6D)
    shift1, scale1, gate1, shift2, scale2, gate2 = [mod[..., k * D:(k + 1) * D] for k in range(6)]
    a = layer_norm(x) * (1 + scale1) + shift1
    q, k, v = linear(P, f"{b}.attn.qkv", a).reshape(N, T, 3, heads, D // heads).unbind(2)
    scores = torch.einsum("nqhd,nkhd->nhqk", q, k) / math.sqrt(D // heads)
    attended = torch.einsum("nhqk,nkhd->nqhd", scores.softmax(-1), v).reshape(N, T, D)
    x = x + gate1 * linear(P, f"{b}.attn.proj", attended)
    m = layer_norm(x) * (1 + scale2) + shift2
    return x + gate2 * linear(P, f"{b}.mlp.fc2", gelu_tanh(linear(P, f"{b}.mlp.fc1", m)))


def reference_final(P, x, c, p, H, W):
    """DiT's final layer and unpatchify: token i * (W/p) + j holds patch (i, j), C_out p p values
    each."""
    N, T, D = x.shape
    mod = linear(P, "final_layer.adaLN_modulation.1", F.silu(c))[:, None]
    shift, scale = mod[..., :D], mod[..., D:]
    out = linear(P, "final_layer.linear", layer_norm(x) * (1 + scale) + shift)  # (N, T, p p C)
    C_out = out.shape[-1] // (p * p)
    h, w = H // p, W // p
    return out.reshape(N, h, w, p, p, C_out).permute(0, 5, 1, 3, 2, 4).reshape(N, C_out, H, W)


def reference_forward(model, x, t, y):
    """DiT's forward written out op by op in float64 from the paper and the names of the released
    checkpoints -> (output (N, C_out, H, W), the hidden state after each block)."""
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
    return reference_final(P, tokens, c, p, H, W), hidden


def test_block_and_final_layer_match_a_reference():
    """In float64, an adaLN-Zero block and the final layer equal DiT's formulas op by op: the
    modulation's chunk order (shift, scale, gate of attention, then of the MLP: the released
    weights depend on it), the gates, LayerNorm's eps 1e-6, the tanh GELU, the heads."""
    torch.manual_seed(0)
    block = sra.Block(32, num_heads=4).double()
    final = sra.FinalLayer(32, 2, 3).double()
    for module in (block, final):
        with torch.no_grad():
            for param in module.parameters():
                param.copy_(torch.randn_like(param) * 0.3)
    P = {f"b.{k}": v for k, v in block.state_dict().items()}
    P.update({f"final_layer.{k}": v for k, v in final.state_dict().items()})
    c = torch.randn(2, 32, dtype=torch.float64)
    for spread in (1.0, 1e-3):  # 1e-3: LayerNorm's eps matters
        x = torch.randn(2, 16, 32, dtype=torch.float64) * spread
        expected = reference_block(P, "b", x, c, 4)
        assert torch.allclose(block(x, c), expected, atol=1e-12, rtol=1e-10)
        out = final(x, c).reshape(2, 4, 4, 2, 2, 3).permute(0, 5, 1, 3, 2, 4).reshape(2, 3, 8, 8)
        assert torch.allclose(out, reference_final(P, x, c, 2, 8, 8), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_forward_matches_a_reference(learn_sigma):
    """The whole model (patches, positions, the [cos, sin] time embedding, labels, blocks, final
    layer, unpatchify) against the reference; the student is the projected state after block s,
    the teacher the raw state after its block."""
    model = randomize(tiny(learn_sigma=learn_sigma, projector=True), seed=3)
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([0.1, 0.5, 0.93]), torch.tensor([0, 2, 4])
    expected, hidden = reference_forward(model, x, t, y)
    out, student = model(x, t, y, block_out_s=2)
    scale = expected.abs().max()
    assert scale > 0.1 and (out.double() - expected).abs().max() < 1e-5 * scale
    assert torch.allclose(student, model.ap_head(hidden[1].float()), atol=1e-5)
    for depth in (1, 3):
        teacher = model.forward_features(x, t, y, depth).double()
        assert torch.allclose(teacher, hidden[depth - 1], atol=1e-5)


def test_sdpa_attention_matches_naive_softmax():
    """Our fused attention equals softmax(q k^T / sqrt(d)) v per head."""
    torch.manual_seed(0)
    attn = sra.Attention(32, num_heads=4)
    x = torch.randn(2, 10, 32)
    q, k, v = attn.qkv(x).view(2, 10, 3, 4, 8).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    naive = attn.proj((weights @ v).transpose(1, 2).reshape(2, 10, 32))
    assert torch.allclose(attn(x), naive, atol=1e-5)


def test_initialisation_is_dits():
    """Xavier-uniform Linears (and the patch conv as a Linear) with zero biases; N(0, 0.02) for
    the label table and the timestep MLP; every adaLN modulation and the final Linear zeroed."""
    torch.manual_seed(0)
    model = sra.MODELS["DiT-S/4"](input_size=16, in_channels=4, num_classes=10, projector=True)
    zeroed = {"final_layer.linear", "final_layer.adaLN_modulation.1"} | {
        f"blocks.{i}.adaLN_modulation.1" for i in range(12)}
    normal = {"t_embedder.mlp.0", "t_embedder.mlp.2"}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            weight = module.weight
            assert not module.bias.any(), name
            if name in zeroed:
                assert not weight.any(), name
            elif name in normal:
                assert abs(weight.std().item() - 0.02) < 0.002, name
            else:  # U(-b, b), b = sqrt(6 / (fan_in + fan_out)): variance b^2 / 3
                bound = math.sqrt(6 / sum(weight.shape))
                assert weight.abs().max() <= bound, name
                assert abs(weight.var().item() / (bound ** 2 / 3) - 1) < 0.1, name
    weight = model.x_embedder.proj.weight
    bound = math.sqrt(6 / (weight.shape[0] + weight[0].numel()))
    assert weight.abs().max() <= bound and abs(weight.var().item() / (bound ** 2 / 3) - 1) < 0.1
    assert not model.x_embedder.proj.bias.any()
    assert abs(model.y_embedder.embedding_table.weight.std().item() - 0.02) < 0.002


def test_fresh_model_outputs_exactly_zero():
    """adaLN-Zero: a freshly initialised model outputs exactly zero."""
    for name in ("SiT-T/2", "DiT-T/4"):
        model = sra.MODELS[name](input_size=8, in_channels=3, num_classes=4)
        out = model(torch.randn(3, 3, 8, 8), torch.tensor([0.1, 0.5, 0.9]),
                    torch.tensor([0, 1, 4]))
        assert torch.equal(out, torch.zeros_like(out))


# The DiT paper's depth, width and heads; T is the project's 6-block CPU model (README)
PAPER_SIZES = {"T": (6, 192, 3), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
               "XL": (28, 1152, 16)}


def expected_params(depth, D, p, C_in, C_out, classes, T):
    """Parameter count of the DiT/SiT architecture, term by term (patch conv, timestep MLP, labels
    with the null row, positions, blocks, final layer)."""
    block = ((3 * D * D + 3 * D) + (D * D + D) + (4 * D * D + 4 * D) + (4 * D * D + D)
             + (6 * D * D + 6 * D))
    return ((C_in * p * p * D + D) + (256 * D + D + D * D + D) + (classes + 1) * D + T * D
            + depth * block + (2 * D * D + 2 * D) + (D * p * p * C_out + p * p * C_out))


@pytest.mark.parametrize("name", list(sra.MODELS))
def test_every_model_shape_and_parameter_count(name):
    """Every model of the table has the paper's depth, width, heads, output channels and
    parameter count (DiT-XL/2: the DiT paper's 675,129,632)."""
    family, rest = name.split("-")
    size, patch = rest.split("/")
    depth, D, heads = PAPER_SIZES[size]
    with torch.device("meta"):
        model = sra.MODELS[name](input_size=32, in_channels=4, num_classes=1000)
    C_out = 8 if family == "DiT" else 4
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_params(depth, D, int(patch), 4, C_out, 1000, (32 // int(patch)) ** 2)
    assert (model.out_channels, len(model.blocks), model.hidden_size) == (C_out, depth, D)
    assert model.blocks[0].attn.num_heads == heads and model.patch_size == int(patch)
    if name == "DiT-XL/2":
        assert n == 675_129_632  # the DiT paper's figure


def test_forward_shapes_any_size_channels_classes():
    """Any input size, channel count and class count gives an (N, C_out, H, W) output."""
    for size, channels, classes, learn_sigma in [(8, 3, 4, False), (12, 1, 7, True),
                                                 (16, 5, 1, False)]:
        model = randomize(sra.MODELS["SiT-T/4"](input_size=size, in_channels=channels,
                                                num_classes=classes, learn_sigma=learn_sigma))
        x = torch.randn(2, channels, size, size)
        out = model(x, torch.rand(2), torch.tensor([0, classes]))  # the null class is `classes`
        assert out.shape == (2, channels * (2 if learn_sigma else 1), size, size)


def test_released_checkpoint_names_and_shapes_load_strict():
    """A state dict with the names of the released DiT/SiT checkpoints, and shapes written out
    here from the architecture, loads strictly; the projector exists only when asked for."""
    D, C, p, T = 384, 4, 8, 4  # DiT-S/8 on 16 x 16 latents: 2 x 2 tokens
    shapes = {"pos_embed": (1, T, D), "x_embedder.proj.weight": (D, C, p, p),
              "x_embedder.proj.bias": (D,), "y_embedder.embedding_table.weight": (11, D),
              "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
              "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
              "final_layer.linear.weight": (p * p * 2 * C, D),
              "final_layer.linear.bias": (p * p * 2 * C,),
              "final_layer.adaLN_modulation.1.weight": (2 * D, D),
              "final_layer.adaLN_modulation.1.bias": (2 * D,)}
    for i in range(12):
        for layer, rows, columns in [("attn.qkv", 3 * D, D), ("attn.proj", D, D),
                                     ("mlp.fc1", 4 * D, D), ("mlp.fc2", D, 4 * D),
                                     ("adaLN_modulation.1", 6 * D, D)]:
            shapes[f"blocks.{i}.{layer}.weight"] = (rows, columns)
            shapes[f"blocks.{i}.{layer}.bias"] = (rows,)
    model = sra.MODELS["DiT-S/8"](input_size=16, in_channels=4, num_classes=10)
    model.load_state_dict({k: torch.zeros(shape) for k, shape in shapes.items()}, strict=True)
    with_projector = sra.MODELS["DiT-S/8"](input_size=16, in_channels=4, num_classes=10,
                                           projector=True)
    assert {k: tuple(v.shape) for k, v in with_projector.state_dict().items()
            if k not in shapes} == {"ap_head.linear1.weight": (2 * D, D),
                                    "ap_head.linear1.bias": (2 * D,),
                                    "ap_head.linear2.weight": (D, 2 * D),
                                    "ap_head.linear2.bias": (D,)}


def test_grad_checkpointing_gives_the_same_gradients(monkeypatch):
    """With grad_checkpointing every block is recomputed in backward, and the gradients agree."""
    model = randomize(tiny())
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])
    checkpointed = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting_checkpoint(function, *args, **kwargs):
        checkpointed.append(function)
        return real_checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.grad_checkpointing = flag
        model(x, t, y).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert checkpointed == list(model.blocks)  # only in the second pass, every block once
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# ==================================================================================================
# sra.py, 3. Objectives: the SiT interpolant and the DDPM of DiT

@pytest.mark.parametrize("path", ["linear", "cosine"])
def test_interpolant_derivatives_by_finite_differences(path):
    """d_alpha, d_sigma are the time derivatives of alpha, sigma; t = 0 is data, t = 1 noise; the
    official trainer's spelling `cos` is the cosine path."""
    t = torch.linspace(0.05, 0.95, 19, dtype=torch.float64)
    h = 1e-6
    alpha, sigma, d_alpha, d_sigma = sra.interpolant(t, path)
    a_plus, s_plus, _, _ = sra.interpolant(t + h, path)
    a_minus, s_minus, _, _ = sra.interpolant(t - h, path)
    assert torch.allclose(d_alpha, (a_plus - a_minus) / (2 * h), atol=1e-6)
    assert torch.allclose(d_sigma, (s_plus - s_minus) / (2 * h), atol=1e-6)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    a0, s0, _, _ = sra.interpolant(ends, path)
    assert torch.allclose(a0, torch.tensor([1.0, 0.0], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s0, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-12)
    expected = torch.cos(math.pi / 2 * t) if path == "cosine" else 1 - t
    assert torch.allclose(alpha, expected)
    if path == "cosine":
        assert all(torch.equal(a, b) for a, b in zip(sra.interpolant(t, "cos"), (alpha, sigma,
                                                                                 d_alpha, d_sigma)))


def test_time_sampling():
    """Uniform times are U(0, 1) (mean 1/2, variance 1/12); lognormal ones are the logistic of a
    normal on the linear path, (2 / pi) atan(e^n) on the cosine path."""
    g = torch.Generator().manual_seed(0)
    t = sra.sample_time(200_000, "uniform", "linear", "cpu", g)
    assert t.min() >= 0 and t.max() < 1
    assert abs(t.mean().item() - 0.5) < 0.005 and abs(t.var().item() - 1 / 12) < 0.002
    t = sra.sample_time(200_000, "lognormal", "linear", "cpu", g)
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.01 and abs(logit.std().item() - 1) < 0.01
    t_cos = sra.sample_time(200_000, "lognormal", "cosine", "cpu", g)
    s = torch.tan(math.pi / 2 * t_cos.double())  # t = (2 / pi) atan(s), s = e^n
    assert abs(s.log().mean().item()) < 0.01 and abs(s.log().std().item() - 1) < 0.01


def test_ddpm_tables_against_closed_forms():
    """DDPM's linear-beta tables in float64, on the device of betas, match their closed forms;
    the clipped log variance is log beta tilde, its t = 0 entry taken from t = 1."""
    d, tab = sra.GaussianDiffusion.linear(num_timesteps=1000, device="cpu"), ddpm_tables()
    assert d.betas.dtype == torch.float64
    assert np.allclose(d.alphas_cumprod.numpy(), tab["abar"], rtol=1e-12)
    assert np.allclose(d.posterior_variance.numpy(), tab["tilde"], rtol=1e-12)
    clipped = np.log(np.append(tab["tilde"][1], tab["tilde"][1:]))
    assert np.allclose(d.posterior_log_variance_clipped.numpy(), clipped, rtol=1e-12)
    # the posterior mean of q(x_{t-1} | x_t, x_0) from Bayes' rule on two Gaussians
    t, ab, beta = 500, tab["abar"], tab["beta"]
    x0 = torch.tensor([[0.3]], dtype=torch.float64)
    xt = torch.tensor([[-0.7]], dtype=torch.float64)
    mean, _ = d.q_posterior(x0, xt, torch.tensor([t]))
    prior_mean, prior_var = math.sqrt(ab[t - 1]) * 0.3, 1 - ab[t - 1]
    lik_scale, lik_var = math.sqrt(1 - beta[t]), beta[t]
    expected = ((prior_mean / prior_var + lik_scale * -0.7 / lik_var)
                / (1 / prior_var + lik_scale ** 2 / lik_var))
    assert mean.item() == pytest.approx(expected, rel=1e-9)
    # 250 steps scale beta by 4; every table follows betas to its device
    assert sra.GaussianDiffusion.linear(250).betas[-1].item() == pytest.approx(0.08)
    on_meta = sra.GaussianDiffusion.linear(device="meta")
    tables = [v for v in vars(on_meta).values() if isinstance(v, torch.Tensor)]
    assert len(tables) >= 6 and all(v.device.type == "meta" for v in tables)


def test_ddpm_q_sample_and_p_mean_variance_against_closed_forms():
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; the model's x0 = (x_t - sqrt(1 - abar) eps) /
    sqrt(abar), its mean the posterior's at that x0, its log variance frac log beta + (1 - frac)
    log beta tilde with frac = (v + 1) / 2 (Improved DDPM's learned range, which DiT uses)."""
    d, tab = sra.GaussianDiffusion.linear(), ddpm_tables()
    torch.manual_seed(0)
    t = torch.tensor([0, 1, 17, 500, 999])
    x0, noise = (torch.randn(5, 2, 3, 3, dtype=torch.float64) for _ in range(2))
    eps, v = torch.randn_like(x0), torch.rand_like(x0) * 2 - 1
    xt = d.q_sample(x0, t, noise)
    mean, log_var, x0_hat = d.p_mean_variance(torch.cat([eps, v], 1), xt, t)
    for i, step in enumerate(t.tolist()):
        ab = tab["abar"][step]
        assert torch.allclose(xt[i], math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i],
                              atol=1e-12)
        want_x0 = (xt[i] - math.sqrt(1 - ab) * eps[i]) / math.sqrt(ab)
        assert torch.allclose(x0_hat[i], want_x0, atol=1e-10)
        want_mean = tab["coef1"][step] * want_x0 + tab["coef2"][step] * xt[i]
        assert torch.allclose(mean[i], want_mean, atol=1e-10)
        tilde = tab["tilde"][max(step, 1)]  # beta tilde is 0 at t = 0: its log is the one at 1
        frac = (v[i] + 1) / 2
        want = frac * math.log(tab["beta"][step]) + (1 - frac) * math.log(tilde)
        assert torch.allclose(log_var[i], want, atol=1e-10)


def test_normal_cdf_approximation_and_discretized_likelihood():
    """DiT's tanh approximation of the normal CDF is within 2e-4 of the exact one; the decoder's
    log-likelihood is the log mass of the pixel's bin of width 2/255, the outer bins open."""
    x = torch.linspace(-6, 6, 20001, dtype=torch.float64)
    assert (sra.approx_standard_normal_cdf(x) - normal_cdf(x)).abs().max() < 2e-4
    x0 = torch.tensor([-1.0, -1 + 2 / 255, 0.0, 0.3, 1.0], dtype=torch.float64)
    means = x0 + torch.tensor([0.01, -0.004, 0.003, 0.0, -0.012], dtype=torch.float64)
    sigma = 0.01
    upper = normal_cdf((x0 + 1 / 255 - means) / sigma)
    lower = normal_cdf((x0 - 1 / 255 - means) / sigma)
    expected = torch.log(upper - lower)
    expected[0] = torch.log(upper[0])  # the lowest bin reaches -inf
    expected[-1] = torch.log(1 - lower[-1])  # the highest +inf
    got = sra.discretized_gaussian_log_likelihood(x0, means, torch.full_like(x0, math.log(sigma)))
    assert torch.allclose(got, expected, atol=2e-3)


def test_variational_bound_is_in_bits_with_the_decoder_term_at_t0():
    """DiT's loss per sample: MSE(eps) + L_vb, L_vb the KL between the true posterior and the
    model's Gaussian (its mean from a detached eps) in bits per dimension, and at t = 0 the
    negative log-likelihood of x0 under the discretized Gaussian, in bits too."""
    d, tab = sra.GaussianDiffusion.linear(), ddpm_tables()
    torch.manual_seed(1)
    t = torch.tensor([0, 0, 3, 250, 998])
    x0 = torch.randint(0, 256, (5, 2, 2, 2)).double() / 127.5 - 1  # on the 8-bit grid
    noise = torch.randn_like(x0)
    xt = d.q_sample(x0, t, noise)
    eps = noise + 0.1 * torch.randn_like(x0)
    v = torch.rand_like(x0) * 2 - 1
    loss = d.training_losses(torch.cat([eps, v], 1), x0, xt, t, noise)
    for i, step in enumerate(t.tolist()):
        ab = tab["abar"][step]
        x0_hat = (xt[i] - math.sqrt(1 - ab) * eps[i]) / math.sqrt(ab)
        mean = tab["coef1"][step] * x0_hat + tab["coef2"][step] * xt[i]
        frac = (v[i] + 1) / 2
        log_var = (frac * math.log(tab["beta"][step])
                   + (1 - frac) * math.log(tab["tilde"][max(step, 1)]))
        mse = ((noise[i] - eps[i]) ** 2).mean()
        if step == 0:  # -log of the mass of x0's bin, in bits
            sigma = torch.exp(0.5 * log_var)
            upper = normal_cdf((x0[i] + 1 / 255 - mean) / sigma)
            lower = normal_cdf((x0[i] - 1 / 255 - mean) / sigma)
            mass = torch.where(x0[i] < -0.999, upper,
                               torch.where(x0[i] > 0.999, 1 - lower, upper - lower))
            vb = -torch.log(mass).mean() / math.log(2)
            assert loss[i].item() == pytest.approx((mse + vb).item(), rel=2e-3)
        else:  # KL(N(m1, v1) || N(m2, v2)) = (log v2 - log v1 + v1 / v2 + (m1 - m2)^2 / v2 - 1) / 2
            true_mean = tab["coef1"][step] * x0[i] + tab["coef2"][step] * xt[i]
            true_var = tab["tilde"][step]
            kl = 0.5 * (log_var - math.log(true_var) + true_var / log_var.exp()
                        + (true_mean - mean) ** 2 / log_var.exp() - 1)
            assert loss[i].item() == pytest.approx((mse + kl.mean() / math.log(2)).item(),
                                                   rel=1e-6)


def test_ddpm_vb_term_is_nonnegative_and_trains_only_the_variance():
    """L_vb >= 0, its gradient reaches only the variance channels, and it is 0 for the truth."""
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
    assert torch.equal(out.grad[:, :3], torch.zeros_like(out.grad[:, :3]))  # eps: no vb gradient
    assert out.grad[:, 3:].abs().sum() > 0
    # the true eps with v = -1 (log variance = log beta tilde, the true posterior's) gives KL = 0
    exact = torch.cat([noise, torch.full_like(x0, -1.0)], dim=1)
    assert (d.training_losses(exact, x0, xt, t, noise)[4:]).abs().max() < 1e-4


# ==================================================================================================
# sra.py, 4. The SRA term: the teacher's inputs, the alignment loss, lambda, the EMA

@pytest.mark.parametrize("family", ["SiT", "DiT"])
def test_training_draws_labels_times_and_the_teachers_inputs(family):
    """20,000 draws of sra.training_losses: labels dropped to the null class at rate cfg_prob,
    the teacher seeing the same labels; student time U(0, 1) (SiT) or every step 0..999 (DiT); the
    teacher at t' = clamp(t - t_max u, 0, 1) (SiT) or clamp(t - j, 1, 999), j uniform in
    [0, t_max 1000) (DiT's official code), with the same image and the same noise; the student's
    features come from block_out_s, the teacher's from block_out_t, under no_grad."""
    N = 20_000
    student, teacher = RecordingNet(), RecordingNet()
    args = sra_args(family, cfg_prob=0.15, t_max=0.3, path_type="cosine", block_out_s=2,
                    block_out_t=5)
    x, y = torch.randn(N, 3, 1, 2), torch.randint(0, 4, (N,))
    diffusion = sra.GaussianDiffusion.linear() if family == "DiT" else None
    sra.training_losses(student, teacher, x, y, args, diffusion, torch.Generator().manual_seed(0))
    s, te = student.calls["student"], teacher.calls["teacher"]
    assert (s["block"], te["block"], s["grad"], te["grad"]) == (2, 5, True, False)
    dropped = s["y"] == 4  # the null class is num_classes
    assert abs(dropped.float().mean().item() - 0.15) < 0.01
    assert torch.equal(s["y"][~dropped], y[~dropped]) and torch.equal(te["y"], s["y"])
    ts, tt = s["t"].double(), te["t"].double()
    offset = ts - tt
    if family == "SiT":
        assert ts.min() >= 0 and ts.max() < 1 and abs(ts.mean().item() - 0.5) < 0.01
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
        alpha, sigma = abar[ts.long()].sqrt(), (1 - abar[ts.long()]).sqrt()
        alpha_t, sigma_t = abar[tt.long()].sqrt(), (1 - abar[tt.long()]).sqrt()
    view = (-1, 1, 1, 1)
    keep = sigma > 0.05  # where the noise can be read back from x_t
    eps = (s["x"].double() - alpha.view(view) * x) / sigma.view(view)
    assert abs(eps[keep].mean().item()) < 0.02 and abs(eps[keep].std().item() - 1) < 0.02
    teacher_x = alpha_t.view(view) * x + sigma_t.view(view) * eps
    assert torch.allclose(te["x"].double()[keep], teacher_x[keep], atol=1e-4)


def test_training_times_follow_the_weighting():
    """--weighting lognormal reaches the student's times: logit(t) ~ N(0, 1) (linear path)."""
    student, teacher = RecordingNet(), RecordingNet()
    args = sra_args(weighting="lognormal")
    x, y = torch.randn(20_000, 3, 1, 1), torch.randint(0, 4, (20_000,))
    sra.training_losses(student, teacher, x, y, args, None, torch.Generator().manual_seed(0))
    t = student.calls["student"]["t"].double()
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.03 and abs(logit.std().item() - 1) < 0.03


@pytest.mark.parametrize("family", ["SiT", "DiT"])
def test_denoising_loss_is_the_objective_at_the_students_inputs(family):
    """SiT: x_t = alpha x + sigma eps and the loss is the MSE to the velocity d_alpha x + d_sigma
    eps (cosine path here); DiT: the MSE to eps plus the bound in bits, computed here by hand."""
    torch.manual_seed(0)
    learn_sigma = family == "DiT"
    model = randomize(tiny(projector=True, learn_sigma=learn_sigma))
    ema = tiny(learn_sigma=learn_sigma)
    args = sra_args(family, cfg_prob=0.0, block_out_s=1, block_out_t=3, path_type="cosine")
    calls = capture_calls(model, ema)
    x, y = torch.randn(16, 3, 8, 8), torch.arange(16) % 4
    diffusion = sra.GaussianDiffusion.linear() if family == "DiT" else None
    denoise, _, _ = sra.training_losses(model, ema, x, y, args, diffusion,
                                        torch.Generator().manual_seed(1))
    # replay the documented draws: label dropout, then the noise
    replay = torch.Generator().manual_seed(1)
    torch.rand(16, generator=replay)
    eps = torch.randn(x.shape, generator=replay)
    xs, ts, ys = calls["student"]
    with torch.no_grad():
        output = model(xs, ts, ys).double()
    x, eps, xs = x.double(), eps.double(), xs.double()
    if family == "SiT":
        alpha, sigma = torch.cos(math.pi / 2 * ts), torch.sin(math.pi / 2 * ts)
        d_alpha, d_sigma = -math.pi / 2 * sigma, math.pi / 2 * alpha
        view = (-1, 1, 1, 1)
        assert torch.allclose(xs, alpha.view(view) * x + sigma.view(view) * eps, atol=1e-6)
        expected = ((output - (d_alpha.view(view) * x + d_sigma.view(view) * eps)) ** 2).mean()
    else:
        tab = ddpm_tables()
        losses = []
        for i, step in enumerate(ts.tolist()):
            ab = tab["abar"][step]
            assert torch.allclose(xs[i], math.sqrt(ab) * x[i] + math.sqrt(1 - ab) * eps[i],
                                  atol=1e-5)
            eps_hat, v = output[i, :3], output[i, 3:]
            x0_hat = (xs[i] - math.sqrt(1 - ab) * eps_hat) / math.sqrt(ab)
            mean = tab["coef1"][step] * x0_hat + tab["coef2"][step] * xs[i]
            frac = (v + 1) / 2
            log_var = (frac * math.log(tab["beta"][step])
                       + (1 - frac) * math.log(tab["tilde"][max(step, 1)]))
            true_mean = tab["coef1"][step] * x[i] + tab["coef2"][step] * xs[i]
            true_var = tab["tilde"][max(step, 1)]
            kl = 0.5 * (log_var - math.log(true_var) + true_var / log_var.exp()
                        + (true_mean - mean) ** 2 / log_var.exp() - 1)
            assert step > 0  # (t = 0, the decoder term, has its own test)
            losses.append(((eps[i] - eps_hat) ** 2).mean() + kl.mean() / math.log(2))
        expected = torch.stack(losses).mean()
    assert denoise.item() == pytest.approx(expected.item(), rel=1e-5)


def test_no_gradient_reaches_the_teacher_and_teacher_runs_only_its_blocks():
    """Stop-gradient on the teacher; it runs blocks 1..block_out_t only, no final layer."""
    model, ema = randomize(tiny(projector=True)), randomize(tiny(), seed=1)
    ran = []
    for i, block in enumerate(ema.blocks):
        block.register_forward_hook(lambda m, inp, out, i=i: ran.append(i))
    ema.final_layer.register_forward_hook(lambda m, inp, out: ran.append("final"))
    args = sra_args(block_out_s=1, block_out_t=2)
    _, align, _ = sra.training_losses(model, ema, torch.randn(4, 3, 8, 8),
                                      torch.tensor([0, 1, 2, 3]), args, None,
                                      torch.Generator().manual_seed(0))
    assert ran == [0, 1]  # blocks 1..2 only: no later block, no final layer
    align.backward()
    assert all(p.grad is None for p in ema.parameters())
    assert model.ap_head.linear1.weight.grad.abs().sum() > 0  # the projector is trained
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert model.blocks[3].attn.qkv.weight.grad is None  # blocks after s: no alignment gradient


def test_no_sra_runs_no_teacher():
    """--no-sra: no teacher forward, no projector, an alignment loss of exactly 0."""
    model, ema = randomize(tiny()), tiny()
    calls = capture_calls(model, ema)
    _, align, _ = sra.training_losses(model, ema, torch.randn(4, 3, 8, 8),
                                      torch.tensor([0, 1, 2, 3]), sra_args(no_sra=True), None,
                                      torch.Generator().manual_seed(0))
    assert "student" in calls and "teacher" not in calls and align.item() == 0


def test_alignment_losses():
    """sml1 is smooth-L1 (beta 0.05, the paper); cos is 1 - cosine per token over the feature
    axis (the paper; the official code's ran over tokens), normalised in fp32: fp16 features of
    a size whose squares overflow fp16 still give finite losses."""
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    loss, cos = sra.align_loss(s, t, "sml1")
    diff = (s - t).abs()
    smooth = torch.where(diff < 0.05, 0.5 * diff ** 2 / 0.05, diff - 0.025).mean()
    assert loss.item() == pytest.approx(smooth.item())
    loss_cos, _ = sra.align_loss(s, t, "cos")
    per_token = (s * t).sum(-1) / (s.norm(dim=-1) * t.norm(dim=-1))  # (2, 5): per token
    assert loss_cos.item() == pytest.approx((1 - per_token).mean().item(), abs=1e-6)
    assert cos.item() == pytest.approx(per_token.mean().item(), abs=1e-6)
    big = (300 * s).half()  # 300^2 * 8 > 65504, fp16's largest number
    assert sra.align_loss(big, big, "cos")[0].item() == pytest.approx(0, abs=1e-3)
    # fp16 features (autocast's) give fp32 losses, exact for the fp16 values (an fp16 result
    # would be rounded to 11 significant bits)
    s16, t16 = s.half(), t.half()
    diff = (s16.double() - t16.double()).abs()
    smooth = torch.where(diff < 0.05, 0.5 * diff ** 2 / 0.05, diff - 0.025).mean()
    s64, t64 = s16.double(), t16.double()
    per_token = (s64 * t64).sum(-1) / (s64.norm(dim=-1) * t64.norm(dim=-1))
    for kind, expected in (("sml1", smooth), ("cos", (1 - per_token).mean())):
        loss16 = sra.align_loss(s16, t16, kind)[0]
        assert loss16.dtype == torch.float32, kind
        assert loss16.item() == pytest.approx(expected.item(), rel=1e-6), kind


def test_align_weight_schedule():
    """lambda decays tenfold per decay_steps after decay_start; decay_steps 0: constant."""
    assert sra.align_weight(100, 0.2, 1000, 5000) == 0.2
    assert sra.align_weight(6000, 0.2, 1000, 5000) == pytest.approx(0.02)
    assert sra.align_weight(3500, 0.2, 1000, 5000) == pytest.approx(0.2 * 0.1 ** 0.5)
    assert sra.align_weight(10 ** 7, 0.2, 0, 0) == 0.2


def test_ema_update_formula_and_build_starts_the_ema_as_an_exact_copy():
    """update_ema is ema <- d ema + (1 - d) model; build()'s EMA is an exact, separate copy of the
    backbone at step 0, without the projector, in eval mode, needing no gradient."""
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
    """The SRA objective can memorise one batch (same noise and times every step)."""
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
    """Under bf16 autocast the losses stay within a few percent of fp32."""
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

def test_builtin_dataset_is_deterministic_and_class_conditional():
    """ShapesDataset: 10 classes, (3, R, R) in [-1, 1], an index always gives the same image,
    and the classes look different on average."""
    ds = sra.ShapesDataset(32)
    x0, y0 = ds[17]
    assert x0.shape == (3, 32, 32) and x0.dtype == torch.float32 and y0 == 7
    assert x0.min() >= -1 and x0.max() <= 1 and x0.std() > 0.1
    assert torch.equal(ds[17][0], x0)  # the same index gives the same image
    assert not torch.equal(ds[27][0], x0)  # the same class, another image
    assert sra.ShapesDataset(16)[3][0].shape == (3, 16, 16)
    means = torch.stack([torch.stack([ds[c + 10 * i][0] for i in range(20)]).mean(0)
                         for c in range(10)])
    gaps = torch.cdist(means.flatten(1), means.flatten(1))
    assert gaps[~torch.eye(10, dtype=bool)].min() > 1.0  # classes look different on average


def test_random_horizontal_flips():
    """Pixels: each image is kept or mirrored left-right, half of them mirrored."""
    x = torch.arange(3 * 8 * 5, dtype=torch.float32).view(1, 3, 8, 5).repeat(2000, 1, 1, 1)
    out = sra.prepare_batch(x, "folder", torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert (same ^ mirrored).all() and abs(mirrored.float().mean().item() - 0.5) < 0.04


def test_adm_crop():
    """ADM's crop: box-halve while the short side is at least twice the resolution, bicubic to
    the resolution, crop the centre. 64x32 at 16: one halving exactly at 2 x 16, no resize."""
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8))
    half = np.array(image.resize((32, 16), Image.BOX))
    assert np.array_equal(sra.center_crop_arr(image, 16), half[:, 8:24])


def test_image_folder_data_uses_the_adm_crop_and_trains(tmp_path):
    """An image folder gives (3, R, R) items in [-1, 1] cropped the ADM way, labels from the sorted
    class names; it trains."""
    from PIL import Image
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
    run_dir = run_main(tmp_path, "--data-dir", str(root), "--max-train-steps", "2")
    saved = json.loads((run_dir / "args.json").read_text())
    assert (saved["dataset"], saved["num_classes"], saved["in_channels"]) == ("folder", 2, 3)
    assert_finished(run_dir, 2)


def test_latent_data_draws_the_posterior_and_trains(latents, tmp_path):
    """Latent items are the stored fp16 moments; prepare_batch draws z = (mean + std eps) 0.18215
    afresh; a latent run trains a 4-channel model."""
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
    run_dir = run_main(tmp_path, "--data-dir", str(latents), "--max-train-steps", "2",
                       base=LATENT_FLAGS)
    saved = json.loads((run_dir / "args.json").read_text())
    assert (saved["dataset"], saved["in_channels"], saved["input_size"], saved["num_classes"]) == (
        "latents", 4, 4, 3)
    assert_finished(run_dir, 2)


def test_latents_at_a_resolution_not_divisible_by_8(latents, tmp_path):
    """Latents need --resolution divisible by the SD-VAE's 8; nothing is written."""
    with pytest.raises(sra.UserError, match="--resolution 36 is not divisible by 8"):
        run_main(tmp_path, "--data-dir", str(latents), "--resolution", "36",
                 "--max-train-steps", "1", base=LATENT_FLAGS)
    assert not (tmp_path / "run").exists()


def test_pixel_runs_of_too_many_tokens_stop_with_the_ways_out(tmp_path):
    """256 px pixels at patch 2 (16,384 tokens, 64x the paper's 256): one line naming the count and
    both ways out, before anything is written; the start-up line states space and tokens."""
    with pytest.raises(sra.UserError) as error:
        run_main(tmp_path, "--model", "SiT-T/2", "--resolution", "256", "--max-train-steps", "1")
    one_line_naming(error.value, "SiT-T/2 on pixels 3x256x256, 16384 tokens", "--encode DIR",
                    "--resolution", "patch")
    assert not (tmp_path / "run").exists()
    args = sra.parse_args(TINY + ["--model", "SiT-T/2", "--resolution", "128"])
    sra.build_dataset(args)  # 4096 tokens: allowed
    assert args.input_space == "pixels 3x128x128, 4096 tokens"
    run_dir = run_main(tmp_path, "--max-train-steps", "1")
    assert "] SiT-T/8 (4.24M parameters) on pixels 3x16x16, 4 tokens, 1 process(es)" in read(
        run_dir / "log.txt")


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
    """root/site/diffusers (the stand-in package) and root/vae-<seed>/ (its weights, as
    save_pretrained leaves a folder) -> (site, vae folder)."""
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
    """--encode: vae-sd/ with one float32 (8, R/8, R/8) .npy per image, the posterior's mean and
    std of the ADM-cropped image in [-1, 1], dataset.json [[path, class]] in ImageFolder's order;
    LatentDataset reads it and a SiT trains on it."""
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
    assert "on latents 4x2x2, 1 tokens" in read(run_dir / "log.txt")
    assert_finished(run_dir, 2)
    # sample.py decodes with the same VAE folder (--vae takes one there too): 16 px images
    flags = ["--ckpt", ckpt_path(run_dir, 2), "--grid", "--num-steps", "2", "--vae", with_fake_vae]
    assert sample.cli([*flags, "--sample-dir", str(tmp_path / "samples")]) == 0
    from PIL import Image
    (grid,) = glob.glob(str(tmp_path / "samples" / "*-grid.png"))
    assert Image.open(grid).size == (2 * 16, 8 * 16)  # 2 classes (cat, dog) x 8 rows


@slow
def test_encode_two_processes_equal_one_and_a_killed_encode_resumes(tmp_path):
    """torchrun with 2 processes writes the same bytes as 1 process; an encode killed mid-way then
    rerun rewrites no finished file and ends with the same bytes; a third run finds all done."""
    site, vae = fake_vae(tmp_path)
    images = make_image_folder(tmp_path / "img", per_class=5)
    env = dict(ENV, PYTHONPATH=f"{HERE}:{site}")
    one = subprocess.run([sys.executable, SRA, *encode_flags(images, tmp_path / "one", vae)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0 and f"--data-dir {tmp_path / 'one'}" in one.stdout, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", SRA, *encode_flags(images, tmp_path / "two", vae)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert two.returncode == 0, two.stderr[-3000:]
    reference = folder_bytes(tmp_path / "one")
    assert len(reference) == 12 and folder_bytes(tmp_path / "two") == reference  # 10, json, marker

    cmd = [sys.executable, SRA, *encode_flags(images, tmp_path / "run", vae)]
    out = tmp_path / "run" / "vae-sd"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=dict(env, FAKE_VAE_DELAY="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(list(out.rglob("*.npy"))) >= 3, "a first batch", proc=proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop(proc)
    done = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.npy")}
    assert 3 <= len(done) < 10 and not (out / "dataset.json").exists()
    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in done} == done  # not rewritten
    assert folder_bytes(tmp_path / "run") == reference
    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert (again.returncode == 0 and "10/10" in again.stderr
            and folder_bytes(tmp_path / "run") == reference)


@slow
def test_encode_that_cannot_write_is_one_line_and_a_rerun_completes(tmp_path):
    """A latent file that cannot be written for real (files limited to 200 bytes, a latent is
    256): one line naming it, exit 2, no .tmp, no dataset.json, never a short file (np.save's C
    writes lose such a failure without a word); without the limit, the same command then makes
    every file."""
    site, vae = fake_vae(tmp_path)
    images = make_image_folder(tmp_path / "img")
    cmd = [sys.executable, SRA, *encode_flags(images, tmp_path / "enc", vae)]
    env = dict(ENV, PYTHONPATH=f"{HERE}:{site}")

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200, 200))

    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=limit)
    out = tmp_path / "enc" / "vae-sd"
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.fullmatch(rf"error: cannot write latent file {out}/(cat|dog)/\d\.png\.npy: .+",
                        last), last
    assert not list(out.rglob("*.tmp")) and not (out / "dataset.json").exists()
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and len(list(out.rglob("*.npy"))) == 8, proc.stderr[-3000:]


def unreadable_image(root):
    """An image folder with a file that is not an image."""
    images = make_image_folder(root / "img")
    (images / "cat" / "9.png").write_bytes(b"not a png")
    return images, [str(images / "cat" / "9.png"), "cannot read image"]


def other_encoding(root, resolution):
    """A folder already encoded at another resolution, or with another VAE folder."""
    images = make_image_folder(root / "img")
    _, vae = fake_vae(root / "other") if resolution == 16 else (None, str(root / "vae-0"))
    sra.encode_latents(sra.parse_args(encode_flags(images, root / "enc", vae, "--resolution",
                                                   str(resolution))))
    return images, [str(root / "enc" / "vae-sd"), "holds another encoding", "choose another"]


def official_layout(root):
    """vae-sd/ made by another tool (no record of how): never mixed with."""
    images = make_image_folder(root / "img")
    make_latent_folder(root / "enc")
    return images, [str(root / "enc" / "vae-sd"), "holds another encoding"]


ENCODE_BAD_INPUT = {  # (the temporary folder, the VAE folder) -> image folder, what the error says
    "no-class-folders": lambda root, vae: (no_class_folders(root)[0][1], ["class folder"]),
    "unreadable-image": lambda root, vae: unreadable_image(root),
    "resolution": lambda root, vae: (make_image_folder(root / "img"), ["--resolution 20 is not "
                                                                        "divisible by 8"]),
    "other-resolution": lambda root, vae: other_encoding(root, 24),
    "other-vae": lambda root, vae: other_encoding(root, 16),
    "official-layout": lambda root, vae: official_layout(root),
    "vae-folder": lambda root, vae: (make_image_folder(root / "img"),
                                     ["cannot load the SD-VAE", "nope", "save_pretrained"]),
}


@pytest.mark.parametrize("case", list(ENCODE_BAD_INPUT))
def test_encode_bad_input_is_one_line(case, tmp_path, with_fake_vae):
    """Each bad input of --encode is one UserError line that names the problem; no dataset.json."""
    images, fragments = ENCODE_BAD_INPUT[case](tmp_path, with_fake_vae)
    vae = str(tmp_path / "nope") if case == "vae-folder" else with_fake_vae
    flags = encode_flags(images, tmp_path / "enc", vae)
    if case == "resolution":
        flags += ["--resolution", "20"]
    with pytest.raises(sra.UserError) as error:
        sra.encode_latents(sra.parse_args(flags))
    one_line_naming(error.value, *fragments)
    if case not in ("official-layout", "other-resolution", "other-vae"):
        assert not (tmp_path / "enc" / "vae-sd" / "dataset.json").exists()


def test_encode_without_diffusers_says_how_to_install_it(tmp_path, monkeypatch):
    """No diffusers: one line, `pip install diffusers`, from both programs' shared loader; with
    it, the VAE is loaded with low_cpu_mem_usage=False (what diffusers falls back to without the
    accelerate package, said so that it prints no advice to install accelerate)."""
    images = make_image_folder(tmp_path / "img")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(sra.UserError, match=r"^the SD-VAE needs diffusers: pip install diffusers$"):
        sra.encode_latents(sra.parse_args(encode_flags(images, tmp_path / "enc", "ema")))
    loads = []

    class AutoencoderKL:
        @classmethod
        def from_pretrained(cls, source, **kwargs):
            loads.append((source, kwargs))
            return torch.nn.Identity()

    monkeypatch.setitem(sys.modules, "diffusers", SimpleNamespace(AutoencoderKL=AutoencoderKL))
    sra.load_vae("mse", torch.device("cpu"))
    assert loads == [("stabilityai/sd-vae-ft-mse", {"low_cpu_mem_usage": False})]


@slow
def test_encode_unreadable_image_exits_2_with_one_line(tmp_path):
    """From the command line, with DataLoader workers: `error: cannot read image PATH...`,
    exit 2."""
    site, vae = fake_vae(tmp_path)
    images, _ = unreadable_image(tmp_path)
    cmd = [sys.executable, SRA, *encode_flags(images, tmp_path / "enc", vae, "--num-workers", "2")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(ENV, PYTHONPATH=f"{HERE}:{site}"),
                          capture_output=True, text=True, timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert last.startswith(f"error: cannot read image {images / 'cat' / '9.png'}")


# ==================================================================================================
# sra.py, 6. Helpers: FLOPs, atomic writes, checkpoints

def naive_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v with plain matmuls, which FlopCounterMode counts (it does not
    count the CPU's fused attention kernel)."""
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ v


def counted_flops(function, monkeypatch):
    """FLOPs of function() as PyTorch's FlopCounterMode counts its matmuls."""
    monkeypatch.setattr(F, "scaled_dot_product_attention", naive_attention)
    with FlopCounterMode(display=False) as counter:
        function()
    monkeypatch.undo()
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["SiT-T/2", "DiT-T/4"])
def test_flop_formulas_against_pytorchs_flop_counter(name, monkeypatch):
    """forward_flops of a whole forward and of the teacher's partial one, and train_flops of an
    SRA step (student forward and backward with the projector, teacher forward) and of a vanilla
    one, per image, as torch's FlopCounterMode counts a real run (32 px: attention matters)."""
    args = sra.parse_args(["--model", name])
    student = randomize(sra.MODELS[name](input_size=32, in_channels=4, num_classes=10,
                                         projector=True))
    teacher = sra.MODELS[name](input_size=32, in_channels=4, num_classes=10)
    x, t, y = torch.randn(1, 4, 32, 32), torch.rand(1), torch.tensor([3])

    def forward():
        student(x, t, y)

    def partial_forward():
        teacher.forward_features(x, t, y, args.block_out_t)

    def sra_step():
        out, features = student(x, t, y, block_out_s=args.block_out_s)
        with torch.no_grad():
            target = teacher.forward_features(x, t, y, args.block_out_t)
        (out.square().mean() + (features - target).square().mean()).backward()

    def vanilla_step():
        student(x, t, y).square().mean().backward()

    # (the formulas leave out the timestep MLP: 0.1% here)
    assert sra.forward_flops(student) == pytest.approx(counted_flops(forward, monkeypatch),
                                                       rel=2e-3)
    assert sra.forward_flops(student, args.block_out_t) == pytest.approx(
        counted_flops(partial_forward, monkeypatch), rel=2e-3)
    assert sra.train_flops(student, args) == pytest.approx(counted_flops(sra_step, monkeypatch),
                                                           rel=2e-3)
    args.no_sra = True
    assert sra.train_flops(student, args) == pytest.approx(
        counted_flops(vanilla_step, monkeypatch), rel=2e-3)


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


DIE_MID_WRITE = r"""
import functools, io, os, signal, sys, torch
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
sra.atomic_write(sys.argv[1], functools.partial(torch.save, new), "checkpoint")
"""


@slow
def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    """A process killed while atomic_write writes leaves the old file intact;
    the half file is never used."""
    os.makedirs(tmp_path / "checkpoints")
    path = ckpt_path(tmp_path, 4)
    old = {"model": {"w": torch.arange(10.0)}, "ema": {}, "opt": {}, "step": 4, "args": {}}
    sra.atomic_write(path, functools.partial(torch.save, old), "checkpoint")
    proc = subprocess.run([sys.executable, "-c", DIE_MID_WRITE, path], env=ENV, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert_identical(sra.load_checkpoint(path), old)  # the previous checkpoint: intact and loadable
    assert os.path.exists(path + ".tmp"), "the simulated crash did not leave a half-written file"
    assert sra.list_checkpoints(tmp_path) == [path]
    messages = []
    assert sra.find_resume_checkpoint("auto", tmp_path, messages.append)[0] == path
    assert messages == []


def test_a_write_that_never_reached_the_file_is_one_line(tmp_path):
    """Bytes lost without an error (np.save writes through C stdio, which drops a failed write
    on a full disk; here the file is cut behind the writer's back) are caught: one line, the
    old file intact, no .tmp left."""
    path = str(tmp_path / "x.npy")
    sra.atomic_write(path, lambda f: f.write(b"old"))

    def lose(f):
        f.write(b"0123456789")
        f.flush()
        os.truncate(f.name, 4)  # what reached the disk: 4 of 10 bytes

    with pytest.raises(sra.UserError, match=r"^cannot write latent file .*x\.npy: a write did "
                                            r"not reach the file \(is the disk full\?\)$"):
        sra.atomic_write(path, lose, "latent file")
    assert open(path, "rb").read() == b"old" and not os.path.exists(path + ".tmp")


class Evil:
    """Unpickling this calls open(marker, 'w'): code execution, harmless but visible."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path, small):
    """--resume evil.pt: a UserError naming the file, in one line; the pickle's code never ran."""
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"model": Evil(str(marker)), "ema": {}, "opt": {}, "step": 0, "args": {}}, evil)
    with pytest.raises(sra.UserError) as error:
        run_main(tmp_path, "--max-train-steps", "1", "--resume", str(evil))
    line = sra.error_line(error.value)
    assert str(evil) in line and line == str(error.value).strip() and "\n" not in line
    assert not marker.exists(), "loading the checkpoint executed code from it"
    # the control: an unsafe load runs the payload
    torch.load(evil, weights_only=False)["model"].close()
    assert marker.exists()


def torch_load_calls(path):
    """(line, weights_only value or None) for each torch.load(...) call in a source file."""
    calls = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "load" and isinstance(node.func.value, ast.Name) \
                and node.func.value.id == "torch":
            flag = next((k.value for k in node.keywords if k.arg == "weights_only"), None)
            calls.append((node.lineno, flag.value if isinstance(flag, ast.Constant) else flag))
    return calls


@pytest.mark.parametrize("name", ["sra.py", "sample.py"])
def test_every_torch_load_is_weights_only(name):
    """Every torch.load in sra.py and sample.py passes weights_only=True;
    no pickle or np allow_pickle."""
    path = os.path.join(HERE, name)
    calls = torch_load_calls(path)
    assert calls, f"no torch.load found in {name}: has the loading moved?"
    assert all(flag is True for _, flag in calls), (
        f"torch.load without weights_only=True in {name}: {calls}")
    source = open(path).read()
    assert "pickle.load" not in source and "allow_pickle=True" not in source


# ==================================================================================================
# sra.py, 7. The training loop, in this process

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained tiny checkpoint: 30 steps of SiT-T/8 at 16 px, batch 16, lr 1e-3, a checkpoint
    every 12 steps, run from its folder with a relative --output-dir. Returns the run folder."""
    out = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(out)
        sra.main(sra.parse_args(TINY + [
            "--batch-size", "16", "--learning-rate", "1e-3", "--max-train-steps", "30",
            "--checkpoint-steps", "12", "--output-dir", "exps", "--exp-name", "run"]))
    return out / "exps" / "run"


def test_training_run_writes_its_folder_and_learns(trained):
    """A run writes args.json, log.txt, one metrics record per logged step, checkpoints at the
    multiples of --checkpoint-steps and at the last step (logged with full paths); it learns."""
    args = json.loads((trained / "args.json").read_text())
    assert (args["num_classes"], args["in_channels"], args["input_size"]) == (10, 3, 16)
    assert args["dataset"] == "builtin" and args["model"] == "SiT-T/8"
    records = metrics(trained)
    assert [m["step"] for m in records] == list(range(1, 31))
    fields = {"step", "epoch", "gen_loss", "align_loss", "align_cos", "align_weight", "grad_norm",
              "lr", "img_per_s", "skipped_steps", "mfu"}
    assert all(m.keys() == fields for m in records)
    assert all(m["lr"] == 1e-3 and m["skipped_steps"] == 0 and m["img_per_s"] > 0
               and m["epoch"] == 0 and m["align_weight"] == 0.2 for m in records)
    first = np.mean([m["gen_loss"] for m in records[:5]])
    assert np.mean([m["gen_loss"] for m in records[-5:]]) < 0.95 * first  # it learns
    assert records[-1]["align_cos"] > records[0]["align_cos"]  # the student aligns
    assert sorted(os.listdir(trained / "checkpoints")) == ["0000012.pt", "0000024.pt",
                                                          "0000030.pt"]
    log = (trained / "log.txt").read_text()
    for step in (12, 24, 30):
        path = trained / "checkpoints" / f"{step:07d}.pt"
        assert os.path.isabs(str(path)) and f"saved checkpoint {path}\n" in log
    assert "step 30/30" in log
    ckpt = torch.load(trained / "checkpoints" / "0000030.pt", weights_only=True)  # no pickle code
    assert ckpt["step"] == 30 and isinstance(ckpt["args"], dict)
    assert not any(k.startswith("ap_head") for k in ckpt["ema"])
    assert any(k.startswith("ap_head") for k in ckpt["model"])


def test_loss_is_denoise_plus_lambda_align_over_the_micro_batches(tmp_path, monkeypatch, small):
    """What the loop backpropagates (recorded at the loss scaler) is (L_denoise + lambda(step)
    L_align) / accum for every micro-batch, lambda from --align-weight and its decay; the logged
    losses are their means over the logged steps."""
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
    """After each step ema <- d ema + (1 - d) model with --ema-decay d; AdamW gets --learning-rate,
    --adam-beta1/2, --adam-epsilon and --adam-weight-decay (a weight with no gradient only decays,
    w (1 - lr wd); one with a gradient moves by lr at the first step); the gradient is clipped to
    --max-grad-norm, over every parameter of the student and its projector."""
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


def test_epochs_and_a_resume_across_epoch_boundaries_mid_accumulation(tmp_path, small):
    """8 images in batches of 2 are 4 micro-batches an epoch; with 3 micro-batches a step, steps
    straddle epochs. --epochs E is E * (4 // 3) steps. A run stopped at step 1 (3 micro-batches
    into epoch 0) and at step 3, each resumed, ends identical to the uninterrupted run: every
    resumed step reads the micro-batches, in the epochs, that the uninterrupted one read."""
    data = make_image_folder(tmp_path / "img")
    flags = ["--data-dir", str(data), "--gradient-accumulation-steps", "3", "--checkpoint-steps",
             "1"]
    run_main(tmp_path, *flags, "--epochs", "2", exp="epochs")
    assert [m["step"] for m in metrics(tmp_path / "epochs")] == [1, 2]
    reference = run_main(tmp_path, *flags, "--max-train-steps", "5", exp="reference")
    assert [m["epoch"] for m in metrics(reference)] == [0, 1, 2, 2, 3]  # of each step's last batch
    for stop_at in (1, 3, 5):
        run_main(tmp_path, *flags, "--max-train-steps", str(stop_at), "--resume", "auto",
                 exp="resumed")
    assert_same_training_state(ckpt_path(tmp_path / "resumed", 5), ckpt_path(reference, 5))
    assert [m["epoch"] for m in metrics(tmp_path / "resumed")] == [0, 1, 2, 2, 3]


def test_data_order_is_the_seeded_shuffle_and_a_resume_goes_on_in_it(tmp_path, monkeypatch,
                                                                      small):
    """The built-in data come in the order torch.randperm gives for (--seed, epoch), as
    DistributedSampler shuffles; a run resumed after step 1 reads on from the 3rd item."""
    read = []
    real_item = sra.ShapesDataset.__getitem__

    def recording_item(self, index):
        read.append(index)
        return real_item(self, index)

    monkeypatch.setattr(sra.ShapesDataset, "__getitem__", recording_item)
    run_main(tmp_path, "--seed", "3", "--max-train-steps", "3", exp="whole")
    order = torch.randperm(50_000, generator=torch.Generator().manual_seed(3 + 0)).tolist()
    assert read == order[:6]  # 3 steps of 2
    read.clear()
    run_main(tmp_path, "--seed", "3", "--max-train-steps", "1", exp="resumed")
    run_main(tmp_path, "--seed", "3", "--max-train-steps", "3", "--resume", "auto", exp="resumed")
    assert read == order[:2] + order[2:6]


def deterministic_losses(model, ema, x, y, args, diffusion, generator):
    """A stand-in for sra.training_losses that draws nothing: t = 0.5, x_t = x. It still runs the
    student with its projector, and the teacher."""
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
    a = torch.load(big / "checkpoints" / "0000003.pt", weights_only=True)["model"]
    b = torch.load(accumulated / "checkpoints" / "0000003.pt", weights_only=True)["model"]
    update = max((a[k] - initial[k]).abs().max().item() for k in a)
    assert update > 1e-3  # three steps of lr 1e-3 moved the weights
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3 * update  # float rounding


def test_align_weight_schedule_is_applied_in_the_loop(tmp_path):
    """The loop uses lambda(step) of the step being taken: constant until --align-decay-start,
    then tenfold per --align-decay-steps; constant 0.5 for cos (the official code decays sml1
    only)."""
    run_dir = run_main(tmp_path, "--align-decay-start", "2", "--align-decay-steps", "4",
                       "--max-train-steps", "7", exp="sml1")
    weights = [m["align_weight"] for m in metrics(run_dir)]
    # the update of logged step k is taken at step counter k - 1
    expected = [0.2 * 0.1 ** (max(0, k - 1 - 2) / 4) for k in range(1, 8)]
    assert weights == pytest.approx(expected, rel=1e-12)
    assert weights[:3] == [0.2, 0.2, 0.2] and weights[-1] == pytest.approx(0.02)
    args = sra.parse_args(TINY + ["--loss-type", "cos", "--align-decay-start", "2"])
    assert args.align_decay_steps == 0
    run_dir = run_main(tmp_path, "--loss-type", "cos", "--align-decay-start", "2",
                       "--max-train-steps", "5", exp="cos")
    assert [m["align_weight"] for m in metrics(run_dir)] == [0.5] * 5


def test_main_runs_dit_with_the_cos_loss(tmp_path):
    """DiT with --loss-type cos trains to the end: finite losses, lambda 0.5, a checkpoint of a
    learned-sigma model with plain names."""
    run_dir = run_main(tmp_path, "--model", "DiT-T/8", "--loss-type", "cos", "--max-train-steps",
                       "2")
    ckpt = assert_finished(run_dir, 2)
    assert (ckpt["args"]["model"], ckpt["args"]["loss_type"]) == ("DiT-T/8", "cos")
    assert ckpt["model"]["final_layer.linear.bias"].shape == (8 * 8 * 6,)  # C_out = 2C
    assert all(m["align_weight"] == 0.5 for m in metrics(run_dir))


def test_main_runs_with_grad_checkpointing(tmp_path, monkeypatch):
    """--grad-checkpointing reaches the model (every student block is checkpointed) and the run
    trains to the end with a loadable checkpoint."""
    real_checkpoint = torch.utils.checkpoint.checkpoint
    checkpointed = []

    def counting_checkpoint(function, *args, **kwargs):
        checkpointed.append(function)
        return real_checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting_checkpoint)
    run_dir = run_main(tmp_path, "--grad-checkpointing", "--max-train-steps", "2")
    assert len(checkpointed) == 2 * 6  # the 6 blocks of the student, at each of the 2 steps
    assert_finished(run_dir, 2)


def test_main_with_compile_trains_and_saves_plain_names(tmp_path, monkeypatch):
    """--compile: the student and the teacher go through torch.compile, the run ends with finite
    losses, and the checkpoint has plain parameter names."""
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
    ckpt = assert_finished(run_dir, 2)
    assert {k for k in ckpt["model"] if k.endswith("qkv.weight")} == {
        "blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight"}  # the 2-block T of this test


def test_compiled_teacher_follows_the_ema_updates():
    """The compiled teacher reads the EMA's weights as update_ema changes them in place: no stale
    copy of the weights lives in the compiled graph."""
    ema = randomize(tiny(depth=2)).requires_grad_(False).eval()
    eager = ema.forward_features
    ema.forward_features = torch.compile(ema.forward_features, backend="aot_eager")
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 1])
    try:
        before = ema.forward_features(x, t, y, 2)
        params = list(ema.parameters())
        sra.update_ema(params, [p + 0.1 for p in params], decay=0.5)
        after = ema.forward_features(x, t, y, 2)
    finally:
        torch._dynamo.reset()
    assert torch.allclose(after, eager(x, t, y, 2), atol=1e-5)
    assert not torch.allclose(after, before, atol=1e-3)


def failing_compile(*args, **kwargs):
    """A torch.compile whose compiled functions fail when called, as on a machine without a
    compiler."""
    def compiled(*a, **k):
        raise RuntimeError("no C++ compiler found")
    return compiled


def test_compile_failure_is_reported_once_and_training_runs_eagerly(tmp_path, monkeypatch):
    """When compilation fails, log.txt says so once and the run trains eagerly to the end."""
    monkeypatch.setattr(torch, "compile", failing_compile)
    run_dir = run_main(tmp_path, "--compile", "--max-train-steps", "2")
    log = (run_dir / "log.txt").read_text()
    assert log.count("torch.compile failed") == 1 and "no C++ compiler found" in log
    assert "step 2/2" in log
    assert_finished(run_dir, 2)


class SyncGuard:
    """Makes the torch.Tensor methods that wait for the device raise while armed (from the first
    thing a step does to the last); records every hit, in case something swallows the error."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.armed = False
        self.arms = 0
        self.hits = []
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self.guarded(name, getattr(torch.Tensor, name)))

    def guarded(self, name, method):
        """`method`, raising while the guard is armed."""
        @functools.wraps(method)
        def wrapper(tensor, *args, **kwargs):
            if self.armed:
                self.hits.append(name)
                raise AssertionError(f"host-device sync inside a training step: Tensor.{name}")
            return method(tensor, *args, **kwargs)
        return wrapper

    def set(self, armed):
        """Arm or disarm."""
        self.armed = armed
        self.arms += armed
        if torch.cuda.is_available():  # on a GPU, CUDA reports every other sync as well
            torch.cuda.set_sync_debug_mode("error" if armed else "default")


@pytest.mark.parametrize("model, precision, accum, extra", [
    (model, precision, accum, []) for model in ("SiT-T/8", "DiT-T/8")
    for precision in ("no", "fp16", "bf16") for accum in ("1", "2")] + [
    ("SiT-T/8", "bf16", "2", ["--grad-checkpointing"]),
    ("DiT-T/8", "no", "1", ["--grad-checkpointing"])])
def test_no_host_device_sync_inside_a_training_step(monkeypatch, model, precision, accum, extra):
    """From prepare_batch to update_ema a step never waits for the device (no .item(), .tolist(),
    bool(), float(), .cpu(), .numpy() on tensors): fp32, fp16 with its GradScaler and bf16, with
    accumulation and gradient checkpointing. (--compile and DDP: only the GPU check covers them.)"""
    guard = SyncGuard(monkeypatch)
    real_prepare, real_update = sra.prepare_batch, sra.update_ema

    def prepare_batch(*args):
        guard.set(True)  # the first thing a step does
        return real_prepare(*args)

    def update_ema(*args):
        real_update(*args)
        guard.set(False)  # the last thing: the log step after it may read the device

    monkeypatch.setattr(sra, "prepare_batch", prepare_batch)
    monkeypatch.setattr(sra, "update_ema", update_ema)
    args = sra.parse_args(["--bench", "--bench-steps", "1", "--bench-shape", "3", "16", "16",
                           "--batch-size", "2", "--num-workers", "0", "--model", model,
                           "--mixed-precision", precision, "--gradient-accumulation-steps", accum,
                           *extra])
    try:
        result = sra.main(args)
    finally:
        guard.set(False)
    assert guard.hits == []
    assert guard.arms == (sra.BENCH_WARMUP + 1) * int(accum)  # every micro-batch was guarded
    assert result["dtype"] == {"no": "fp32"}.get(precision, precision)
    assert result["grad_checkpointing"] == bool(extra) and math.isfinite(result["step_s_median"])


def test_bench_is_the_training_loop_and_its_figures_follow_a_clock(capsys, monkeypatch):
    """--bench runs the training loop's real loss, vanilla then SRA, on a virtual clock: warm-up
    steps take 5 s, timed ones 0.25 s (vanilla) and 0.375 s (SRA), so the medians, img/s (the
    global batch, 2 x 2 micro-batches), TFLOP/s, MFU (at a peak of 1 TFLOP/s) and the overhead
    ratio are known numbers; FLOPs per image are train_flops (checked against a counter above)."""
    clock, calls, steps = [0.0], [], []
    real_losses, real_update = sra.training_losses, sra.update_ema

    def counting_losses(model, ema, x, y, args, diffusion, generator):
        calls.append(args.no_sra)
        return real_losses(model, ema, x, y, args, diffusion, generator)

    def timed_update(*args):
        real_update(*args)
        steps.append(1)
        warm = len(steps) % (sra.BENCH_WARMUP + 2) in range(1, sra.BENCH_WARMUP + 1)
        with_sra = len(steps) > sra.BENCH_WARMUP + 2
        clock[0] += 5.0 if warm else 0.375 if with_sra else 0.25

    monkeypatch.setattr(sra, "training_losses", counting_losses)
    monkeypatch.setattr(sra, "update_ema", timed_update)
    monkeypatch.setattr(sra.time, "perf_counter", lambda: clock[0])
    sra.bench(sra.parse_args(["--bench", "--model", "SiT-T/4", "--bench-shape", "4", "32", "32",
                              "--batch-size", "2", "--gradient-accumulation-steps", "2",
                              "--bench-steps", "2", "--num-workers", "0", "--peak-tflops", "1"]))
    monkeypatch.undo()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    vanilla, with_sra = [json.loads(line) for line in lines]
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


@slow
def test_two_process_torchrun_cpu(tmp_path):
    """torchrun with 2 CPU processes: rank 0 alone writes the folder, the global batch counts
    both ranks, and the checkpoint holds a distinct random stream per rank."""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "sra.py", *TINY, "--max-train-steps", "3",
                           "--output-dir", str(tmp_path), "--exp-name", "run"],
                          cwd=HERE, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "run"
    log = (run_dir / "log.txt").read_text()
    assert "2 process(es)" in log and "global batch 4" in log
    assert log.count("step 3/3") == 1 and log.count("saved checkpoint") == 1  # rank 0 only
    ckpt = assert_finished(run_dir, 3)
    assert len(ckpt["rng"]) == 2 and not torch.equal(ckpt["rng"][0], ckpt["rng"][1])


# ==================================================================================================
# sra.py, 8. Fault tolerance: kills, preemption, full disks, bad files and data, NaNs, hung ranks

STEPS = 12  # length of the reference run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted subprocess run of STEPS steps, a checkpoint every 2 steps, stdout a pipe:
    .dir (the run folder) and .proc (the CompletedProcess)."""
    root = tmp_path_factory.mktemp("reference")
    proc = train(root, "--max-train-steps", str(STEPS), "--checkpoint-steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(dir=os.path.join(root, "run"), proc=proc)


@slow
def test_sigkill_then_sigterm_then_resume_auto_is_bit_identical(tmp_path, reference):
    """SIGKILL, resume, SIGTERM (checkpoint, exit 0), resume:
    bit-identical to an uninterrupted run."""
    run_dir, log_path = tmp_path / "run", tmp_path / "run" / "log.txt"
    proc = start(tmp_path, "--max-train-steps", "1000", "--checkpoint-steps", "2")
    try:
        wait_for(lambda: "step 3/" in read(log_path), "step 3", proc=proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == -signal.SIGKILL and "done:" not in read(log_path)
    killed_at = steps_saved(run_dir)[-1]
    before = steps_saved(run_dir)

    # --checkpoint-steps 1000: the only new checkpoint of this leg is the one SIGTERM writes.
    proc = start(tmp_path, "--max-train-steps", "1000", "--checkpoint-steps", "1000",
                 "--resume", "auto")
    resumed = f"resumed from {ckpt_path(run_dir, killed_at)} at step {killed_at}"
    try:
        wait_for(lambda: f"step {killed_at + 1}/" in read(log_path).partition(resumed)[2],
                 "a step after resuming", proc=proc)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)  # finishes the current step, saves and exits by itself
    finally:
        stop(proc)
    assert proc.returncode == 0, read(tmp_path / "run.out")[-3000:]
    step = steps_saved(run_dir)[-1]
    path = ckpt_path(run_dir, step)
    assert steps_saved(run_dir) == before + [step] and killed_at < step < STEPS
    assert sra.load_checkpoint(path)["step"] == step
    lines = read(log_path).splitlines()
    stopped = [i for i, line in enumerate(lines)
               if line.endswith(f"] SIGTERM: stopped at step {step}; continue with --resume auto")]
    assert len(stopped) == 1 and lines[stopped[0] - 1].endswith(
        f"] saved checkpoint {path}"), lines[-4:]

    run_main(tmp_path, "--max-train-steps", str(STEPS), "--checkpoint-steps", "1000",
             "--resume", "auto")
    assert f"resumed from {path} at step {step}" in read(log_path)
    assert_same_training_state(ckpt_path(run_dir, STEPS), ckpt_path(reference.dir, STEPS))


SLOW = r"""
import os, sys, time, torch
import sra
where = os.environ["SLOW"]
real_item, real_losses, real_save = sra.ShapesDataset.__getitem__, sra.training_losses, torch.save
def slow_item(self, index):  # in the workers: two of them take 0.2 s a batch of 2
    time.sleep(0.2)
    return real_item(self, index)
def slow_losses(*args):
    time.sleep(0.1)
    return real_losses(*args)
def slow_save(obj, f):
    real_save(obj, f)
    open(os.environ["SAVING"], "w").close()  # the file is half made: not yet fsynced, not renamed
    time.sleep(1)
if where == "fetch":
    sra.ShapesDataset.__getitem__ = slow_item
if where == "step":
    sra.training_losses = slow_losses
if where == "save":
    torch.save = slow_save
sra.main(sra.parse_args(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
    """An uninterrupted run of STEPS steps with --gradient-accumulation-steps 2 (the reference)."""
    root = tmp_path_factory.mktemp("accumulated")
    proc = train(root, "--max-train-steps", str(STEPS), "--gradient-accumulation-steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return os.path.join(root, "run")


@slow
@pytest.mark.parametrize("moment", ["fetch", "step", "step, accumulating", "save"])
def test_sigterm_to_every_pid_of_the_job_checkpoints_and_resumes_bit_identical(
        moment, tmp_path, reference, accumulated):
    """SIGTERM to the trainer and to each DataLoader worker by pid (SLURM at a time limit), while
    batches are fetched, mid-step (also with 2 micro-batches a step) or during a checkpoint write:
    a checkpoint of a completed step, logged, exit 0, no process left; resumed, bit-identical."""
    accum = ["--gradient-accumulation-steps", "2"] if "accumulating" in moment else []
    script, saving = tmp_path / "slow.py", tmp_path / "saving"
    script.write_text(SLOW)
    cmd = [sys.executable, str(script), *TINY, *accum, "--num-workers", "2", "--output-dir",
           str(tmp_path), "--exp-name", "run", "--max-train-steps", "1000",
           "--checkpoint-steps", "2" if moment == "save" else "1000"]
    env = dict(ENV, SLOW=moment.split(",")[0], SAVING=str(saving))
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=open(tmp_path / "run.out", "w"),
                            stderr=subprocess.STDOUT)
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
    finally:
        stop(proc, *pids)
    assert proc.returncode == 0, read(tmp_path / "run.out")[-3000:]
    step = steps_saved(run_dir)[-1]
    assert step < STEPS and sra.load_checkpoint(ckpt_path(run_dir, step))["step"] == step
    assert f"SIGTERM: stopped at step {step}; continue with --resume auto" in read(log_path)
    assert not glob.glob(str(run_dir / "checkpoints" / "*.tmp"))

    proc = train(tmp_path, *accum, "--resume", "auto", "--max-train-steps", str(STEPS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = accumulated if accum else reference.dir
    assert_same_training_state(ckpt_path(run_dir, STEPS), ckpt_path(ref, STEPS))


@slow
def test_sigkill_of_a_dataloader_worker_is_one_line_naming_it_and_the_last_checkpoint(tmp_path):
    """One DataLoader worker killed (an OOM killer): one line naming the worker and the last good
    checkpoint, exit 2, no hang, no half-written file; that checkpoint loads."""
    proc = start(tmp_path, "--num-workers", "2", "--max-train-steps", "1000", "--checkpoint-steps",
                 "2", out="run.out")
    run_dir = tmp_path / "run"
    try:
        wait_for(lambda: "saved checkpoint" in read(run_dir / "log.txt"), "a checkpoint", proc=proc)
        workers = children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        stop(proc)
    lines = read(tmp_path / "run.out").strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith(
        "error: the data loader failed"), lines[-5:]
    good = ckpt_path(run_dir, steps_saved(run_dir)[-1])
    # PyTorch's "DataLoader worker (pid(s) P) exited unexpectedly", or ours when the worker died
    # while it sent a batch
    assert re.search(rf"DataLoader worker \(pid(\(s\))? {workers[1]}\)", lines[-1]), lines[-1]
    assert lines[-1].endswith(f"last good checkpoint: {good}") and "Traceback" not in lines[-2]
    assert sra.load_checkpoint(good) and not glob.glob(str(run_dir / "checkpoints" / "*.tmp"))


@slow
def test_checkpoint_that_cannot_be_written_is_one_line_and_leaves_no_partial_file(tmp_path):
    """A checkpoint write that fails for real (EFBIG): one line with the reason and the last good
    checkpoint, exit 2, the .tmp removed, the last good checkpoint intact."""
    assert train(tmp_path, "--max-train-steps", "2").returncode == 0
    good = ckpt_path(tmp_path / "run", 2)
    before = open(good, "rb").read()
    cmd = [sys.executable, SRA, *TINY, "--output-dir", str(tmp_path), "--exp-name", "run",
           "--resume", "auto", "--max-train-steps", "4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180,
                          preexec_fn=limit_file_size)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"error: cannot write checkpoint "
                                   f"{ckpt_path(tmp_path / 'run', 4)}"
                                   f": File too large; last good checkpoint: {good}")
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["0000002.pt"]
    assert open(good, "rb").read() == before


@slow
def test_torchrun_checkpoint_that_cannot_be_written_ends_every_rank(tmp_path):
    """torchrun, 2 ranks: rank 0 cannot write its checkpoint: its one line, and every process of
    the job has exited within 30 s (none waits for rank 0)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SRA,
           *TINY, "--num-workers", "1", "--output-dir", str(tmp_path), "--exp-name", "run",
           "--max-train-steps", "1000", "--checkpoint-steps", "3"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=open(tmp_path / "run.out", "w"),
                            stderr=subprocess.STDOUT, preexec_fn=limit_file_size)
    pids = []
    try:
        wait_for(lambda: "step 2/" in read(tmp_path / "run" / "log.txt"), "step 2", proc=proc)
        pids = job_pids(proc.pid)
        proc.wait(timeout=30)
        wait_for(lambda: not any(map(alive, pids)), "every process to exit", timeout=10)
    finally:
        stop(proc, *pids)
    path = ckpt_path(tmp_path / "run", 3)
    assert proc.returncode != 0
    assert (f"error: cannot write checkpoint {path}: File too large; last good checkpoint: none yet"
            in read(tmp_path / "run.out"))
    assert os.listdir(tmp_path / "run" / "checkpoints") == []


DDP_STEPS = 12  # the final step of the preempted DDP run


@slow
@pytest.mark.parametrize("who", ["rank 1", "every pid"])
def test_sigterm_to_ddp_ranks_stops_every_rank_within_a_step_and_resumes_bit_identical(who,
                                                                                       tmp_path):
    """torchrun: SIGTERM to rank 1 alone (exit 0), or to every process of the job (the agent, both
    ranks, their DataLoader workers; torchrun then reports the signal): both ranks stop at the same
    step, within a step of the signal, and checkpoint; resume is bit-identical."""
    flags = ["--checkpoint-steps", "1000", "--num-workers", "1"]
    ref = torchrun(tmp_path, *flags, "--max-train-steps", str(DDP_STEPS), exp="ref")
    proc = torchrun(tmp_path, *flags, "--max-train-steps", "1000", exp="run")
    run_dir, log_path, pids = tmp_path / "run", tmp_path / "run" / "log.txt", []
    try:
        wait_for(lambda: "step 3/" in read(log_path), "step 3", proc=proc)
        workers = {rank_of(pid): pid for pid in children(proc.pid)}
        assert sorted(workers) == [0, 1], workers
        # rank 1 neither logs nor saves
        pids = job_pids(proc.pid) if who == "every pid" else [workers[1]]
        assert len(pids) in (1, 5), pids  # (the agent, 2 ranks, a DataLoader worker each)
        # read just before the signal: the log may lag behind
        last = logged_steps(read(log_path))[-1]
        for pid in pids:
            os.kill(pid, signal.SIGTERM)
        proc.wait(timeout=60)
        wait_for(lambda: not any(map(alive, pids)), "every process to exit", timeout=10)
        ref.wait(timeout=120)
    finally:
        stop(proc, *pids)
        stop(ref)
    assert (proc.returncode == 0) == (who == "rank 1"), read(tmp_path / "run.out")[-3000:]
    assert ref.returncode == 0, read(tmp_path / "ref.out")[-3000:]
    [step] = steps_saved(run_dir)
    assert last < step <= last + 2 and step < DDP_STEPS, (last, step)  # acted on within a step
    log = read(log_path)
    assert f"SIGTERM: stopped at step {step}; continue with --resume auto" in log
    assert f"done: {step} steps" in log and logged_steps(log)[-1] == step
    ckpt = sra.load_checkpoint(ckpt_path(run_dir, step))
    # both ranks' streams, gathered at that step
    assert ckpt["step"] == step and len(ckpt["rng"]) == 2

    proc = torchrun(tmp_path, *flags, "--max-train-steps", str(DDP_STEPS), "--resume", "auto",
                    out="resume.out")
    try:
        proc.wait(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode == 0, read(tmp_path / "resume.out")[-3000:]
    assert f"resumed from {ckpt_path(run_dir, step)} at step {step}" in read(log_path)
    assert_same_training_state(ckpt_path(run_dir, DDP_STEPS),
                               ckpt_path(tmp_path / "ref", DDP_STEPS))


STUBS = r'''
import torch
import sra
from test_sra import deterministic_losses, identity_batch

kept = {}
real_build = sra.build


def keeping_build(args, device):
    parts = real_build(args, device)
    kept.update(model=parts[0], ema=parts[1])
    return parts
'''

DDP_SCRIPT = STUBS + (r'''
import os, sys
sra.build, sra.training_losses, sra.prepare_batch = keeping_build, deterministic_losses, '''
                      r'''identity_batch
sra.main(sra.parse_args(sys.argv[1:]))
torch.save({name: part.state_dict() for name, part in kept.items()}, f"rank{os.environ['RANK']}.pt")
''')

EXACT = ["--cfg-prob", "0", "--max-train-steps", "3", "--checkpoint-steps", "1000",
         "--learning-rate", "0.1", "--adam-epsilon", "1", "--max-grad-norm", "1e6",
         "--ema-decay", "0.5"]


@slow
def test_ddp_ranks_stay_identical_and_match_one_process_with_the_same_global_batch(tmp_path,
                                                                                   monkeypatch):
    """DDP + no_sync accumulation: ranks identical (model, projector, EMA)
    and equal to 1 process, batch 8."""
    script = tmp_path / "ddp_script.py"
    script.write_text(DDP_SCRIPT)
    proc = torchrun(tmp_path, *EXACT, "--batch-size", "2", "--gradient-accumulation-steps", "2",
                    exp="ddp", script=str(script))
    try:
        # One process, batch 8: step k reads shuffled indices 8k..8k+7; rank r under DDP reads
        # r, r+2, r+4, ... of the same order (both samplers see the same permutation of
        # (seed, epoch)), so its two micro-batches of 2 are 8k+r+{0, 2} and 8k+r+{4, 6}:
        # together the same 8 samples.
        monkeypatch.setattr(sra, "training_losses", deterministic_losses)
        monkeypatch.setattr(sra, "prepare_batch", identity_batch)
        run_main(tmp_path, *EXACT, "--batch-size", "8", exp="single")
        proc.wait(timeout=120)
    finally:
        stop(proc)
    assert proc.returncode == 0, read(tmp_path / "ddp.out")[-3000:]
    rank0, rank1 = load(tmp_path / "rank0.pt"), load(tmp_path / "rank1.pt")
    assert any(k.startswith("ap_head.") for k in rank0["model"])
    assert_identical(rank0, rank1, "rank 0 vs rank 1")
    single = load(ckpt_path(tmp_path / "single", 3))
    for part in ("model", "ema"):
        assert rank0[part].keys() == single[part].keys()
        for name, value in single[part].items():
            torch.testing.assert_close(rank0[part][name], value, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{part}.{name}: {m}")
    # zero at init: it trained
    assert rank0["model"]["final_layer.linear.weight"].abs().max() > 1e-3


@slow
def test_resume_auto_falls_back_past_corrupt_checkpoints_and_ignores_tmp(tmp_path, reference):
    """--resume auto names and skips truncated/garbage checkpoints, never takes *.tmp,
    resumes exactly."""
    run_dir = tmp_path / "run"
    os.makedirs(run_dir / "checkpoints")
    shutil.copy(ckpt_path(reference.dir, 2), ckpt_path(run_dir, 2))
    with open(ckpt_path(reference.dir, 8), "rb") as src:
        start_of_file = src.read(1 << 20)
    # truncated: a full disk, a killed copy/write
    for name in ("0000004.pt", "0000008.pt", "0000009.pt.tmp"):
        (run_dir / "checkpoints" / name).write_bytes(start_of_file)
    (run_dir / "checkpoints" / "0000003.pt").write_bytes(os.urandom(4096))  # garbage

    # --keep-last 1 with a newer unreadable 0000008.pt: the fresh checkpoint is never the one pruned
    run_main(tmp_path, "--max-train-steps", "6", "--checkpoint-steps", "2", "--keep-last", "1",
             "--resume", "auto")
    log = read(run_dir / "log.txt")
    for step in (8, 4, 3):
        assert f"warning: {ckpt_path(run_dir, step)} is not a loadable checkpoint" in log
    assert f"resumed from {ckpt_path(run_dir, 2)} at step 2" in log
    assert ".tmp" not in log
    assert_same_training_state(ckpt_path(run_dir, 6), ckpt_path(reference.dir, 6))
    assert steps_saved(run_dir) == [6, 8]
    messages = []  # the next --resume auto finds the new checkpoint, past the unreadable 0000008.pt
    assert sra.find_resume_checkpoint("auto", run_dir, messages.append)[0] == ckpt_path(run_dir, 6)
    assert len(messages) == 1 and ckpt_path(run_dir, 8) in messages[0]


def test_keep_last_prunes_after_save_and_spares_keep_every(tmp_path, monkeypatch, small):
    """Pruning runs only once the new checkpoint is complete on disk; milestones survive;
    K newest kept."""
    real_prune, calls = sra.prune_checkpoints, []

    def checked_prune(run_dir, keep_last, keep_every, current):
        calls.append(current)
        newest = sra.list_checkpoints(run_dir)
        assert newest and newest[0] == ckpt_path(run_dir, current), (
            f"pruning before step {current} is saved")
        assert sra.load_checkpoint(newest[0])["step"] == current, "the new checkpoint is incomplete"
        assert not glob.glob(os.path.join(run_dir, "checkpoints", "*.tmp")), (
            "a write is still in progress")
        return real_prune(run_dir, keep_last, keep_every, current)

    monkeypatch.setattr(sra, "prune_checkpoints", checked_prune)
    run_main(tmp_path, "--max-train-steps", "7", "--checkpoint-steps", "1", "--keep-last", "2",
             "--keep-every", "3")
    assert calls == [1, 2, 3, 4, 5, 6, 7]
    # the milestones 3 and 6, the newest two 6 and 7
    assert steps_saved(tmp_path / "run") == [3, 6, 7]


LATENT = ["--model", "SiT-T/4", "--resolution", "32", "--batch-size", "2", "--num-workers", "0",
          "--log-every", "1"]


@slow
def test_corrupt_image_in_a_worker_is_one_line_naming_it(tmp_path, monkeypatch, small):
    """A corrupt image read in a DataLoader worker (--num-workers 2):
    a UserError, one line naming it."""
    data = make_image_folder(tmp_path / "data", classes=("a", "b"), per_class=2)
    bad = data / "b" / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    # After a worker's error, torch's DataLoader waits 2 x 5 s for its workers to leave
    # before it kills them
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.2)
    # 5 images, 2 steps an epoch: read within a few epochs
    with pytest.raises(sra.UserError) as error:
        run_main(tmp_path, "--data-dir", str(data), "--num-workers", "2", "--max-train-steps", "40",
                 "--checkpoint-steps", "1000")
    message, line = str(error.value), sra.error_line(error.value)
    del error
    # the loader (in the traceback's frames) shuts its workers down now, with the short wait
    gc.collect()
    assert "DataLoader worker" in message  # it did come from a worker
    one_line_naming(line, bad)


@pytest.mark.parametrize("fault", ["truncated", "wrong-shape", "missing"])
def test_bad_latent_is_one_line_naming_it_when_first_read(tmp_path, fault, small):
    """A truncated, wrong-shaped or missing latent: a UserError naming it, when first read,
    not at start-up."""
    data = make_latent_folder(tmp_path / "data")
    bad = data / "vae-sd" / "00" / "2.npy"
    if fault == "truncated":
        bad.write_bytes(bad.read_bytes()[:100])
    elif fault == "wrong-shape":
        np.save(bad, np.zeros((8, 8, 8), np.float32))  # a 64 px latent in a 32 px dataset
    else:
        bad.unlink()
    assert len(sra.LatentDataset(str(data), 32)) == 6  # start-up does not open the files
    with pytest.raises(sra.UserError) as error:
        run_main(tmp_path, "--data-dir", str(data), "--max-train-steps", "20", base=LATENT)
    one_line_naming(error.value, bad)
    assert "steps 0 -> 20" in read(tmp_path / "run" / "log.txt")  # training had started


def fault_at(monkeypatch, call, fault):
    """Wrap sra.training_losses: on its `call`-th call the denoising loss goes through fault(loss).
    Returns the list of (denoise, grad norm) seen per call."""
    real_losses, real_clip, seen = sra.training_losses, torch.nn.utils.clip_grad_norm_, []

    def losses(*args, **kwargs):
        denoise, align, cos = real_losses(*args, **kwargs)
        denoise = fault(denoise) if len(seen) + 1 == call else denoise
        seen.append([denoise.item(), None])
        return denoise, align, cos

    def clip(*args, **kwargs):
        norm = real_clip(*args, **kwargs)
        seen[-1][1] = norm.item()
        return norm

    monkeypatch.setattr(sra, "training_losses", losses)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    return seen


def assert_stopped_at_last_good(error, run_dir, good):
    """The error names the last good checkpoint, which holds only finite numbers,
    and none came after."""
    message = str(error.value)
    assert re.search(r"^non-finite loss or gradient by step \d+", message), message
    assert ckpt_path(run_dir, good) in message
    assert steps_saved(run_dir) == [good]
    ckpt = sra.load_checkpoint(ckpt_path(run_dir, good))
    assert all(all_finite(ckpt[part]) for part in ("model", "ema"))


def test_nan_loss_stops_and_names_last_good_checkpoint(tmp_path, monkeypatch, small):
    """A NaN loss at step 3: UserError naming checkpoint 2; no checkpoint after it is written."""
    seen = fault_at(monkeypatch, 3, lambda loss: loss * math.nan)
    with pytest.raises(sra.UserError) as error:
        run_main(tmp_path, "--max-train-steps", "10", "--checkpoint-steps", "2",
                 "--log-every", "100")
    assert math.isnan(seen[2][0])
    assert_stopped_at_last_good(error, tmp_path / "run", 2)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_nonfinite_gradient_of_a_finite_loss_stops_the_run(tmp_path, monkeypatch, small, precision):
    """fp32/bf16: a finite loss whose gradient is NaN stops the run
    before a non-finite checkpoint."""
    # sqrt(0 * loss) is 0, and its gradient 0 * (1 / (2 sqrt(0))) = 0 * inf = NaN.
    # At step 4, a checkpoint step: the loss check alone would let it be saved
    # (the weights turn NaN only in the optimizer step).
    seen = fault_at(monkeypatch, 4, lambda loss: loss + torch.sqrt(0 * loss))
    with pytest.raises(sra.UserError) as error:
        run_main(tmp_path, "--max-train-steps", "10", "--checkpoint-steps", "2",
                 "--log-every", "100", "--mixed-precision", precision)
    assert len(seen) == 4 and all(math.isfinite(loss) for loss, _ in seen)
    assert [math.isfinite(norm) for _, norm in seen] == [True, True, True, False]
    assert_stopped_at_last_good(error, tmp_path / "run", 2)


class HugeScaler(torch.amp.GradScaler):
    """Starts at 2^24, so that the first fp16 backwards overflow;
    records its scale after each step."""

    scales = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "init_scale": 2.0 ** 24})
        HugeScaler.scales = []

    def update(self, new_scale=None):
        super().update(new_scale)
        if self.is_enabled():
            self.scales.append(self.get_scale())


def test_fp16_overflow_is_a_counted_skipped_step(tmp_path, monkeypatch, small):
    """fp16 overflows skip the step and count in metrics.jsonl's skipped_steps, at that step;
    the run goes on."""
    monkeypatch.setattr(torch.amp, "GradScaler", HugeScaler)
    run_main(tmp_path, "--mixed-precision", "fp16", "--max-train-steps", "8",
             "--checkpoint-steps", "1000")
    metrics = [json.loads(line) for line in read(tmp_path / "run" / "metrics.jsonl").splitlines()]
    # cumulative, per step
    halvings = [round(math.log2(2.0 ** 24 / scale)) for scale in HugeScaler.scales]
    assert len(halvings) == 8 and 0 < halvings[-1] < 8  # some steps skipped, some taken
    assert [m["step"] for m in metrics] == list(range(1, 9))
    # the counter moves at the step that overflowed
    assert [m["skipped_steps"] for m in metrics] == halvings
    ckpt = sra.load_checkpoint(ckpt_path(tmp_path / "run", 8))
    assert ckpt["scaler"]["scale"] == HugeScaler.scales[-1]
    assert all_finite(ckpt["model"]) and all_finite(ckpt["ema"])


DDP_FLAGS = ["--max-train-steps", "1000", "--checkpoint-steps", "1000"]


@slow
def test_torchrun_worker_death_ends_the_run(tmp_path):
    """torchrun, 2 gloo ranks, SIGKILL one mid-training: everything exits non-zero within 25 s."""
    # 25 s is below torchrun's 30 s grace between its SIGTERM and SIGKILL to the survivor:
    # the surviving trainer must leave by itself (its collective fails),
    # not hang until the launcher kills it.
    proc = torchrun(tmp_path, *DDP_FLAGS, out="torchrun.out")
    workers = []
    try:
        wait_for(lambda: "step 3/" in read(tmp_path / "run" / "log.txt"), "step 3", proc=proc)
        workers = children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGKILL)
        start_time = time.monotonic()
        proc.wait(timeout=25)
        assert time.monotonic() - start_time < 25
        wait_for(lambda: not any(alive(w) for w in workers), "the surviving worker to exit",
                 timeout=10)
    finally:
        stop(proc, *workers)
    assert proc.returncode != 0


HANG = r"""
import os, signal, sys
import sra
if os.environ["RANK"] == "1":
    real, calls = getattr(sra, os.environ["HANG_IN"]), []
    def hang(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            os.kill(os.getpid(), signal.SIGSTOP)
        return real(*args, **kwargs)
    setattr(sra, os.environ["HANG_IN"], hang)
sra.main(sra.parse_args(sys.argv[1:]))
"""


@slow
def test_surviving_rank_fails_within_dist_timeout_when_its_peer_hangs(tmp_path):
    """A peer hung in or between collectives, no launcher to step in:
    rank 0 fails after --dist-timeout."""
    # Not after the default 30 minutes. (A dead peer, as opposed to a hung one, closes its sockets
    # and gloo fails at once.) Two jobs at once: rank 1 hangs before its gradient all-reduce in one,
    # after it in the other, where rank 0 waits in the stop flag's all-reduce on the separate
    # CPU group.
    jobs = {}
    try:
        for where in ("training_losses", "update_ema"):
            env = dict(ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
                       LOCAL_WORLD_SIZE="2", HANG_IN=where)
            cmd = [sys.executable, "-c", HANG, *TINY, *DDP_FLAGS, "--output-dir", str(tmp_path),
                   "--exp-name", where, "--dist-timeout", "5"]
            jobs[where] = [subprocess.Popen(cmd, cwd=tmp_path,
                                            env=dict(env, RANK=str(r), LOCAL_RANK=str(r)),
                                            stdout=open(tmp_path / f"{where}{r}.out", "w"),
                                            stderr=subprocess.STDOUT) for r in range(2)]
        for where, (rank0, _) in jobs.items():
            wait_for(lambda: logged_steps(read(tmp_path / where / "log.txt"))[-1:] == [3],
                     f"{where}: step 3", proc=rank0)
        start_time = time.monotonic()  # rank 1 freezes in step 4, rank 0 waits for it from then on
        for where, (rank0, _) in jobs.items():
            try:
                rank0.wait(timeout=max(1.0, start_time + 25 - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank 0 still waits 25 s after rank 1 hung in {where} "
                            f"(--dist-timeout 5)")
            assert rank0.returncode != 0, read(tmp_path / f"{where}0.out")[-2000:]
            assert logged_steps(read(tmp_path / where / "log.txt"))[-1] == 3
    finally:
        for ranks in jobs.values():
            for proc in ranks:
                stop(proc)


BAR = re.compile(r"\| ?\d+/\d+ \[")  # tqdm's "...| 2/3 [00:01<00:00, 2.1step/s"


@slow
def test_progress_bar_on_a_terminal_only(tmp_path, reference):
    """A tqdm bar when stdout is a terminal;
    plain lines (no bar, no \\r) in log.txt and through a pipe."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    cmd = [sys.executable, SRA, *TINY, "--output-dir", str(tmp_path), "--exp-name", "run",
           "--max-train-steps", "3", "--checkpoint-steps", "1000"]
    with open(tmp_path / "stderr.txt", "w") as stderr:  # a file, not a terminal
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=ENV, stdout=slave, stderr=stderr)
    os.close(slave)
    output, deadline = b"", time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if not select.select([master], [], [], 1)[0]:
                continue
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the process closed the terminal
                break
            if not data:
                break
            output += data
        proc.wait(timeout=10)
    finally:
        os.close(master)
        stop(proc)
    terminal, stderr = output.decode(errors="replace"), read(tmp_path / "stderr.txt")
    assert proc.returncode == 0, terminal[-2000:] + stderr[-2000:]
    assert BAR.search(terminal) and re.search(r"step/s|s/step", terminal), terminal[-2000:]
    assert "] step 3/3 | loss" in terminal  # the log lines show above the bar
    assert not BAR.search(stderr) and "\r" not in stderr, (
        "the bar went to stderr, which is no terminal")
    log = read(tmp_path / "run" / "log.txt")
    assert logged_steps(log) == [1, 2, 3]
    assert "\r" not in log and not BAR.search(log) and "step/s" not in log and "\x1b" not in log
    # stdout a pipe (the reference run): the same plain lines, and no bar anywhere
    out, err = reference.proc.stdout, reference.proc.stderr
    assert logged_steps(out) == list(range(1, STEPS + 1))
    assert "\r" not in out + err and not BAR.search(out + err) and "step/s" not in out + err


# ==================================================================================================
# sra.py, 9. The command line: the paper's defaults, the official commands, help, bad input, resume

def test_defaults_are_the_papers():
    """The paper's recipe (AdamW at lr 1e-4, betas (0.9, 0.999), no weight decay, eps 1e-8,
    clipping at 1, batch 32 per process, EMA 0.9999, label dropout 0.1, t_max 0.2, smooth-L1 with
    lambda 0.2 for SiT and 0.04 for DiT, 0.5 for cos) and its block pairs, student -> teacher:
    SiT-B 3 -> 8, L 6 -> 16, XL 8 -> 20; DiT-B 3 -> 7, L 6 -> 14, XL 8 -> 16; S as B; T 1 -> 4."""
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


@pytest.mark.parametrize("teacher", [20, 16])
def test_official_commands_parse(teacher):
    """The official README's SiT command, and its DiT command with --block-out-t 20 (the older
    README) and 16 (the paper and the current README)."""
    sit = ("--allow-tf32 --mixed-precision=fp16 --seed=0 --path-type=linear --prediction=v "
           "--resolution=256 --batch-size=32 --weighting=uniform --model=SiT-XL/2 --block-out-s=8 "
           "--block-out-t=20 --t-max=0.2 --output-dir=exps --exp-name=sitxl-ab820-t0.2-res256 "
           "--data-dir=/data").split()
    args = sra.parse_args(sit)
    assert (args.model, args.block_out_s, args.block_out_t, args.mixed_precision) == (
        "SiT-XL/2", 8, 20, "fp16")
    assert (args.batch_size, args.t_max, args.allow_tf32, args.data_dir) == (32, 0.2, True, "/data")
    dit = ("--allow-tf32 --mixed-precision=fp16 --seed=0 --resolution=256 --batch-size=32 "
           f"--model=DiT-XL/2 --block-out-s=8 --block-out-t={teacher} --t-max=0.2 "
           "--output-dir=exps --exp-name=ditxl-ab820-t0.2-res256 --data-dir=/data --cfg-prob 0.1 "
           "--learning-rate 1e-4 --adam-beta1 0.9 --adam-beta2 0.999 --adam-weight-decay 0 "
           "--adam-epsilon 1e-8 --max-grad-norm 1 --num-workers 4 --num-classes 1000 "
           "--resume-ckpt ckpt.pt").split()
    args = sra.parse_args(dit)
    assert (args.family, args.block_out_s, args.block_out_t, args.num_classes) == (
        "DiT", 8, teacher, 1000)
    assert (args.exp_name, args.resume) == ("ditxl-ab820-t0.2-res256", "ckpt.pt")


def help_entries(text):
    """--help's flags -> {flag: its entry on one line};
    each entry states its default once at most."""
    entries = re.split(r"\n(?=  -)", text.split("\noptions:\n", 1)[1])
    for entry in entries:
        assert entry.lower().count("default") <= 1, entry
    return {e.split()[0]: " ".join(e.split()) for e in entries}


def test_help_groups_and_defaults(capsys, monkeypatch):
    """--help lists the flags in the README's groups; each default shows once, zero included, and
    never as "None"."""
    monkeypatch.setenv("COLUMNS", "200")  # one flag, one or two lines
    with pytest.raises(SystemExit) as exit_status:
        sra.parse_args(["--help"])
    assert exit_status.value.code == 0
    text = capsys.readouterr().out
    groups = ["model and objective", "SRA", "data", "optimisation", "precision and speed", "run",
              "benchmark"]
    # a section: a title line "name:" at column 0, then its indented flags
    parts = re.split(r"^(\S[^\n]*):\n", text, flags=re.M)[1:]  # title, body, title, body, ...
    titles = parts[::2]
    assert titles == ["options"] + groups
    flags = {title: re.findall(r"^  (--[\w-]+)", body, re.M)
             for title, body in zip(parts[::2], parts[1::2])}
    assert flags["options"] == []  # every flag but -h sits in a group
    for title, flag in [("model and objective", "--model"), ("SRA", "--block-out-t"),
                        ("data", "--data-dir"), ("optimisation", "--batch-size"),
                        ("precision and speed", "--mixed-precision"), ("run", "--seed"),
                        ("benchmark", "--bench-shape")]:
        assert flag in flags[title]
    assert sum(len(v) for v in flags.values()) >= 45
    assert "(default: None)" not in text
    entry = help_entries(text)
    assert entry["--seed"].endswith("(default: 0)")
    assert entry["--keep-last"].endswith("(default: 0)")
    assert entry["--epochs"].endswith("(default: 801)")




def official_checkpoint(path):
    """A checkpoint as the official SRA/REPA train.py writes it."""
    torch.save({"model": {}, "ema": {}, "opt": {}, "steps": 4_000_000,
                "args": argparse.Namespace(model="SiT-XL/2")}, path)
    return str(path)


def no_class_folders(root):
    """An image folder with images but no class sub-folders -> flags, what the error names."""
    (root / "flat").mkdir()
    (root / "flat" / "a.png").write_bytes(b"")
    return ["--data-dir", str(root / "flat")], [str(root / "flat"), "class folder"]


def empty_class_folder(root):
    """An image folder with a class sub-folder that holds no image -> flags, what the error
    names."""
    make_image_folder(root / "img", classes=("full",), per_class=1)
    (root / "img" / "hollow").mkdir()
    return ["--data-dir", str(root / "img")], [str(root / "img"), "hollow"]


BAD_INPUT = {  # flags (or a function of the temporary folder -> flags), what the error says
    "model": (["--model", "SiT-XL2"], ["unknown model 'SiT-XL2'", "SiT|DiT-{T,S,B,L,XL}/{2,4,8}",
                                       "SiT-XL/2"]),
    "data-dir": (["--data-dir", "/nonexistent/imagenet"],
                 ["image folder /nonexistent/imagenet", "No such file or directory"]),
    "latent-dir": (["--data-dir", "/nonexistent/imagenet", "--dataset", "latents"],
                   ["/nonexistent/imagenet/vae-sd/dataset.json", "No such file or directory"]),
    "block-out-t": (["--block-out-t", "7"],
                    ["--block-out-t 7 is out of range: SiT-T/8 has blocks 1..6"]),
    "block-out-s": (["--block-out-s", "0"],
                    ["--block-out-s 0 is out of range: SiT-T/8 has blocks 1..6"]),
    "resolution": (["--model", "SiT-T/4", "--resolution", "18"], ["not divisible by patch size 4"]),
    "resume-text": (["--resume", os.path.join(HERE, "README.md")],
                    [os.path.join(HERE, "README.md"), "is not a loadable checkpoint"]),
    "batch-size": (["--batch-size", "0"], ["--batch-size must be at least 1"]),
    "no-class-folders": (no_class_folders, []),
    "empty-class-folder": (empty_class_folder, []),
    "official-ckpt": (["--resume", "{tmp}/official.pt"],
                      ["official SRA/REPA", "sample.py --ckpt", "official.pt"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_error_and_writes_nothing(case, tmp_path, monkeypatch):
    """Each first-hour mistake is one UserError that says what to do, raised before the run
    folder exists."""
    official_checkpoint(tmp_path / "official.pt")
    flags, fragments = BAD_INPUT[case]
    if callable(flags):
        flags, fragments = flags(tmp_path)
    flags = [flag.replace("{tmp}", str(tmp_path)) for flag in flags]
    out = tmp_path / "out"
    with pytest.raises(sra.UserError) as error:
        run_main(out, "--max-train-steps", "1", *flags)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    for fragment in fragments:
        assert fragment in message
    assert "pass --data-dir" not in message
    assert not (out / "run").exists()


def test_failed_cifar10_download_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch):
    """Offline, CIFAR-10 into a new folder: one line that names the folder and the reason, and
    neither that folder nor its new parent is left behind (torchvision makes the folder, then
    fails to connect)."""
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    folder = tmp_path / "data" / "cifar"
    with pytest.raises(sra.UserError) as error:
        run_main(tmp_path / "out", "--dataset", "cifar10", "--data-dir", str(folder))
    one_line_naming(error.value, "CIFAR-10 is not in", str(folder), "name resolution")
    assert os.listdir(tmp_path) == []


@slow
def test_command_line_error_is_one_line_exit_2():
    """`python sra.py` with a bad flag value exits 2 with one `error: ` line, no traceback."""
    proc = subprocess.run([sys.executable, "sra.py", "--model", "SiT-Q/2", "--num-workers", "0"],
                          cwd=HERE, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: unknown model 'SiT-Q/2'") and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_rerun_into_a_folder_with_checkpoints_needs_resume(tmp_path):
    """A second run into a run folder that holds checkpoints stops with one error naming
    --resume auto and --exp-name, and leaves the first run's files as they were."""
    run_dir = run_main(tmp_path, "--max-train-steps", "1")
    before = {name: (run_dir / name).read_bytes() for name in ("log.txt", "metrics.jsonl",
                                                               "args.json")}
    with pytest.raises(sra.UserError) as error:
        run_main(tmp_path, "--max-train-steps", "2", "--learning-rate", "1")
    message = str(error.value)
    assert "--resume auto" in message and "--exp-name" in message and str(run_dir) in message
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert os.listdir(run_dir / "checkpoints") == ["0000001.pt"]


RUN_FLAGS = ["--learning-rate", "3e-4", "--ema-decay", "0.99", "--checkpoint-steps", "3",
             "--loss-type", "cos"]


def test_resume_takes_the_runs_settings_and_logs_what_the_command_line_changes(tmp_path, small):
    """`--resume auto` with only --exp-name (and a longer run): the settings of the run, not the
    defaults; --max-train-steps logged as changed; bit-identical to an uninterrupted run. args.json
    holds the values used (learn_sigma False, the cos loss's lambda 0.5)."""
    run_main(tmp_path, *RUN_FLAGS, "--max-train-steps", "6", exp="ref")
    run_dir = run_main(tmp_path, *RUN_FLAGS, "--max-train-steps", "3")
    saved = json.loads((run_dir / "args.json").read_text())
    assert (saved["learn_sigma"], saved["align_weight"], saved["model"]) == (False, 0.5, "SiT-T/8")
    run_main(tmp_path, "--resume", "auto", "--max-train-steps", "6", base=[])  # no TINY flags
    log = read(run_dir / "log.txt")
    assert (f"resumed from {ckpt_path(run_dir, 3)} at step 3, with the run's settings; "
            f"--max-train-steps 6 (was 3)") in log
    assert_same_training_state(ckpt_path(run_dir, 6), ckpt_path(tmp_path / "ref", 6))
    assert json.loads((run_dir / "args.json").read_text())["changes"] == [
        "--max-train-steps 6 (was 3)"]


def test_resume_from_a_path_continues_in_that_runs_folder_even_moved(tmp_path, monkeypatch,
                                                                      small):
    """`--resume PATH` alone, from another working folder, after the run folder was moved: the run
    continues in the folder that holds the checkpoint, with its settings."""
    run_dir = run_main(tmp_path, *RUN_FLAGS, "--max-train-steps", "3")
    moved = tmp_path / "elsewhere" / "renamed"
    os.makedirs(moved.parent)
    shutil.move(run_dir, moved)
    monkeypatch.chdir(tmp_path / "elsewhere")
    sra.main(sra.parse_args(["--resume", ckpt_path(moved, 3), "--max-train-steps", "4"]))
    assert steps_saved(moved) == [3, 4] and not (tmp_path / "elsewhere" / "exps").exists()
    assert json.loads((moved / "args.json").read_text())["model"] == "SiT-T/8"


@pytest.mark.parametrize("flags, named", [
    (["--model", "SiT-T/4"], "--model cannot change in a resumed run (it was SiT-T/8)"),
    (["--loss-type", "sml1"], "--loss-type cannot change in a resumed run (it was cos)"),
    (["--resolution", "32"], "--resolution cannot change in a resumed run (it was 16)"),
    (["--no-sra"], "--no-sra cannot change in a resumed run (it was False)")])
def test_resume_refuses_a_setting_that_cannot_change_mid_run(flags, named, tmp_path, small):
    """The model, the data's shape, the objective...: one line naming the flag, nothing written."""
    run_dir = run_main(tmp_path, *RUN_FLAGS, "--max-train-steps", "3")
    before = folder_bytes(run_dir)
    with pytest.raises(sra.UserError) as error:
        run_main(tmp_path, "--resume", "auto", *flags, base=[])
    one_line_naming(error.value, named, "--exp-name")
    assert folder_bytes(run_dir) == before


def test_checkpoint_that_does_not_fit_names_the_keys_and_shapes(tmp_path, small):
    """An edited checkpoint (a key gone, a shape changed): one line naming both, not a line that
    ends at PyTorch's colon."""
    run_dir = run_main(tmp_path, "--max-train-steps", "1")
    ckpt = load(ckpt_path(run_dir, 1))
    del ckpt["model"]["blocks.0.attn.qkv.bias"]
    ckpt["model"]["pos_embed"] = torch.zeros(1, 9, 32)
    torch.save(ckpt, tmp_path / "edited.pt")
    with pytest.raises(sra.UserError) as error:
        run_main(tmp_path, "--resume", str(tmp_path / "edited.pt"), exp="other")
    line = one_line_naming(error.value, "does not fit SiT-T/8", "blocks.0.attn.qkv.bias",
                           "pos_embed", "torch.Size([1, 9, 32])")
    assert not line.endswith(":")


# ==================================================================================================
# sample.py, 1. Random streams

def test_streams_are_per_sample_and_seeded():
    """Sample i's label and noise come from its own stream: the same in any batch, labels uniform;
    another --global-seed gives other streams (the CPU generator keeps 32 bits of a seed:
    seed << 32 | i did not); one run never repeats a stream."""
    _, y, _ = sample.sample_inputs(range(4000), 0, 4, (1, 1, 1))
    assert abs(np.bincount(y.numpy(), minlength=4) - 1000).max() < 100
    z_sub, y_sub, _ = sample.sample_inputs(range(1000, 1003), 0, 4, (3, 8, 8))
    z_all, y_all, _ = sample.sample_inputs(range(1003), 0, 4, (3, 8, 8))
    assert torch.equal(y_sub, y_all[1000:]) and torch.equal(z_sub, z_all[1000:])
    z_other, _, _ = sample.sample_inputs(range(1003), 1, 4, (3, 8, 8))
    first_values = {tuple(row) for row in z_all[:, 0, 0, :2].tolist()}
    # not even shifted
    assert not first_values & {tuple(row) for row in z_other[:, 0, 0, :2].tolist()}
    seeds = [sample.stream_seed(0, i) for i in range(100_000)]
    assert len(set(seeds)) == len(seeds) and max(seeds) < 2 ** 32


def test_each_sample_draws_its_label_then_its_noise_from_its_own_stream():
    """Sample i's stream is a torch.Generator seeded stream_seed(seed, i): first its label,
    uniform over the classes, then its noise."""
    z, y, _ = sample.sample_inputs([5, 3000], 7, 10, (3, 2, 2))
    for row, i in enumerate([5, 3000]):
        g = torch.Generator().manual_seed(sample.stream_seed(7, i))
        assert y[row] == torch.randint(10, (), generator=g)
        assert torch.equal(z[row], torch.randn((3, 2, 2), generator=g))


# ==================================================================================================
# sample.py, 2. Samplers, on closed-form Gaussian toys

M, S = 0.3, 0.5  # toy data: every coordinate ~ N(M, S^2)


def gaussian_velocity(path_type, m=M, s=S):
    """Exact v(x, t) = E[d_alpha x0 + d_sigma eps | x_t] for x0 ~ N(m, s^2)
    per coordinate (SRA time)."""
    def v(x, t):
        alpha, sigma, d_alpha, d_sigma = (float(a) for a in sra.interpolant(
            torch.tensor(t, dtype=torch.float64), path_type))
        var = alpha ** 2 * s ** 2 + sigma ** 2  # Var(x_t)
        x0 = m + alpha * s ** 2 * (x - alpha * m) / var  # E[x0 | x_t]
        eps = sigma * (x - alpha * m) / var  # E[eps | x_t]
        return d_alpha * x0 + d_sigma * eps
    return v


def gaussian_eps(m=M, s=S, learned_range=None):
    """Exact DDPM eps-predictor E[eps | x_t] for x0 ~ N(m, s^2);
    optionally a constant learned-range channel."""
    abar = sra.GaussianDiffusion.linear().alphas_cumprod

    def eps(x, step):
        a = abar[step].item()
        out = (1 - a) ** 0.5 * (x - a ** 0.5 * m) / (a * s ** 2 + 1 - a)
        return out if learned_range is None else torch.cat(
            [out, torch.full_like(out, learned_range)], dim=1)
    return eps


def moment_error(x):
    """|mean - M| + |std - S| over all coordinates."""
    return abs(x.mean().item() - M) + abs(x.std().item() - S)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_ode_matches_exact_transport(path_type):
    """Euler/Heun reach x0 = M + S z (the exact ODE map of a Gaussian); Heun beats Euler;
    errors shrink."""
    z = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = M + S * z.double()
    v = gaussian_velocity(path_type)
    out = {(heun, n): sample.sample_ode(v, z, n, heun=heun) for heun in (False, True)
           for n in (32, 128)}
    err = {key: (x - exact).abs().max().item() for key, x in out.items()}
    for heun in (False, True):
        assert err[heun, 128] < err[heun, 32] / 3.5
    assert err[True, 32] < err[False, 32] / 3 and err[True, 128] < err[False, 128] / 10
    assert err[True, 128] < 1e-3
    x = out[True, 128]  # mean and std, against those of the exact map of the same z
    assert abs(x.mean() - exact.mean()) < 1e-4 and abs(x.std() - exact.std()) < 1e-4


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_sde_reaches_target_distribution(path_type):
    """Euler-Maruyama (the paper's sampler) reproduces mean and std of the toy, closer with more
    steps."""
    z = torch.randn(20_000, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    v = gaussian_velocity(path_type)
    errs = [moment_error(sample.sample_sde(v, z, n, path_type, torch.Generator().manual_seed(2)))
            for n in (10, 100)]
    assert errs[1] < errs[0] and errs[1] < 0.02, errs


def test_sde_steps_by_hand():
    """Euler-Maruyama with the exact velocity of a Gaussian toy, 3 steps on t = 1, 0.52, 0.04, 0
    (REPA's and SRA's grid): each step adds (v - w/2 score) dt + sqrt(w) sqrt(|dt|) z, w = 2t, the
    score the toy's exact -(x - alpha m) / (alpha^2 s^2 + sigma^2); the last step adds no noise."""
    seen = []
    exact = gaussian_velocity("cosine")

    def velocity(x, t):
        seen.append((x.clone(), t))
        return exact(x, t)

    x = torch.randn(6, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample.sample_sde(velocity, x, 3, "cosine", torch.Generator().manual_seed(1))
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
            z = torch.randn(x.shape, generator=noise).double()
            expected = expected + math.sqrt(2 * t) * math.sqrt(-dt) * z
        assert torch.allclose(states[i + 1], expected, atol=1e-10), i


@pytest.mark.parametrize("learned_range", [None, 0.0])
def test_ddpm_reaches_target_distribution(learned_range):
    """Ancestral DDPM with the toy's exact eps-predictor converges to its mean and std: respaced
    to 50, then 250 steps, then all 1000, where the error is that of 20,000 draws (without or
    with a learned-range channel)."""
    z = torch.randn(5000, 1, 2, 2, generator=torch.Generator().manual_seed(3))
    eps = gaussian_eps(learned_range=learned_range)
    errors = [moment_error(sample.sample_ddpm(eps, z, n, torch.Generator().manual_seed(4)))
              for n in (50, 250, 1000)]
    assert errors[0] > errors[1] > errors[2] and errors[1] < 0.02 and errors[2] < 0.01, errors


def test_ddpm_sampler_steps_by_hand():
    """Respaced to the steps [0, 999]: the network is fed 999, then 0; the first step is the
    posterior mean at the predicted x0 plus sqrt(beta') z, beta' = 1 - abar_999 / abar_0 (the
    fixed large variance of a model without variance channels); the last step is that mean
    alone, no noise. Respaced to 10 steps, it is fed DiT's own respaced indices, from the last."""
    tab = ddpm_tables()
    fed = []

    def eps_model(x, step):
        fed.append(step)
        return 0.3 * x + 0.1

    x = torch.randn(4, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample.sample_ddpm(eps_model, x, 2, torch.Generator().manual_seed(1))
    assert fed == [999, 0]
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).double()
    a999, a0 = tab["abar"][999], tab["abar"][0]
    beta = 1 - a999 / a0  # the respaced step from 999 to 0
    x0 = (x - math.sqrt(1 - a999) * (0.3 * x + 0.1)) / math.sqrt(a999)
    mean = (beta * math.sqrt(a0) / (1 - a999) * x0
            + (1 - a0) * math.sqrt(1 - beta) / (1 - a999) * x)
    x1 = mean + math.sqrt(beta) * z
    expected = (x1 - math.sqrt(1 - a0) * (0.3 * x1 + 0.1)) / math.sqrt(a0)  # step 0: x0 itself
    assert torch.allclose(out, expected, atol=1e-10)
    fed.clear()
    sample.sample_ddpm(eps_model, x, 10, torch.Generator().manual_seed(1))
    assert fed == dit_steps(10)[::-1]


def test_respace_keeps_dit_steps_for_every_count():
    """respace keeps DiT's space_timesteps(1000, [K]) for every K; the kept steps keep their
    alpha-bars, so the respaced betas are 1 - abar_k / abar_(k-1)."""
    base = sra.GaussianDiffusion.linear()
    for K in range(1, 1001):
        respaced = sample.respace(base, K)
        assert respaced.timestep_map.tolist() == dit_steps(K), K
    assert torch.allclose(respaced.alphas_cumprod, base.alphas_cumprod, rtol=1e-12)  # K = 1000
    respaced = sample.respace(base, 21)  # one of the counts where round(i * 999 / 20) differs
    assert torch.allclose(respaced.alphas_cumprod, base.alphas_cumprod[respaced.timestep_map],
                          rtol=1e-12)


class SiTRepoToy(torch.nn.Module):
    """The SiT repository's exact velocity of the toy (t = 0 noise, t = 1 data, 2C outputs):
    x = a x0 + s eps with (a, s) = (t, 1 - t) on its Linear path,
    (sin(pi t/2), cos(pi t/2)) on GVP."""
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
            a, s, d_a, d_s = (torch.sin(h * tau), torch.cos(h * tau), h * torch.cos(h * tau),
                              -h * torch.sin(h * tau))
        var = a ** 2 * S ** 2 + s ** 2
        x0, eps = M + a * S ** 2 * (x - a * M) / var, s * (x - a * M) / var
        # junk "sigma" channels
        return torch.cat([d_a * x0 + d_s * eps, torch.full_like(x, 7.0)], dim=1)


@pytest.mark.parametrize("sit_path, path_type", [("Linear", "linear"), ("GVP", "cosine")])
def test_reversed_sit_convention(sit_path, path_type):
    """A SiT-repo field, wrapped, samples right: the ODE reaches the exact transport,
    and the SDE, whose score needs our path, reaches the toy with SiT's Linear read as linear
    and its GVP as cosine."""
    model = sample.ReversedSiT(SiTRepoToy(sit_path))
    z = torch.randn(4000, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    y = torch.zeros(4000, dtype=torch.long)
    x = sample.generate(model, z[:500], y[:500], mode="ode", num_steps=100, heun=True)
    assert (x - (M + S * z[:500])).abs().max() < 1e-3
    x = sample.generate(model, z, y, mode="sde", num_steps=100, path_type=path_type,
                        generator=torch.Generator().manual_seed(6))
    assert moment_error(x) < 0.02


# ==================================================================================================
# sample.py, 3. Classifier-free guidance

def record_calls(model):
    """Log (batch size, t, labels) of every network call through a forward pre-hook."""
    calls = []

    def hook(module, inputs):
        calls.append((len(inputs[0]), inputs[1][0].item(), inputs[2].tolist()))

    model.register_forward_pre_hook(hook)
    return calls


def test_cfg_scale_one_runs_the_conditional_model_alone():
    """cfg_scale 1, with a guidance interval or without: each step is one pass of the conditional
    model, and the result is Euler's method on that model, written out here."""
    model = tiny_named()
    calls = record_calls(model)
    z, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 3])
    out = sample.generate(model, z, y, mode="ode", num_steps=5, cfg_scale=1.0, guidance_low=0.2)
    assert len(calls) == 5 and all(n == 3 and labels == [0, 1, 3] for n, _, labels in calls)
    x = z.double()
    with torch.no_grad():
        for i in range(5):
            x = x - 0.2 * model(x.float(), torch.full((3,), 1 - i / 5), y).double()
    assert torch.allclose(out, x.float(), atol=1e-5)


def test_cfg_interval_is_decided_at_each_step_start():
    """Guidance (a doubled batch with the null label = num_classes) only for the steps that start in
    [t_low, t_high]; both Heun evaluations of a step follow its start, as in REPA's sampler,
    so the steps that cross the interval's edges (0.7 -> 0.6 and 0.3 -> 0.2)
    are each guided or not as a whole."""
    model = tiny_named()
    calls = record_calls(model)
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
    # The interval is closed: the default [0, 1] guides every step, the first (t = 1) too
    calls.clear()
    sample.generate(model, z, y, mode="ode", num_steps=4, cfg_scale=2.0)
    assert [(n, t) for n, t, _ in calls] == [(6, 1.0), (6, 0.75), (6, 0.5), (6, 0.25)]


def test_cfg_formula_on_all_channels_and_ddpm_interval():
    """Guided eps = u + w (c - u) on every data channel; DiT variance channels stay conditional;
    t = step/1000."""
    model = tiny_named("DiT-T/4")
    x, y = torch.randn(2, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 2])
    t = torch.full((2,), 500.0)
    cond, uncond = (model(x.float(), t, y).double(),
                    model(x.float(), t, torch.full_like(y, 4)).double())
    out = sample.model_fn(model, y, cfg_scale=3.0, ddpm=True)(x, 500)
    assert torch.allclose(out[:, :3], uncond[:, :3] + 3 * (cond[:, :3] - uncond[:, :3]), atol=1e-5)
    assert torch.allclose(out[:, 3:], cond[:, 3:], atol=1e-6)
    calls = record_calls(model)
    sample.generate(model, x.float(), y, mode="ddpm", num_steps=20, cfg_scale=2.0,
                    guidance_high=0.5)
    assert all((n == 4) == (t <= 500) for n, t, _ in calls)


# ==================================================================================================
# sample.py, 4. Images: SD-VAE decoding, uint8, grids

class RecordingVAE:
    """Stands in for the SD-VAE's decoder: records its input, returns 3 of its channels."""

    def __init__(self):
        self.inputs = []

    def decode(self, z):
        self.inputs.append(z)
        return SimpleNamespace(sample=z[:, :3])


def test_images_decode_scaled_latents_and_round_to_uint8():
    """Latents are divided by 0.18215 before the SD-VAE decodes them; [-1, 1] -> uint8 rounds to
    the nearest level and clamps: x = -1, 1 and values between two levels."""
    levels = torch.tensor([-1.2, -1.0, 10.6 / 127.5 - 1, 200.4 / 127.5 - 1, 1.0, 1.5])
    x = levels.view(1, 1, 2, 3).repeat(2, 3, 1, 1)
    assert sample.to_images(x)[0, :, :, 0].ravel().tolist() == [0, 0, 11, 200, 255, 255]
    vae = RecordingVAE()
    z = torch.randn(2, 4, 2, 3) * 0.18215
    images = sample.to_images(z, vae)
    assert torch.allclose(vae.inputs[0], z / 0.18215)
    expected = ((z[:, :3] / 0.18215 + 1) * 127.5).round().clamp(0, 255).permute(0, 2, 3, 1)
    assert np.array_equal(images, expected.to(torch.uint8).numpy())


def test_image_grid_layout(tmp_path):
    """save_image_grid puts image i at row i // nrow, column i % nrow; the rest stays black."""
    images = np.stack([np.full((2, 3, 3), 10 * (i + 1), np.uint8) for i in range(7)])
    sample.save_image_grid(images, tmp_path / "grid.png", nrow=3)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (3 * 2, 3 * 3, 3)
    for i in range(9):
        row, col = divmod(i, 3)
        value = 10 * (i + 1) if i < 7 else 0
        assert (grid[2 * row:2 * row + 2, 3 * col:3 * col + 3] == value).all(), i


# ==================================================================================================
# sample.py, 5. Checkpoints of every layout

def backbone(state):
    return {k: v for k, v in state.items() if not k.startswith(("ap_head.", "projectors."))}


def ours_args(**kw):
    """The args entries of an sra.py checkpoint that sample.py reads."""
    return {**dict(model="SiT-T/4", path_type="linear", num_classes=4, resolution=8), **kw}


def sit_repo_args(path_type="Linear", prediction="velocity"):
    """The argparse.Namespace that the SiT repository's train.py stores in its checkpoints."""
    return argparse.Namespace(
        data_path="/data/imagenet/train", results_dir="results", model="SiT-T/4", image_size=64,
        num_classes=4, epochs=1400, global_batch_size=256, global_seed=0, vae="ema", num_workers=4,
        log_every=100, ckpt_every=50_000, sample_every=10_000, cfg_scale=4.0, wandb=False,
        ckpt=None, path_type=path_type, prediction=prediction, loss_weight=None, sample_eps=None,
        train_eps=None)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoint files of each layout, with the networks they should load into."""
    d = tmp_path_factory.mktemp("ckpts")
    raw, ema = tiny_named(seed=1), tiny_named(seed=2)
    files = {}

    def save(key, obj, expected):
        files[key] = (str(d / f"{key}.pt"), expected)
        torch.save(obj, files[key][0])

    projector = {"ap_head.linear1.weight": torch.randn(384, 192),
                 "ap_head.linear2.weight": torch.randn(192, 384)}
    save("ours", dict(model={**raw.state_dict(), **projector}, ema=ema.state_dict(), opt={},
                      scaler={}, args=ours_args(), step=2, epoch=0, rng=[]), ema)
    projectors = {"projectors.0.0.weight": torch.randn(8, 192)}
    namespace = argparse.Namespace(model="SiT-T/4", path_type="cosine", num_classes=4, resolution=8,
                                   encoder_depth=3)
    save("official_sra", dict(model=raw.state_dict(), ema={**raw.state_dict(), **projector},
                              opt={}, args=namespace, steps=5), raw)
    save("official_repa", dict(model={**raw.state_dict(), **projectors},
                               ema={**raw.state_dict(), **projectors}, opt={}, args=namespace,
                               steps=5), raw)
    save("ema_only", dict(ema=raw.state_dict()), raw)  # e.g. a released file keeping only the EMA
    dit = tiny_named("DiT-T/4", seed=3)
    save("dit_bare", dit.state_dict(), dit)
    sit_raw, sit_ema = (tiny_named("SiT-T/4", seed=4, learn_sigma=True),
                        tiny_named("SiT-T/4", seed=6, learn_sigma=True))
    save("sit_bare", sit_ema.state_dict(), sit_ema)
    for key, args in [("sit_repo_linear", sit_repo_args()), ("sit_repo_gvp", sit_repo_args("GVP")),
                      ("sit_repo_vp", sit_repo_args("VP")),
                      ("sit_repo_score", sit_repo_args(prediction="score"))]:
        save(key, dict(model=sit_raw.state_dict(), ema=sit_ema.state_dict(), opt={},
                       args=args), sit_ema)
    nonull = tiny_named("DiT-T/4", seed=5, class_dropout_prob=0.0)  # no null row: CFG impossible
    save("dit_no_null", dict(model=nonull.state_dict(), ema=nonull.state_dict(), opt={}, step=1,
                             args=ours_args(model="DiT-T/4", cfg_prob=0.0)), nonull)
    save("latent", tiny_named("SiT-T/4", input_size=4, in_channels=4).state_dict(), None)
    save("edm_path", dict(ema=ema.state_dict(), args=ours_args(path_type="edm")), None)
    save("foreign", {"weights": {"w": torch.ones(2)}, "note": "hello"}, None)
    save("short", {k: v for k, v in dit.state_dict().items()
                   if not k.startswith("blocks.5.")}, None)
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
    """Each layout loads its EMA weights with the right family and time convention, then samples
    from the command line; SiT-repository weights (bare, or its train.py's checkpoints)
    are used as -f(x, 1 - t)."""
    path, expected = ckpts[key]
    model_name, family, path_type, reverse = LAYOUTS[key]
    model, info = sample.load_model(path, model_name)
    assert (info["family"], info["path_type"], isinstance(model, sample.ReversedSiT)) == (
        family, path_type, reverse)
    net = model.net if reverse else model
    assert (net.num_classes == 4 and net.out_channels == expected.out_channels
            and net.input_size == 8)
    want = backbone(expected.state_dict())
    assert net.state_dict().keys() == want.keys()
    assert all(torch.equal(net.state_dict()[k], want[k]) for k in want)
    if reverse:  # v(x, t) = -f(x, 1 - t)[:, :C]
        x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([0.2, 0.9]), torch.tensor([0, 3])
        assert torch.allclose(model(x, t, y), -net(x, 1 - t, y)[:, :3])
    argv = ["--ckpt", path, "--grid", "--num-steps", "3", "--sample-dir", str(tmp_path),
            "--cfg-scale", "1.5"]
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
    """Our checkpoints sample the EMA by default;
    --use-raw-model takes `model`, without the projector."""
    model, _ = sample.load_model(ckpts["ours"][0], use_raw_model=True)
    assert all(torch.equal(model.state_dict()[k], v)
               for k, v in tiny_named(seed=1).state_dict().items())
    assert not any(k.startswith("ap_head.") for k in model.state_dict())


# ==================================================================================================
# sample.py, 6. Output: settings, the .npz, grids, resume, full disks, bad input

def test_sampler_defaults():
    """SiT: the SDE with 250 steps, no guidance (the FID setting); a grid: 50 steps at CFG 4 (the
    paper's figures); DiT: DDPM; the path type from the checkpoint."""
    sit = dict(family="SiT", path_type="cosine")
    model = tiny_named()
    args = sample.parse_args(["--ckpt", "c.pt"])
    settings = sample.sampler_settings(args, sit, model)
    assert (settings["mode"], settings["num_steps"], settings["path_type"]) == ("sde", 250,
                                                                                "cosine")
    assert (settings["cfg_scale"], settings["guidance_low"], settings["guidance_high"]) == (
        1.0, 0.0, 1.0)
    grid = sample.sampler_settings(sample.parse_args(["--ckpt", "c.pt", "--grid"]), sit, model)
    assert (grid["num_steps"], grid["cfg_scale"]) == (50, 4.0)
    given = sample.parse_args(["--ckpt", "c.pt", "--grid", "--cfg-scale", "1"])
    assert sample.sampler_settings(given, sit, model)["cfg_scale"] == 1.0
    assert sample.sampler_settings(args, dict(family="DiT", path_type="linear"),
                                   model)["mode"] == "ddpm"


def npz_of(folder):
    """(images, labels) of the single .npz in a sample folder."""
    (path,) = glob.glob(os.path.join(folder, "*.npz"))
    with np.load(path) as data:
        return data["arr_0"], data["arr_1"]


def run_cli(ckpt, out, *extra):
    return sample.cli(["--ckpt", ckpt, "--sample-dir", str(out), "--num-steps", "8",
                       *map(str, extra)])


def euler_by_hand(net, z, y, steps):
    """Euler's method for dx/dt = net(x, t, y) from t = 1 to 0 in float64, the net in float32,
    then [-1, 1] -> uint8 (N, H, W, 3), rounded."""
    x = z.double()
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((len(x),), 1 - i / steps)
            x = x - net(x.float(), t, y).double() / steps
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def test_npz_holds_the_samples_of_the_streams_with_pngs_and_a_preview(ckpts, tmp_path, capsys):
    """The ADM .npz: arr_0 the uint8 samples (N, H, W, 3), here Euler's method on the EMA network
    from each sample's stream, arr_1 their labels (int64); --save-png writes the same images, one
    PNG each, and says where; a preview grid of the first ones; no part files left."""
    assert run_cli(ckpts["ours"][0], tmp_path, "--num-fid-samples", 10, "--per-proc-batch-size", 4,
                   "--save-png", "--mode", "ode", "--num-steps", 3) == 0
    images, labels = npz_of(tmp_path)
    z, y, _ = sample.sample_inputs(range(10), 0, 4, (3, 8, 8))
    assert images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.array_equal(labels, y.numpy())
    expected = euler_by_hand(ckpts["ours"][1], z, y, 3).numpy()
    assert np.abs(images.astype(int) - expected).max() <= 1  # (batching: a last-bit rounding)
    assert (images != expected).mean() < 1e-3 and images.std() > 0
    (folder,) = [p for p in glob.glob(str(tmp_path / "*")) if os.path.isdir(p)]
    pngs = sorted(glob.glob(os.path.join(folder, "png", "*.png")))
    assert os.listdir(folder) == ["png"] and len(pngs) == 10
    assert all(np.array_equal(np.asarray(Image.open(p)), image) for p, image in zip(pngs, images))
    (preview,) = glob.glob(str(tmp_path / "*.png"))
    assert np.array_equal(np.asarray(Image.open(preview))[:8, :8 * 8], np.concatenate(
        images[:8], axis=1))  # the first row of the preview: samples 0-7
    out = capsys.readouterr().out
    assert f"wrote {glob.glob(str(tmp_path / '*.npz'))[0]}" in out
    assert f"wrote 10 PNGs to {os.path.join(folder, 'png')}" in out


@slow
def test_same_npz_from_two_processes_and_two_batch_sizes(ckpts, tmp_path):
    """Per-sample streams and batches cut at index multiples:
    1 or 2 processes give the very same .npz."""
    ckpt = ckpts["ours"][0]
    assert run_cli(ckpt, tmp_path / "one", "--num-fid-samples", 10, "--per-proc-batch-size", 2) == 0
    assert run_cli(ckpt, tmp_path / "b3", "--num-fid-samples", 10, "--per-proc-batch-size", 3) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "sample.py", "--ckpt", ckpt, "--sample-dir",
                           str(tmp_path / "two"), "--num-steps", "8", "--num-fid-samples", "10",
                           "--per-proc-batch-size", "2"],
                          cwd=HERE, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two, b3 = npz_of(tmp_path / "one"), npz_of(tmp_path / "two"), npz_of(tmp_path / "b3")
    assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])
    # Another batch size gives the same noise and labels; CPU matmul kernels are not batch-invariant
    # in the last float bit, so a rare pixel may round to the neighbouring uint8 level.
    assert np.array_equal(one[1], b3[1])
    diff = np.abs(one[0].astype(int) - b3[0])
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


class Interrupted(Exception):
    """Stands for a killed sampling run."""


def test_resume_cleanup_and_rerun(ckpts, tmp_path, capsys, monkeypatch):
    """An interrupted run resumes from its part files, redoing only the missing batches, to the same
    .npz; then the parts go (--keep-parts keeps them), and the same command again redoes nothing."""
    ckpt, flags = ckpts["ours"][0], ("--num-fid-samples", 10, "--per-proc-batch-size", 4)
    assert run_cli(ckpt, tmp_path / "ref", *flags) == 0
    ref = npz_of(tmp_path / "ref")
    atomic_write = sra.atomic_write

    def save_one_part_then_die(path, data, what):
        if glob.glob(os.path.join(os.path.dirname(path), "*.npz")):
            raise Interrupted
        atomic_write(path, data, what)

    out = tmp_path / "run"
    monkeypatch.setattr(sra, "atomic_write", save_one_part_then_die)
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


def savez_until_the_disk_is_full(real, writes_left):
    """np.savez that writes `writes_left` files, then fails half-way as a full disk does."""
    def savez(file, *args, **kwargs):
        if not writes_left:
            file.write(b"PK\x03\x04")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        writes_left.pop()
        return real(file, *args, **kwargs)
    return savez


@pytest.mark.parametrize("fails", ["part", "npz"])
def test_sample_full_disk_is_one_line_and_keeps_finished_parts(fails, ckpts, tmp_path, capsys,
                                                               monkeypatch):
    """ENOSPC writing a part file or the .npz: one line naming the file, exit 2, no .tmp; the
    finished parts stay, and the same command then completes the identical .npz."""
    ckpt, flags = ckpts["ours"][0], ("--num-fid-samples", 10, "--per-proc-batch-size", 4)
    writes = [1] * (1 if fails == "part" else 3)  # the first part, or all three
    monkeypatch.setattr(np, "savez", savez_until_the_disk_is_full(np.savez, writes))
    assert run_cli(ckpt, tmp_path, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the progress bar)
    (parts,) = glob.glob(str(tmp_path / "*" / "parts-b4"))
    if fails == "part":
        failed = os.path.join(parts, "0000004-0000008.npz")
        assert err == f"error: cannot write part file {failed}: No space left on device"
        assert os.listdir(parts) == ["0000000-0000004.npz"]
    else:
        assert re.fullmatch(r"error: cannot write \.npz \S+-n10\.npz: No space left on device", err)
        assert sorted(os.listdir(parts)) == ["0000000-0000004.npz", "0000004-0000008.npz",
                                             "0000008-0000010.npz"]
    assert not glob.glob(str(tmp_path / "**" / "*.tmp"), recursive=True)
    monkeypatch.undo()
    assert run_cli(ckpt, tmp_path, *flags) == 0
    assert run_cli(ckpt, tmp_path / "ref", *flags) == 0
    assert all(np.array_equal(a, b) for a, b in zip(npz_of(tmp_path), npz_of(tmp_path / "ref")))


def test_grid_shows_new_samples_of_the_global_seed(ckpts, tmp_path, capsys, monkeypatch):
    """--grid: 8 rows and a column per class (up to 10); its noise comes from the per-sample streams
    of --global-seed, so another seed gives another grid; the log names the PNG's full path."""
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
        argv = ["--ckpt", ckpts["ours"][0], "--grid", "--num-steps", "3", "--sample-dir", "out",
                "--global-seed", str(seed)]
        assert sample.cli(argv) == 0
        path = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("wrote ")
        assert os.path.dirname(path) == str(tmp_path / "out") and path.endswith("-grid.png")
        grids.append(np.asarray(Image.open(path)))
        z, y = calls[-1]
        assert y.tolist() == [0, 1, 2, 3] * 8
        assert torch.equal(z, sample.sample_inputs(range(32), seed, 4, (3, 8, 8))[0])
    assert grids[0].shape == (8 * 8, 4 * 8, 3)
    assert not np.array_equal(grids[0], grids[1])


def test_trainer_checkpoint_end_to_end(trained, tmp_path):
    """sample.py reads a checkpoint that sra.py wrote: its grid (--mode ode, CFG 1) is Euler's
    method on the checkpoint's EMA weights, loaded here into a fresh model, column c of class c."""
    ckpt = str(trained / "checkpoints" / "0000030.pt")
    assert sample.cli(["--ckpt", ckpt, "--grid", "--num-steps", "4", "--mode", "ode",
                       "--cfg-scale", "1", "--sample-dir", str(tmp_path)]) == 0
    (path,) = glob.glob(str(tmp_path / "*-grid.png"))
    grid = np.asarray(Image.open(path))
    assert grid.shape == (8 * 16, 10 * 16, 3)
    net = sra.MODELS["SiT-T/8"](input_size=16, in_channels=3, num_classes=10)
    net.load_state_dict(torch.load(ckpt, weights_only=True)["ema"])
    z, _, _ = sample.sample_inputs(range(80), 0, 10, (3, 16, 16))
    expected = euler_by_hand(net.eval(), z, torch.arange(10).repeat(8), 4)
    tiles = grid.reshape(8, 16, 10, 16, 3).transpose(0, 2, 1, 3, 4).reshape(80, 16, 16, 3)
    assert np.abs(tiles.astype(int) - expected.numpy()).max() <= 1 and grid.std() > 0


def test_grid_is_guided_as_the_papers_figures_and_the_npz_is_not():
    """--grid defaults to CFG 4 (the paper's qualitative figures), the FID .npz to 1 (off); a given
    --cfg-scale wins in both."""
    assert sample.parse_args(["--ckpt", "c.pt", "--grid"]).cfg_scale == 4.0
    assert sample.parse_args(["--ckpt", "c.pt"]).cfg_scale == 1.0
    assert sample.parse_args(["--ckpt", "c.pt", "--grid", "--cfg-scale", "1"]).cfg_scale == 1.0
    assert sample.parse_args(["--ckpt", "c.pt", "--cfg-scale", "1.8"]).cfg_scale == 1.8


def test_sample_help_groups_and_defaults(capsys, monkeypatch):
    """sample.py --help: groups like sra.py's; each default once; no "(default: None)" or
    "(default: False)"."""
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    text = capsys.readouterr().out
    assert re.findall(r"^(\S[^\n]*):$", text, flags=re.M) == ["options", "checkpoint", "sampler",
                                                               "output"]
    assert "(default: None)" not in text and "(default: False)" not in text
    entry = help_entries(text)
    assert entry["--num-steps"].endswith("(default: 250; 50 with --grid)")
    assert entry["--cfg-scale"].endswith("(default: 1 = off; 4 with --grid)")
    assert entry["--per-proc-batch-size"].endswith("(default: 32)")


BAD = {  # name -> (checkpoint key or path, extra flags, expected message)
    "missing": ("/nonexistent/ckpt.pt", [], "does not exist"),
    "foreign": ("foreign", [], "is not a DiT/SiT checkpoint"),
    "text": (os.path.join(HERE, "README.md"), [],
             "is not a PyTorch checkpoint: torch.save writes a zip archive"),
    "corrupt": ("corrupt", [], "is a damaged PyTorch checkpoint ("),
    "bare_without_model": ("dit_bare", [], "--model"),
    "missing_keys": ("short", ["--model", "DiT-T/4"], "missing: blocks.5."),
    "arch_mismatch": ("sit_bare", ["--model", "SiT-S/4"],
                      "mis-shaped (file vs model): pos_embed (1, 4, 192) vs "
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
    "unknown_path_type": ("edm_path", [], "has the unknown path type 'edm' (linear or cosine)"),
    "latent_without_diffusers": ("latent", ["--model", "SiT-T/4"], "pip install diffusers"),
    "unwritable_sample_dir": ("ours", ["--sample-dir", "/dev/null/out"],
                              "cannot write to --sample-dir"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_sample_bad_input_is_one_line_and_exit_2(name, ckpts, tmp_path, capsys, monkeypatch):
    """One `error:` line naming the problem, and the checkpoint by its full path,
    though given relative."""
    # as on a machine without diffusers, installed or not
    for module in ("diffusers", "diffusers.models"):
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


# ==================================================================================================
# The README and figures/: every recipe runs as written, the text says what is true today

def readme():
    """README.md's text."""
    with open(os.path.join(HERE, "README.md")) as f:
        return f.read()


def commands(text):
    """The commands (python, torchrun, pip, fidelity) of a text -> lists of words: those of its
    ```bash blocks if it has any (the README), else of its lines (a docstring); a line that ends
    in a backslash goes on on the next, # starts a comment."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S) or [text]
    found = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if line.split()[:1] in (["python"], ["torchrun"], ["pip"], ["fidelity"]):
                found.append(shlex.split(line, comments=True))
    return found


# The datasets the README's recipes name, and their sizes: the built-in data's 50,000 an epoch,
# CIFAR-10's 50,000 training images, "say 100 classes, ~130,000 images" of an ImageNet subset
DATA_SIZES = {None: 50_000, "data/cifar10": 50_000, "data/subset256": 130_000}


def test_readme_recipes_sample_the_checkpoint_their_training_writes():
    """Each `sample.py --ckpt exps/NAME/checkpoints/STEP.pt` of the README and the docstrings
    names the step at which the `sra.py --exp-name NAME` command there stops, by the trainer's
    own arithmetic (sra.run_length) on the dataset size the recipe names; that step is written."""
    texts = [readme(), sra.__doc__, sample.__doc__]
    trains, checked = {}, 0
    for text in texts:
        for words in commands(text):
            if "sra.py" in words and not {"--encode", "--bench", "--resume"} & set(words):
                flags = words[words.index("sra.py") + 1:]
                args = sra.parse_args(flags)
                processes = next((int(w.split("=")[1]) for w in words
                                  if w.startswith("--nproc_per_node=")), 1)
                batches = DATA_SIZES.get(args.data_dir, 1_281_167) // (args.batch_size * processes)
                steps = sra.run_length(args, batches // args.gradient_accumulation_steps)
                trains[args.exp_name] = (steps, args.checkpoint_steps)
    for text in texts:
        for words in commands(text):
            ckpt = next((w for w in words if re.fullmatch(r"exps/.+/checkpoints/\d{7}\.pt", w)),
                        None)
            if "sample.py" in words and ckpt:
                name, step = ckpt.split("/")[1], int(ckpt[-10:-3])
                assert name in trains, f"{ckpt}: no sra.py command there has --exp-name {name}"
                total, every = trains[name]
                assert step == total, f"{ckpt}: the run of --exp-name {name} stops at {total}"
                checked += 1
    assert checked >= 4  # the demo (README and sra.py's docstring), subset, CIFAR-10 at least


def test_readme_says_what_is_true_today():
    """No all-caps placeholder; the first commands install, run the demo and draw its grid, then
    test, and .ci/run runs that very test command; the first picture is the demo's grid."""
    text = readme()
    tokens = re.findall(r"\b(?:TODO|TBD|FIXME|XXX|[A-Z]{2,}(?:_[A-Z]+)+)\b", text)
    assert [t for t in tokens if t not in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES")] == []
    first = [" ".join(w) for w in commands(text)[:4]]
    assert first[0] == "pip install -r requirements.txt" and first[1].startswith("python sra.py")
    assert re.fullmatch(r"python sample.py --ckpt exps/demo/checkpoints/\d{7}.pt --grid", first[2])
    test_command = next(c for c in first if "pytest" in c)
    with open(os.path.join(HERE, ".ci", "run")) as f:
        assert test_command in f.read()
    picture = re.search(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert picture and picture.group(1) == "figures/demo-grid.png"
    assert os.path.getsize(os.path.join(HERE, picture.group(1))) < 100_000


@slow
def test_readme_counts_the_tests_that_pytest_collects():
    """Every "N tests" of the README is the number of tests pytest collects now."""
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                                "-p", "no:cacheprovider", "test_sra.py"], cwd=HERE, env=ENV,
                               capture_output=True, text=True, timeout=120)
    count = sum("::" in line for line in collected.stdout.splitlines())
    said = re.findall(r"([\d,]+) tests", readme())
    assert count > 100 and said and all(int(n.replace(",", "")) == count for n in said), said


def figure_module(name):
    """Import figures/<name>.py by its path (figures/ is no package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(HERE, "figures", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_frechet_distance_closed_forms():
    """compare.frechet_distance is FID's formula: the closed form for diagonal covariances, a
    closed form for 2 x 2 covariances that do not commute (where tr(S1^1/2 S2^1/2), a common
    slip, differs), 0 from a distribution to itself, and symmetric."""
    compare = figure_module("compare")
    fd = compare.frechet_distance
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fd(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)
    # 2 x 2: M = S1^1/2 S2 S1^1/2 has tr M = tr(S1 S2) and det M = det S1 det S2, and a 2 x 2
    # positive semi-definite M has tr M^1/2 = sqrt(tr M + 2 sqrt(det M))
    s1, s2 = np.array([[3.0, 0.0], [0.0, 0.2]]), np.array([[1.0, 0.9], [0.9, 1.0]])
    m1, m2 = np.array([0.5, -1.0]), np.array([0.0, 2.0])
    root = np.sqrt(np.trace(s1 @ s2) + 2 * np.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    expected = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * root
    assert fd(m1, s1, m2, s2) == pytest.approx(expected, rel=1e-12)
    assert fd(m2, s2, m1, s1) == pytest.approx(expected, rel=1e-12)
    values, vectors = np.linalg.eigh(s2)
    root2 = (vectors * np.sqrt(values)) @ vectors.T  # S2^1/2 (S1^1/2 is diagonal)
    slip = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.sqrt(s1) @ root2)
    assert abs(slip - expected) > 0.2  # (these matrices tell the two apart)
    x, y = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6)), rng.normal(size=(50, 6)) + 1
    stats_x, stats_y = compare.statistics_of(x), compare.statistics_of(y)
    singular = compare.statistics_of(rng.normal(size=(4, 6)))  # 4 samples in 6 dimensions
    for stats in (stats_x, stats_y, singular):  # (0 up to the rounding of near-0 roots)
        assert abs(fd(*stats, *stats)) < 1e-6 * np.trace(stats[1])
    assert fd(*stats_x, *stats_y) == pytest.approx(fd(*stats_y, *stats_x), rel=1e-10)
    assert fd(*stats_x, *singular) == pytest.approx(fd(*singular, *stats_x), rel=1e-7)


def test_shape_features_are_the_input_of_the_last_layer():
    """shapes.features: 96 numbers per image, which the last Linear turns into predict's logits."""
    shapes = figure_module("shapes")
    torch.manual_seed(0)
    model = shapes.net().eval()
    x, _ = shapes.real_shapes(6, 16)  # (another resolution: resized as predict does)
    features = shapes.features(model, x)
    assert features.shape == (6, 96)
    with torch.no_grad():
        assert torch.equal(model[-1](features).argmax(1), shapes.predict(model, x))


def test_the_comparison_trains_the_readmes_demo_recipe():
    """compare.DEMO is the README's demo command, but for its --exp-name demo."""
    words = next(w for w in commands(readme()) if w[:2] == ["python", "sra.py"])[2:]
    i = words.index("--exp-name")
    assert words[i + 1] == "demo" and words[:i] + words[i + 2:] == figure_module("compare").DEMO


def test_demo_figures_from_a_run_and_its_grid(trained, tmp_path, capsys):
    """figures/demo.py: the run's grid copied at twice its size (each pixel a 2 x 2 block, in 128
    colours), its curves drawn from metrics.jsonl, the caption's figures printed (a quickly
    trained classifier)."""
    assert sample.cli(["--ckpt", str(trained / "checkpoints" / "0000030.pt"), "--grid",
                       "--num-steps", "4", "--sample-dir", str(tmp_path)]) == 0
    (grid,) = glob.glob(str(tmp_path / "*-0000030-*-grid.png"))
    figure_module("shapes").train(30, str(tmp_path / "classifier.pt"), batch=16, report=False)
    figure_module("demo").main(["--run", str(trained), "--grid", grid, "--out", str(tmp_path),
                                "--classifier", str(tmp_path / "classifier.pt")])
    original = np.asarray(Image.open(grid)).astype(int)
    copied = np.asarray(Image.open(tmp_path / "demo-grid.png").convert("RGB")).astype(int)
    assert copied.shape == (2 * original.shape[0], 2 * original.shape[1], 3)
    assert all(np.array_equal(copied[i::2, j::2], copied[::2, ::2]) for i in (0, 1) for j in (0, 1))
    assert np.corrcoef(copied[::2, ::2].ravel(), original.ravel())[0, 1] > 0.9  # 128 colours
    with Image.open(tmp_path / "demo-loss.png") as image:
        assert image.size == (1000, 400)
    records = metrics(trained)
    out = capsys.readouterr().out
    assert re.search(r"the classifier names \d+\.\d% of the filled shapes and \d+\.\d% of the "
                     r"outlines", out)
    assert (f"denoising loss {records[0]['gen_loss']:.3f} at step 1, "
            f"{records[-1]['gen_loss']:.3f} at step 30") in out


@slow
def test_compare_quick_trains_scores_draws_and_resumes(tmp_path):
    """compare.py --quick: 3 runs (seed 0) trained with the demo's command cut to 4 steps, scored
    at steps 2 and 4, a 1500 x 480 figure, a table; run again, it redoes nothing; a run that lost
    its last checkpoint resumes from its own step 2 and nothing else is redone."""
    out = tmp_path / "quick"
    cmd = [sys.executable, os.path.join(HERE, "figures", "compare.py"), "--quick", "--out",
           str(out)]
    # from another working folder: the script finds sra.py and its defaults by its own path
    first = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    for name in ("sra-seed0", "vanilla-seed0", "self-seed0"):
        assert f"[train] {name}: started, from scratch" in first.stdout
    assert "floor: Fréchet distance" in first.stdout
    with Image.open(out / "sra-vs-vanilla.png") as image:
        assert image.size == (1500, 480)
    results = (out / "results.md").read_text()
    assert results in first.stdout  # the same table is printed
    header = next(line for line in results.splitlines() if line.startswith("| step | Fr"))
    for label in ("SRA", "vanilla", "self 1-1"):
        assert f"Fréchet {label} |" in header and f"accuracy {label} |" in header
    rows = [line.split("|")[1].strip() for line in results.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert rows[:2] == ["2", "4"]  # (then the training table's rows)
    assert "Floor: the Fréchet distance between two disjoint sets of 16 real images" in results
    settings = {name: json.loads((out / name / "args.json").read_text())
                for name in ("sra-seed0", "vanilla-seed0", "self-seed0")}
    for run in settings.values():  # the demo's command, with the quick values
        assert (run["model"], run["batch_size"], run["max_train_steps"], run["seed"],
                run["checkpoint_steps"], run["ema_decay"]) == ("SiT-T/4", 4, 4, 0, 2, 0.99)
    assert [settings[n]["no_sra"] for n in settings] == [False, True, False]
    assert [settings[n]["block_out_t"] for n in settings] == [4, 4, 1]
    scores = json.loads((out / "scores.json").read_text())
    assert {name: sorted(per_step) for name, per_step in scores["runs"].items()} == {
        name: ["2", "4"] for name in settings}
    assert all(np.isfinite(s["fd"]) and 0 <= s["accuracy"] <= 1
               for per_step in scores["runs"].values() for s in per_step.values())

    def state():
        """What a second call must leave as it is: scores, run outputs, checkpoints."""
        files = [out / "scores.json", out / "shape-score.pt", *out.glob("*.out"),
                 *out.glob("*/checkpoints/*.pt"), *out.glob("*/metrics.jsonl")]
        return {str(f): (f.stat().st_mtime_ns, f.read_bytes()) for f in files}

    before = state()
    second = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                            timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "nothing to redo" in second.stdout and ": started," not in second.stdout
    assert state() == before
    os.remove(out / "sra-seed0" / "checkpoints" / "0000004.pt")  # killed between checkpoints
    third = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True,
                           timeout=600)
    assert third.returncode == 0, third.stdout + third.stderr
    assert "[train] sra-seed0: started, resuming from step 2" in third.stdout
    assert third.stdout.count(": started,") == 1 and "trained 1 run(s), scored 0" in third.stdout
