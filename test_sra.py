"""Tests for sra.py, sample.py and the README's figures: CPU only, tiny configs, seeded.

    python -m pytest -q test_sra.py                 # everything (CI): a few minutes on 2 cores
    python -m pytest -q test_sra.py -m "not slow"   # the unit tests, under a minute: after an edit

`slow` marks the tests that start processes: torchrun, signals to every pid, real write failures,
the figure scripts. Sections follow the files they guard, in their order: sra.py (embedders, the
transformer, objectives, the SRA term, data, helpers, the training loop, fault tolerance, the
command line), then sample.py, then the README and figures/. Each expected value comes from
somewhere else than the code under test: a closed form, a hand computation here, a recording stub,
a published number (the SRA, DiT and SiT papers and their official code). `python .ci/mutants.py`
applies one-line slips to a copy of the code and reports the ones these tests let through.
"""
import argparse
import ast
import contextlib
import functools
import glob
import json
import math
import os
import re
import resource
import signal
import subprocess
import sys
import time
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

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
    """One intra-op thread (tiny tensors run faster, a busy machine does not make threads spin);
    and pytest's own SIGTERM handler back after sra.main installed its own."""
    threads = torch.get_num_threads()
    handler = signal.getsignal(signal.SIGTERM)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    signal.signal(signal.SIGTERM, handler)
    sra.STOP_REQUESTED.clear()


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


def ddpm_tables():
    """DDPM's linear schedule from its definition (Ho et al.), in numpy float64: beta, abar,
    abar_prev, the posterior variance beta tilde and the two coefficients of the posterior mean."""
    beta = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - beta)
    prev = np.append(1.0, abar[:-1])
    return dict(beta=beta, abar=abar, prev=prev, tilde=beta * (1 - prev) / (1 - abar),
                coef1=beta * np.sqrt(prev) / (1 - abar),
                coef2=(1 - prev) * np.sqrt(1 - beta) / (1 - abar))


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
    """Start `script` (sra.py) in the background, under torchrun with `nproc` gloo processes if
    nproc; output to a file (a pipe nobody reads could fill up)."""
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
    """The run logged finite losses at every step up to `steps` and its last checkpoint holds
    plain parameter names (no `_orig_mod.` of torch.compile, no `module.` of DDP); -> it."""
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
        assert_identical(a[key], b[key], key)


def assert_identical(a, b, where):
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


def logged_steps(log):
    """The N of every `step N/M |` line of a log."""
    return [int(n) for n in re.findall(r"\] step (\d+)/\d+ \|", log)]


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
    """Kill and reap a process this test started, and SIGKILL any of `pids` still alive."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def children(pid):
    """The pids whose parent is `pid` (from /proc)."""
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            if int(open(stat).read().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.split("/")[2]))
        except (OSError, IndexError):
            continue
    return found


def job_pids(pid):
    """`pid` and all its descendants: every process of a job, as SLURM signals them."""
    return [pid] + [p for child in children(pid) for p in job_pids(child)]


def alive(pid):
    """True while `pid` exists and is not a zombie."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def rank_of(pid):
    """The RANK that torchrun gave a worker process (None for other processes)."""
    environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), None)


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


def make_latent_folder(root):
    """root/vae-sd/dataset.json and six (1, 8, 4, 4) fp16 moment files 00/<i>.npy (32 px images),
    labels i % 3; returns root."""
    rng = np.random.default_rng(0)
    (root / "vae-sd" / "00").mkdir(parents=True)
    labels = []
    for i in range(6):
        np.save(root / "vae-sd" / "00" / f"{i}.npy",
                rng.standard_normal((1, 8, 4, 4)).astype(np.float16))
        labels.append([f"00/{i}.npy", i % 3])
    (root / "vae-sd" / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
    """A tiny pre-encoded data folder, shared by the tests that only read it."""
    return make_latent_folder(tmp_path_factory.mktemp("latents"))


def limit_file_size(limit=1 << 20):
    """preexec_fn: files cannot grow past `limit` bytes, and a write past it fails with EFBIG
    instead of killing the process (SIGXFSZ ignored): a full disk, without a mount."""
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


# ==================================================================================================
# sra.py, 5. Data: built-in shapes, image folders, latents, --encode

def test_builtin_dataset_is_deterministic_and_class_conditional():
    """ShapesDataset: 10 classes, (3, R, R) in [-1, 1], an index always gives the same image,
    and the classes look different on average."""
    ds = sra.ShapesDataset(32)
    x0, y0 = ds[17]
    assert x0.shape == (3, 32, 32) and x0.dtype == torch.float32 and y0 == 7
    assert x0.min() >= -1 and x0.max() <= 1 and x0.std() > 0.1
    assert torch.equal(ds[17][0], x0) and not torch.equal(ds[27][0], x0)
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


def test_image_folder_data_uses_the_adm_crop_and_trains(tmp_path):
    """An image folder gives (3, R, R) items in [-1, 1] cropped the ADM way (box-halve while the
    short side is at least twice R, bicubic to R, crop the centre), labels from the sorted class
    names; it trains."""
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
    run_dir = run_main(tmp_path, "--data-dir", str(root), "--max-train-steps", "2")
    assert json.loads((run_dir / "args.json").read_text())["num_classes"] == 2
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


def test_pixel_runs_of_too_many_tokens_stop_with_the_ways_out(tmp_path, capsys):
    """256 px pixels at patch 2 (16,384 tokens, 64x the paper's 256): one line naming the count and
    both ways out, exit 2, nothing written; 128 px (4,096 tokens) is allowed."""
    status, line = run_cli(capsys, *TINY, "--model", "SiT-T/2", "--resolution", "256",
                           "--output-dir", tmp_path)
    assert status == 2
    one_line_naming(line, "SiT-T/2 on 256 px images is 16384 tokens", "--encode DIR",
                    "--resolution", "patch")
    assert not os.listdir(tmp_path)
    sra.build_dataset(sra.parse_args(TINY + ["--model", "SiT-T/2", "--resolution", "128"]))


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
    """root/site/diffusers (a stand-in package of the VAE's interface) and root/vae-<seed>/ (its
    weights, as save_pretrained leaves a folder) -> (site, vae folder)."""
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
    LatentDataset reads it, a SiT trains on it, sample.py decodes with the same VAE folder."""
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
def test_encode_two_processes_equal_one_and_a_killed_encode_resumes(tmp_path):
    """torchrun with 2 processes writes the same bytes as 1 process; an encode killed mid-way then
    rerun rewrites no finished file and ends with the same bytes."""
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
    proc = subprocess.Popen([sys.executable, SRA, *encode_flags(images, tmp_path / "run", vae)],
                            cwd=tmp_path, env=dict(env, FAKE_VAE_DELAY="1"),
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


@slow
def test_encode_that_cannot_write_is_one_line_and_a_rerun_completes(tmp_path):
    """A latent file that cannot be written for real (files limited to 200 bytes, a latent is
    256): one line naming it, exit 2, no .tmp, no dataset.json, never a short file (np.save's C
    writes would lose such a failure without a word); without the limit, a rerun completes."""
    site, vae = fake_vae(tmp_path)
    images = make_image_folder(tmp_path / "img")
    cmd = [sys.executable, SRA, *encode_flags(images, tmp_path / "enc", vae)]
    env = dict(ENV, PYTHONPATH=f"{HERE}:{site}")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=limit_file_size(200))
    out = tmp_path / "enc" / "vae-sd"
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.fullmatch(rf"error: cannot write latent file {out}/(cat|dog)/\d\.png\.npy: .+",
                        last), last
    assert not list(out.rglob("*.tmp")) and not (out / "dataset.json").exists()
    assert all(p.stat().st_size == 256 for p in out.rglob("*.npy"))
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and len(list(out.rglob("*.npy"))) == 8, proc.stderr[-3000:]


@pytest.mark.parametrize("case", ["no-class-folders", "unreadable-image", "resolution",
                                  "vae-folder", "no-diffusers"])
def test_encode_bad_input_is_one_line(case, tmp_path, with_fake_vae, capsys, monkeypatch):
    """Each bad input of --encode is one line naming the problem, exit 2; no dataset.json."""
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
    """load_vae names the SD-VAE's weights and passes low_cpu_mem_usage=False (what diffusers falls
    back to without the accelerate package, said so that it prints no advice to install it)."""
    loads = []

    class AutoencoderKL:
        @classmethod
        def from_pretrained(cls, source, **kwargs):
            loads.append((source, kwargs))
            return torch.nn.Identity()

    monkeypatch.setitem(sys.modules, "diffusers", SimpleNamespace(AutoencoderKL=AutoencoderKL))
    sra.load_vae("mse", torch.device("cpu"))
    assert loads == [("stabilityai/sd-vae-ft-mse", {"low_cpu_mem_usage": False})]


# ==================================================================================================
# sra.py, 6. Helpers: atomic writes, checkpoints

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
    """A process killed while atomic_write writes leaves the old checkpoint intact and loadable;
    the half file is a .tmp, which --resume auto never takes."""
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    path = ckpt_path(tmp_path / "run", 4)
    old = {"model": {"w": torch.arange(10.0)}, "step": 4}
    with sra.atomic_write(path, "checkpoint") as f:
        torch.save(old, f)
    proc = subprocess.run([sys.executable, "-c", DIE_MID_WRITE, ckpt_path(tmp_path / "run", 6)],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert os.path.getsize(ckpt_path(tmp_path / "run", 6) + ".tmp") == 100_000
    assert_identical(load(path), old, "checkpoint")
    loaded = []
    parts = {"model": SimpleNamespace(load_state_dict=loaded.append)}
    args = SimpleNamespace(resume="auto", model="SiT-T/8")
    assert sra.resume(args, str(tmp_path / "run"), parts)[0] == path
    assert_identical(loaded, [old["model"]], "loaded")


def test_a_write_that_fails_is_one_line_and_keeps_the_old_file(tmp_path):
    """A write that fails (ENOSPC, as on a full disk) is one UserError naming the file and the
    reason; the old file is intact and no .tmp is left. (Real failures: the slow tests.)"""
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
    """Every torch.load in sra.py and sample.py passes weights_only=True (then a checkpoint cannot
    run code when it is read); no pickle.load, no np.load with allow_pickle."""
    source = open(os.path.join(HERE, name)).read()
    calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
             and ast.unparse(node.func) == "torch.load"]
    assert calls, f"no torch.load found in {name}: has the loading moved?"
    for call in calls:
        flag = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
        assert isinstance(flag, ast.Constant) and flag.value is True, ast.unparse(call)
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
    for stop_at in (1, 3, 5):
        run_main(tmp_path, *flags, "--max-train-steps", str(stop_at), "--resume", "auto",
                 exp="resumed")
    assert_same_training_state(ckpt_path(tmp_path / "resumed", 5), ckpt_path(reference, 5))


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


def test_main_runs_dit_with_the_cos_loss(tmp_path):
    """DiT with --loss-type cos trains to the end: finite losses, lambda 0.5 constant (the official
    code decays it for sml1 only), a checkpoint of a learned-sigma model with plain names."""
    run_dir = run_main(tmp_path, "--model", "DiT-T/8", "--loss-type", "cos",
                       "--align-decay-start", "0", "--max-train-steps", "2")
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


def test_compile_failure_is_reported_and_training_and_the_bench_run_eagerly(tmp_path, capsys,
                                                                            monkeypatch):
    """When compilation fails, log.txt says so once and the run trains eagerly to the end; the
    bench's lines then say compile: false, not the flag they were given."""
    monkeypatch.setattr(torch, "compile", failing_compile)
    run_dir = run_main(tmp_path, "--compile", "--max-train-steps", "2")
    log = (run_dir / "log.txt").read_text()
    assert log.count("torch.compile failed") == 1 and "no C++ compiler found" in log
    assert_finished(run_dir, 2)
    sra.bench(sra.parse_args(TINY + ["--bench", "--compile", "--bench-steps", "1"]))
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line[0] == "{"]
    assert [line["compile"] for line in lines] == [False, False]


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
        records = sra.main(args)
    finally:
        guard.set(False)
    assert guard.hits == []
    assert guard.arms == (sra.BENCH_WARMUP + 1) * int(accum)  # every micro-batch was guarded
    assert len(records) == sra.BENCH_WARMUP + 1 and math.isfinite(records[-1]["gen_loss"])


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
    monkeypatch.setattr(sra, "peak_flops", lambda device: 1e12)
    sra.bench(sra.parse_args(["--bench", "--model", "SiT-T/4", "--bench-shape", "4", "32", "32",
                              "--batch-size", "2", "--gradient-accumulation-steps", "2",
                              "--bench-steps", "2", "--num-workers", "0"]))
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
# sra.py, 8. Fault tolerance: kills, preemption, full disks, bad data, NaNs

STEPS = 12  # length of the reference run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted subprocess run of STEPS steps -> its run folder."""
    root = tmp_path_factory.mktemp("reference")
    proc = train(root, "--max-train-steps", str(STEPS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


@slow
def test_sigkill_then_sigterm_then_resume_auto_is_bit_identical(tmp_path, reference):
    """SIGKILL, resume, SIGTERM (checkpoint, exit 0), resume: bit-identical to an uninterrupted
    run."""
    run_dir, log_path = tmp_path / "run", tmp_path / "run" / "log.txt"
    proc = start(tmp_path, "--max-train-steps", "1000", "--checkpoint-steps", "2")
    try:
        wait_for(lambda: "step 3/" in read(log_path), "step 3", proc=proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode == -signal.SIGKILL and "done:" not in read(log_path)
    before = steps_saved(run_dir)
    killed_at = before[-1]
    # --checkpoint-steps 1000: the only new checkpoint of this leg is the one SIGTERM writes
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
    assert steps_saved(run_dir) == before + [step] and killed_at < step < STEPS
    assert load(ckpt_path(run_dir, step))["step"] == step
    lines = read(log_path).splitlines()
    assert lines[-3].endswith(f"] saved checkpoint {ckpt_path(run_dir, step)}"), lines[-3:]
    assert lines[-2].endswith(f"] SIGTERM: stopped at step {step}; continue with --resume auto")
    run_main(tmp_path, "--max-train-steps", str(STEPS), "--checkpoint-steps", "1000",
             "--resume", "auto")
    assert_same_training_state(ckpt_path(run_dir, STEPS), ckpt_path(reference, STEPS))


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
sys.exit(sra.cli(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
    """An uninterrupted run of STEPS steps with --gradient-accumulation-steps 2 -> its folder."""
    root = tmp_path_factory.mktemp("accumulated")
    proc = train(root, "--max-train-steps", str(STEPS), "--gradient-accumulation-steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run"


@slow
@pytest.mark.parametrize("moment", ["fetch", "step", "save"])
def test_sigterm_to_every_pid_of_the_job_checkpoints_and_resumes_bit_identical(
        moment, tmp_path, reference, accumulated):
    """SIGTERM to the trainer and to each DataLoader worker by pid (SLURM at a time limit), while
    batches are fetched, mid-step (2 micro-batches a step) or during a checkpoint write: a
    checkpoint of a completed step, logged, exit 0, no process left; resumed, bit-identical."""
    accum = ["--gradient-accumulation-steps", "2"] if moment == "step" else []
    script, saving = tmp_path / "slow.py", tmp_path / "saving"
    script.write_text(SLOW)
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
    finally:
        stop(proc, *pids)
    assert proc.returncode == 0, read(tmp_path / "run.out")[-3000:]
    step = steps_saved(run_dir)[-1]
    assert step < STEPS and load(ckpt_path(run_dir, step))["step"] == step
    assert f"SIGTERM: stopped at step {step}; continue with --resume auto" in read(log_path)
    assert not glob.glob(str(run_dir / "checkpoints" / "*.tmp"))
    proc = train(tmp_path, *accum, "--resume", "auto", "--max-train-steps", str(STEPS))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = accumulated if accum else reference
    assert_same_training_state(ckpt_path(run_dir, STEPS), ckpt_path(ref, STEPS))


@slow
def test_sigkill_of_a_dataloader_worker_is_one_line_and_the_checkpoint_stays(tmp_path):
    """One DataLoader worker killed (an OOM killer): one line naming the data loader, exit 2, no
    hang, no half-written file; the last checkpoint loads."""
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
    assert lines[-1].startswith("error: the data loader failed: DataLoader worker"), lines[-1]
    assert load(ckpt_path(run_dir, steps_saved(run_dir)[-1]))
    assert not glob.glob(str(run_dir / "checkpoints" / "*.tmp"))


@slow
def test_checkpoint_that_cannot_be_written_is_one_line_and_leaves_no_partial_file(tmp_path):
    """A checkpoint write that fails for real (EFBIG, as a full disk): one line with the file and
    the reason, exit 2, the .tmp removed, the last good checkpoint intact."""
    assert train(tmp_path, "--max-train-steps", "2").returncode == 0
    good = ckpt_path(tmp_path / "run", 2)
    before = open(good, "rb").read()
    proc = train(tmp_path, "--resume", "auto", "--max-train-steps", "4",
                 preexec_fn=limit_file_size())
    assert proc.returncode == 2 and proc.stderr == (
        f"error: cannot write checkpoint {ckpt_path(tmp_path / 'run', 4)}: File too large\n")
    assert os.listdir(tmp_path / "run" / "checkpoints") == ["0000002.pt"]
    assert open(good, "rb").read() == before


DDP_STEPS = 12  # the final step of the preempted DDP run


@slow
@pytest.mark.parametrize("who", ["rank 1", "every pid"])
def test_sigterm_to_ddp_ranks_stops_every_rank_within_a_step_and_resumes_bit_identical(who,
                                                                                       tmp_path):
    """torchrun: SIGTERM to rank 1 alone (exit 0), or to every process of the job (the agent, both
    ranks, their DataLoader workers; torchrun then reports the signal): both ranks stop at the same
    step, within a step of the signal, and checkpoint; resume is bit-identical."""
    flags = ["--checkpoint-steps", "1000", "--num-workers", "1"]
    ref = start(tmp_path, *flags, "--max-train-steps", str(DDP_STEPS), exp="ref", out="ref.out",
                nproc=2)
    proc = start(tmp_path, *flags, "--max-train-steps", "1000", nproc=2)
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
    ckpt = load(ckpt_path(run_dir, step))
    # both ranks' streams, gathered at that step
    assert ckpt["step"] == step and len(ckpt["rng"]) == 2

    proc = start(tmp_path, *flags, "--max-train-steps", str(DDP_STEPS), "--resume", "auto",
                 out="resume.out", nproc=2)
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
    proc = start(tmp_path, *EXACT, "--batch-size", "2", "--gradient-accumulation-steps", "2",
                 exp="ddp", out="ddp.out", script=script, nproc=2)
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


@pytest.mark.parametrize("fault", ["truncated", "wrong-shape", "missing"])
def test_bad_latent_is_one_line_naming_it_when_first_read(tmp_path, fault, small, capsys):
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
    status, line = run_cli(capsys, *LATENT_FLAGS, "--model", "SiT-T/4", "--data-dir", data,
                           "--max-train-steps", "20", "--output-dir", tmp_path, "--exp-name", "run")
    assert status == 2
    one_line_naming(line, bad)
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
    ckpt = load(ckpt_path(run_dir, good))
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
    # the scale halves at each skipped step
    halvings = [round(math.log2(2.0 ** 24 / scale)) for scale in HugeScaler.scales]
    assert len(halvings) == 8 and 0 < halvings[-1] < 8  # some steps skipped, some taken
    assert [m["step"] for m in metrics] == list(range(1, 9))
    # one skipped step in the record of each step that overflowed
    assert [m["skipped_steps"] for m in metrics] == np.diff([0] + halvings).tolist()
    ckpt = load(ckpt_path(tmp_path / "run", 8))
    assert ckpt["scaler"]["scale"] == HugeScaler.scales[-1]
    assert all_finite(ckpt["model"]) and all_finite(ckpt["ema"])




CIFAR_SCRIPT = r"""
import os, sys, time
import torch.distributed as dist
from torchvision import datasets
import sra


class RecordingCIFAR10:
    "Stands in for torchvision's: a 'download' takes a second; a read of nothing fails as its."

    def __init__(self, root, download, transform):
        if download:
            os.makedirs(root, exist_ok=True)
            time.sleep(1)
            open(os.path.join(root, "data"), "w").close()
        elif not os.path.exists(os.path.join(root, "data")):
            raise RuntimeError("Dataset not found or corrupted.")
        with open(os.path.join(root, "calls"), "a") as f:
            print(os.environ["RANK"], download, file=f)


datasets.CIFAR10 = RecordingCIFAR10
dist.init_process_group("gloo")
sra.build_dataset(sra.parse_args(["--dataset", "cifar10", "--data-dir", sys.argv[1]]))
"""


@slow
def test_under_torchrun_rank_0_downloads_cifar10_while_the_others_wait(tmp_path):
    """Two processes: rank 0 downloads, rank 1 reads after it (had both fetched at once into one
    folder, each would have overwritten the other's files)."""
    (tmp_path / "cifar.py").write_text(CIFAR_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", tmp_path / "cifar.py", tmp_path / "data"],
                          env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read(tmp_path / "data" / "calls").splitlines() == ["0 True", "1 False"]


def all_finite(state):
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


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
    assert entry["--align-decay-start"].endswith("(default: 745596)")
    assert entry["--epochs"].endswith("(default: 801)")


BAD_INPUT = {  # flags -> what the one line says
    "model": (["--model", "SiT-XL2"], ["unknown model 'SiT-XL2'", "SiT|DiT-{T,S,B,L,XL}/{2,4,8}"]),
    "data-dir": (["--data-dir", "/nonexistent/imagenet"],
                 ["No such file or directory", "/nonexistent/imagenet"]),
    "latent-dir": (["--data-dir", "/nonexistent", "--dataset", "latents"],
                   ["No such file or directory", "/nonexistent/vae-sd/dataset.json"]),
    "block-out-t": (["--block-out-t", "7"], ["block 7 is out of range: SiT-T/8 has blocks 1..6"]),
    "block-out-s": (["--block-out-s", "-1"], ["block -1 is out of range"]),
    "resume-text": (["--resume", "{tmp}/img/cat/0.png"], ["cannot resume from {tmp}/img/cat/0.png"]),
    "batch-size": (["--batch-size", "0"], ["--batch-size, --gradient-accumulation-steps"]),
    "no-class-folders": (["--data-dir", "{tmp}/img/cat"], ["class folder", "{tmp}/img/cat"]),
    "empty-class-folder": (["--data-dir", "{tmp}/img"], ["no valid file for the classes hollow"]),
    "cifar-offline": (["--dataset", "cifar10", "--data-dir", "{tmp}/cifar"],
                      ["name resolution"]),
    "flag": (["--bench-steps", "many"], ["invalid int value: 'many'"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys, monkeypatch):
    """Each first-hour mistake is one line on stderr that says what is wrong, exit status 2,
    before the run folder exists (CIFAR-10 offline: torchvision's own message)."""
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
    assert not (tmp_path / "out" / "run").exists()


@slow
def test_the_command_line_exits_2_with_one_line():
    """`python sra.py` with a bad flag value exits 2 with one `error: ` line, no traceback."""
    proc = subprocess.run([sys.executable, "sra.py", "--model", "SiT-Q/2", "--num-workers", "0"],
                          cwd=HERE, capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: unknown model 'SiT-Q/2'") and proc.stderr.count("\n") == 1


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
    os.rename(run_dir, moved)
    monkeypatch.chdir(tmp_path / "elsewhere")
    sra.main(sra.parse_args(["--resume", ckpt_path(moved, 3), "--max-train-steps", "4"]))
    assert "resumed from" in read(moved / "log.txt")
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
    before = sorted(run_dir.rglob("*"))
    with pytest.raises(sra.UserError) as error:
        run_main(tmp_path, "--resume", "auto", *flags, base=[])
    one_line_naming(str(error.value), named, "--exp-name")
    assert sorted(run_dir.rglob("*")) == before


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
    one_line_naming(str(error.value), "edited.pt", "blocks.0.attn.qkv.bias", "pos_embed",
                    "torch.Size([1, 9, 32])")
