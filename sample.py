"""Sampling from DiT/SiT/SRA checkpoints: ODE, SDE and DDPM samplers with CFG, and FID-ready .npz.

Run recipes
    # a quick look: one PNG, 8 new samples for each of the first 10 classes (50 steps, CFG 4)
    python sample.py --ckpt exps/demo/checkpoints/0001500.pt --grid
    # the paper's FID-50K run (SiT-XL/2 + SRA: SDE, 250 steps, CFG 1.8 on t in [0, 0.7]), 8 GPUs
    torchrun --nproc_per_node=8 sample.py --model SiT-XL/2 --ckpt CKPT --num-fid-samples 50000 \
        --path-type linear --per-proc-batch-size 64 --mode sde --num-steps 250 --cfg-scale 1.8 \
        --guidance-high 0.7 --resolution 256 --vae ema --global-seed 0 --sample-dir samples
    # released weights are bare state dicts: --model names the architecture (and its convention)
    python sample.py --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --cfg-scale 1.5 --grid
The .npz is <sample-dir>/<name>-n<N>.npz: arr_0 = uint8 images (N, H, W, 3) as the ADM evaluator
reads them, arr_1 = int64 class labels (N,). Run the same command again to resume an interrupted
run; once the .npz is written and checked, the per-batch part files go (--keep-parts keeps them),
and running the command again only says that the .npz exists.

Notable choices
    * SRA time: t = 1 noise -> t = 0 data. Weights from the SiT repository (t = 0 noise) are
      wrapped as v(x, t) = -f(x, 1 - t)[:, :C], so one set of ODE/SDE samplers serves every SiT.
    * CFG guides all C channels (not DiT's 3 of 4); a learned-variance DiT keeps its conditional
      variance channels. The null label is the checkpoint's num_classes, never a hard-coded 1000.
      Guidance is on or off for a whole sampler step, decided at the step's start time (REPA).
    * Every sample owns a random stream seeded from (--global-seed, its index): label, then
      noise, then the SDE/DDPM step noise. Batches are cut at fixed index multiples, so the
      number of processes never changes a sample, and finished batches are never redone.
"""
import argparse
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
import tempfile
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from PIL import Image
from tqdm import tqdm

import sra


# ==================================================================================================
# Random streams: one generator per sample, so results do not depend on how samples are batched
# ==================================================================================================

def stream_seed(global_seed, index):
    """The seed of sample `index`: a 32-bit bijection of the index, keyed by the global seed."""
    # PyTorch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so packing the global
    # seed above the index (seed << 32 | index) gave every global seed the very same streams.
    # Instead index -> a * index + b mod 2**32, with a (odd, hence invertible) and b drawn from a
    # hash of the global seed: distinct indices (< 2**32) get distinct seeds, and another global
    # seed scrambles the streams anew rather than shifting them by an index offset.
    key = int.from_bytes(hashlib.sha256(str(global_seed).encode()).digest()[:8], "little")
    return ((key >> 32 | 1) * index + key) & 0xFFFFFFFF


def randn_like(x, generator=None):
    """Standard normal noise shaped like x from one generator, one generator per sample, or None."""
    if isinstance(generator, (list, tuple)):  # row i from sample i's own stream
        noise = torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device)
                             for g in generator])  # (N, C, H, W)
    else:  # one stream for the whole batch (None: the global RNG, on x's device)
        device = x.device if generator is None else generator.device
        noise = torch.randn(x.shape, generator=generator, device=device)
    return noise.to(x.device, x.dtype)


def sample_inputs(indices, global_seed, num_classes, shape):
    """Per-sample streams of the global indices -> noise z (N, *shape), labels y (N,), generators.
    Each stream draws its label, then its noise z, then (in the sampler) its SDE/DDPM noise."""
    # CPU generators: the same numbers on every machine and GPU type, at a negligible cost next
    # to the network, and cheap to make one per sample.
    gens = [torch.Generator().manual_seed(stream_seed(global_seed, i)) for i in indices]
    y = torch.stack([torch.randint(num_classes, (), generator=g) for g in gens])  # (N,) uniform
    z = torch.stack([torch.randn(shape, generator=g) for g in gens])  # (N, C, H, W)
    return z, y, gens


# ==================================================================================================
# Samplers. Each takes a function of (x, t): the tests pass exact closed-form fields.
# ==================================================================================================

def sample_ode(velocity, x, num_steps, heun=False, step_start=False):
    """Integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data) on linspace(1, 0, N+1), state
    in float64: Euler, or Heun (2nd order) without its correction on the last step (v at t = 0).
    step_start=True gives Heun's correction the step's start time, velocity(x, t, t_start): a guided
    network then decides CFG once per step, as REPA's sampler does (see model_fn)."""
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    x = x.to(torch.float64)  # (N, C, H, W)
    for i in range(num_steps):
        dt = t[i + 1] - t[i]  # negative: we run backwards in time
        d_cur = velocity(x, t[i])  # (N, C, H, W)
        x_next = x + dt * d_cur  # the Euler step
        if heun and i < num_steps - 1:  # a guided network decides CFG at the step's start t[i]
            start = (t[i],) if step_start else ()
            d_next = velocity(x_next, t[i + 1], *start)
            x_next = x + dt * 0.5 * (d_cur + d_next)  # trapezoid: the mean of both slopes
        x = x_next
    return x


def sample_sde(velocity, x, num_steps, path_type="linear", generator=None):
    """Euler-Maruyama for dx = [v - w/2 * score] dt + sqrt(w) dW, w(t) = 2t, on
    linspace(1, 0.04, N) then 0. The first N-1 steps add noise; the last, to t = 0, is the mean."""
    t = torch.linspace(1, 0.04, num_steps, dtype=torch.float64)
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])  # (N + 1,)
    x = x.to(torch.float64)  # (N, C, H, W)
    for i in range(num_steps):
        dt = t[i + 1] - t[i]  # negative: backwards in time
        v = velocity(x, t[i].item())  # (N, C, H, W)
        # Score from velocity: x = a x0 + s eps and v = a' x0 + s' eps give eps-hat; score = -eps/s.
        alpha, sigma, d_alpha, d_sigma = sra.interpolant(t[i], path_type)
        ratio = alpha / d_alpha
        score = (ratio * v - x) / (sigma ** 2 - ratio * d_sigma * sigma)
        # w(t) = 2t as in REPA's and SRA's Euler-Maruyama sampler: it vanishes at t = 0, so the
        # noise it injects shrinks as the samples approach the data
        w = 2 * t[i]
        x = x + (v - 0.5 * w * score) * dt
        if i < num_steps - 1:
            x = x + w.sqrt() * dt.abs().sqrt() * randn_like(x, generator)
    return x


def respace(diffusion, num_steps):
    """Keep `num_steps` evenly spaced steps, DiT's space_timesteps(T, [K]): betas recomputed from
    the kept alpha-bars; the model is still fed the original step index `timestep_map[i]`."""
    T = diffusion.num_timesteps
    if not 1 <= num_steps <= T:
        raise sra.UserError(f"--num-steps must be between 1 and {T} for DDPM, got {num_steps}")
    # DiT adds a float stride up step by step and rounds each partial sum. round(i * stride) is not
    # the same for 283 step counts in 1..1000 (e.g. 21), so we accumulate exactly as DiT does.
    stride = (T - 1) / (num_steps - 1) if num_steps > 1 else 1
    keep = [round(s) for s in itertools.accumulate([stride] * (num_steps - 1), initial=0.0)]
    ac = diffusion.alphas_cumprod[keep]  # (K,) the alpha-bars of the kept steps
    ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
    respaced = sra.GaussianDiffusion(1 - ac / ac_prev)
    respaced.timestep_map = torch.as_tensor(keep, device=ac.device)  # respaced step -> original
    return respaced


def sample_ddpm(eps_model, x, num_steps, generator=None):
    """Ancestral DDPM sampling on `num_steps` evenly spaced steps of the 1000-step schedule.
    eps_model(x, step) gets the original step index (0..999) and returns eps (N, C, H, W), or eps
    and the learned-range value (N, 2C, H, W). No noise on the last step; 1000 = no respacing."""
    # the tables on x's device: indexed there by the step, without a copy per step
    diffusion = respace(sra.GaussianDiffusion.linear(device=x.device), num_steps)
    x = x.to(torch.float64)  # (N, C, H, W)
    for i in reversed(range(diffusion.num_timesteps)):
        # the network was trained on the 1000-step indices, so it is fed the original index
        out = eps_model(x, int(diffusion.timestep_map[i]))  # (N, C or 2C, H, W)
        if out.shape[1] == x.shape[1]:  # no learned variance: DDPM's "fixed large" beta_t, i.e.
            out = torch.cat([out, torch.ones_like(out)], dim=1)  # the learned range's top end
        t = torch.full((len(x),), i, device=x.device)  # (N,) index into the respaced tables
        mean, log_var, _ = diffusion.p_mean_variance(out, x, t)
        x = mean + torch.exp(0.5 * log_var) * randn_like(x, generator) if i > 0 else mean
    return x


# ==================================================================================================
# Networks as sampler functions: classifier-free guidance, the SiT-repo time convention, generate()
# ==================================================================================================

def model_fn(model, y, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0, ddpm=False):
    """The function a sampler calls: f(x, t) -> velocity (N, C, H, W), or with ddpm=True eps and
    DiT's variance channels. CFG v = v_u + w (v_c - v_u) on all C channels while guidance_low <=
    t <= guidance_high (DDPM: t = step / 1000); cfg_scale 1 runs no unconditional pass at all."""
    C = model.in_channels
    dtype = next(model.parameters()).dtype
    net = getattr(model, "net", model)  # the DiT inside a ReversedSiT
    if cfg_scale != 1 and net.y_embedder.embedding_table.num_embeddings <= model.num_classes:
        raise sra.UserError("no null label (trained without label dropout): use --cfg-scale 1")
    y_null = torch.full_like(y, model.num_classes)  # CFG's null label: the row after the classes

    def f(x, t, t_start=None):
        """Network output at (x, t); CFG is decided at t_start, the start of the sampler step."""
        t_in = torch.full((len(x),), float(t), device=x.device)  # SiT: t in [0, 1]; DiT: step
        x_in = x.to(dtype)  # the state is float64, the network runs in its own dtype
        # DDPM steps 0..999 are compared on the same [0, 1] scale as SiT times
        t_cfg = (t if t_start is None else t_start) / (1000 if ddpm else 1)
        if cfg_scale == 1 or not guidance_low <= t_cfg <= guidance_high:
            out = model(x_in, t_in, y)  # (N, C_out, H, W)
        else:  # one batched pass over [conditional; unconditional] instead of two calls
            both = model(torch.cat([x_in, x_in]), torch.cat([t_in, t_in]), torch.cat([y, y_null]))
            cond, uncond = both.chunk(2)  # (N, C_out, H, W) each
            # every data channel is guided (DiT guided 3 of 4, a quirk); the variance stays cond.
            guided = uncond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C])
            out = torch.cat([guided, cond[:, C:]], dim=1)
        out = out.to(torch.float64)
        return out if ddpm else out[:, :C]

    return f


class ReversedSiT(nn.Module):
    """A SiT-repository network (t = 0 noise, t = 1 data, learned sigma) in SRA time:
    v(x, t) = -f(x, 1 - t)[:, :C]. Its x_t = t x + (1 - t) eps: read with t -> 1 - t, the path
    runs our way (t = 1 noise), so d/dt flips sign; its sigma channels serve no ODE/SDE sampler."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.in_channels = net.in_channels  # what the samplers read from a model
        self.num_classes = net.num_classes
        self.input_size = net.input_size

    def forward(self, x, t, y):
        return -self.net(x, 1 - t, y)[:, :self.in_channels]  # (N, C, H, W)


@torch.no_grad()
def generate(model, z, y, *, mode, num_steps, path_type="linear", cfg_scale=1.0,
             guidance_low=0.0, guidance_high=1.0, heun=False, generator=None):
    """Samples (N, C, H, W) float32 in model space from noise z and labels y (N,).
    mode: "ode" (Euler, or Heun with heun=True) or "sde" (Euler-Maruyama) for SiT velocity models;
    "ddpm" for DiT eps models. generator: one torch.Generator, one per sample, or None (global)."""
    f = model_fn(model, y, cfg_scale, guidance_low, guidance_high, ddpm=mode == "ddpm")
    # The ODE hands Heun's correction the step's start time, so that a step is guided as a whole
    # (REPA's sampler); the SDE and DDPM evaluate once per step, at its start, anyway.
    if mode == "ode":
        x = sample_ode(f, z, num_steps, heun, step_start=True)
    elif mode == "sde":
        x = sample_sde(f, z, num_steps, path_type, generator)
    elif mode == "ddpm":
        x = sample_ddpm(f, z, num_steps, generator)
    else:
        raise sra.UserError(f"unknown sampling mode {mode!r}: use sde, ode or ddpm")
    return x.float()


# ==================================================================================================
# Images: SD-VAE decoding, uint8 conversion, PNG grids
# ==================================================================================================

@torch.no_grad()
def to_images(x, vae=None):
    """Model space -> uint8 images (N, H, W, 3): latents are decoded, pixels are in [-1, 1]."""
    if vae is not None:
        x = vae.decode(x.float() / 0.18215).sample  # the SD-VAE's latent scale factor
    x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)  # (N, 3, H, W)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_image_grid(images, path, nrow):
    """Save uint8 images (N, H, W, 3) as one PNG grid with `nrow` images per row."""
    N, H, W, _ = images.shape
    grid = np.zeros((math.ceil(N / nrow) * H, nrow * W, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        row, col = divmod(i, nrow)
        grid[row * H:(row + 1) * H, col * W:(col + 1) * W] = image
    Image.fromarray(grid).save(path)


def save_pngs(images, start, folder):
    """One PNG per image (N, H, W, 3), named by the global index of the sample."""
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images, start):
        Image.fromarray(image).save(os.path.join(folder, f"{i:06d}.png"))


# ==================================================================================================
# Checkpoints: ours, official SRA/REPA/DiT/SiT training checkpoints, released bare state dicts
# ==================================================================================================

def read_checkpoint(path):
    """torch.load with weights_only=True (argparse.Namespace allowed): a checkpoint is a pickle,
    and a full unpickle could run any code it names. UserError for anything else."""
    if not os.path.isfile(path):
        raise sra.UserError(f"checkpoint {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive; files from before PyTorch 1.6 are one pickle (0x80 ...)
    if not head.startswith((b"PK\x03\x04", b"\x80")):
        raise sra.UserError(f"{path} is not a PyTorch checkpoint: torch.save writes a zip archive "
                            f"(or a pickle), and this file is neither")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # official args
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:  # the pickle names a function or class: loading it could run code
            raise sra.UserError(f"refusing to load {path}: it would import {found.group(1)} (only "
                                f"tensors and plain containers load: weights_only=True)") from None
        reason = sra.error_line(e).split(". ")[0]  # PyTorch's first sentence says what broke
        raise sra.UserError(f"{path} is a damaged PyTorch checkpoint ({reason})") from None


def check_keys(expected, state, name, path):
    """UserError naming (a few of) the missing, unexpected and mis-shaped keys of a state dict."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    groups = {"missing": missing, "unexpected": unexpected, "mis-shaped (file vs model)": wrong}
    problems = [f"{len(keys)} {what}: {', '.join(keys[:3])}" for what, keys in groups.items()
                if keys]
    if problems:  # at most three names a group: a wrong architecture mismatches hundreds
        raise sra.UserError(f"{path} does not fit {name}: " + "; ".join(problems))


def time_convention(args, path):
    """(path_type, reverse) of a training checkpoint from its args. SRA, REPA, DiT and sra.py: t = 0
    is data, path linear or cosine. The SiT repository (t = 0 noise) writes Linear, GVP or VP."""
    path_type = args.get("path_type") or "linear"
    if path_type in ("linear", "cosine", "cos"):
        return {"cos": "cosine"}.get(path_type, path_type), False
    if path_type not in ("Linear", "GVP", "VP"):
        raise sra.UserError(f"{path} has the unknown path type {path_type!r} (linear or cosine)")
    prediction = args.get("prediction", "velocity")
    if path_type == "VP" or prediction != "velocity":
        raise sra.UserError(f"{path} is a SiT-repository {path_type} {prediction} model: "
                            f"unsupported (only velocity models on the Linear or GVP path)")
    # SiT's Linear x_t = t x + (1 - t) eps and GVP x_t = sin(pi t / 2) x + cos(pi t / 2) eps,
    # read with t -> 1 - t, are SRA's linear and cosine paths (cos(pi t / 2) x + sin(pi t / 2) eps).
    return {"Linear": "linear", "GVP": "cosine"}[path_type], True


META_INIT_PARAMS = 20_000_000  # bigger models are built on the meta device (XL: ~15 s of CPU init)


def load_model(path, model_name=None, use_raw_model=False):
    """Build the network a checkpoint holds, on the CPU in eval mode -> (model, info).
    info: model (name), family (SiT/DiT), path_type, layout. Sizes, learn_sigma and the class
    count come from the tensor shapes; SiT-repository weights are wrapped in ReversedSiT."""
    path = os.path.abspath(path)
    ckpt = read_checkpoint(path)
    bare = isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values())
    if bare and model_name is None:
        raise sra.UserError(f"{path} is a bare state dict: name its architecture with --model")
    if bare:  # released weights; SiT's are the SiT repository's (Linear path, reversed time)
        path_type = "Linear" if model_name.startswith("SiT") else "linear"
        ckpt = dict(ema=ckpt, args=dict(model=model_name, path_type=path_type))
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("ema"), dict)):
        raise sra.UserError(f"{path} is not a DiT/SiT checkpoint (a state dict, or model/ema/args)")
    # Training checkpoints: sra.py stores args as a dict; SRA, REPA, DiT, SiT as a Namespace.
    # The architecture and the time convention come from args; the sizes from the tensors.
    args = ckpt.get("args") or {}
    layout = "bare state dict" if bare else "sra.py" if isinstance(args, dict) else "official"
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    name = args.get("model", model_name)
    if name is None or (model_name and name != model_name):
        what = name or "model of unknown architecture"
        raise sra.UserError(f"{path} holds a {what}; --model says {model_name}")
    if use_raw_model and not isinstance(ckpt.get("model"), dict):
        raise sra.UserError(f"{path} holds only EMA weights: drop --use-raw-model")
    state = ckpt["model" if use_raw_model else "ema"]
    path_type, reverse = time_convention(args, path)
    layout += " (SiT repository time, reversed)" if reverse else ""
    if name not in sra.MODELS:
        raise sra.UserError(f"unknown model {name!r}; valid: {', '.join(sra.MODELS)}")
    # SRA and REPA projectors serve only training
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()
             if not k.startswith(("ap_head.", "projectors."))}
    needed = {"x_embedder.proj.weight", "y_embedder.embedding_table.weight", "pos_embed",
              "final_layer.linear.weight"}
    if not needed <= state.keys():
        lacking = ", ".join(sorted(needed - state.keys()))
        raise sra.UserError(f"{path} is not a DiT/SiT checkpoint: no {lacking}")
    _, C, p, _ = state["x_embedder.proj.weight"].shape  # (D, C, p, p)
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    num_classes = int(args.get("num_classes") or rows - 1)  # released weights carry the null row
    big = sum(v.numel() for v in state.values()) > META_INIT_PARAMS
    size = math.isqrt(state["pos_embed"].shape[1]) * p  # pos_embed: (1, T, D), T = (size / p)^2
    learn_sigma = state["final_layer.linear.weight"].shape[0] == 2 * C * p * p  # (p p C_out, D)
    with torch.device("meta" if big else "cpu"):  # meta: skip the init the checkpoint overwrites
        net = sra.MODELS[name](input_size=size, in_channels=C, num_classes=num_classes,
                               class_dropout_prob=0.1 if rows > num_classes else 0.0,
                               learn_sigma=learn_sigma)
    check_keys(net.state_dict(), state, name, path)
    net.load_state_dict(state, assign=True)
    net.eval().requires_grad_(False)
    info = dict(model=name, family=name.split("-")[0], path_type=path_type, layout=layout)
    return (ReversedSiT(net) if reverse else net), info


# ==================================================================================================
# Output: a grid, or per-batch part files (resumable) and then one ADM-style .npz
# ==================================================================================================

def log(message):
    """Print on the first process only, so that a torchrun job says each thing once."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


def barrier():
    """Wait for every torchrun process (a single process has nobody to wait for)."""
    if dist.is_initialized():
        dist.barrier()


def check_writable(folder):
    """Fail now, not after an hour of sampling, if the output folder cannot be written."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()  # created, and gone again once closed
    except OSError as e:
        raise sra.UserError(f"cannot write to --sample-dir {folder}: {e.strerror or e}") from None


def sampler_settings(args, info, model):
    """The keyword arguments of generate() from the flags and the checkpoint; UserError when the
    two do not fit (a DiT needs DDPM, a SiT an ODE or SDE; the resolution is the checkpoint's)."""
    family = info["family"]
    mode = args.mode or ("ddpm" if family == "DiT" else "sde")
    if (family == "DiT") != (mode == "ddpm"):
        fits = "ddpm" if family == "DiT" else "sde or --mode ode"
        raise sra.UserError(f"{args.ckpt} is a {family} model: use --mode {fits}, not {mode}")
    path_type = {"cos": "cosine"}.get(args.path_type, args.path_type) or info["path_type"]
    if family == "SiT" and path_type != info["path_type"]:
        log(f"warning: --path-type {path_type}, but the checkpoint has {info['path_type']}")
    C = model.in_channels
    if C not in (3, 4):
        raise sra.UserError(f"the model has {C} channels: only RGB (3) or SD-VAE latents (4)")
    resolution = model.input_size * 8 if C == 4 else model.input_size  # the SD-VAE upsamples 8x
    if args.resolution and args.resolution != resolution:
        raise sra.UserError(f"the checkpoint makes {resolution}px images, not {args.resolution}px")
    return dict(mode=mode, num_steps=args.num_steps or (50 if args.grid else 250),
                path_type=path_type, cfg_scale=args.cfg_scale, guidance_low=args.guidance_low,
                guidance_high=args.guidance_high, heun=args.heun)


def run_name(args, info, settings):
    """File/folder name: readable settings plus a hash of everything that changes the samples."""
    stat = os.stat(args.ckpt)  # a checkpoint overwritten in place gets a new name: no stale parts
    # "streams-v2": parts from before the streams honoured --global-seed are never reused
    key = ["streams-v2", args.ckpt, stat.st_size, stat.st_mtime_ns, args.use_raw_model,
           info["model"], settings, args.vae, args.global_seed]
    tag = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:8]
    stem = os.path.splitext(os.path.basename(args.ckpt))[0]
    run = f"{settings['mode']}{settings['num_steps']}-cfg{args.cfg_scale}-seed{args.global_seed}"
    return f"{info['model'].replace('/', '-')}-{stem}-{run}-{tag}"


def make_images(model, vae, settings, global_seed, indices, labels=None):
    """uint8 images (n, H, W, 3) and labels (n,) of the samples with these global indices; labels
    given (the grid's columns) replace the streams' own draws, the noise stays the streams'."""
    shape = (model.in_channels, model.input_size, model.input_size)
    z, y, gens = sample_inputs(indices, global_seed, model.num_classes, shape)
    y = y if labels is None else labels
    device = next(model.parameters()).device
    x = generate(model, z.to(device), y.to(device), generator=gens, **settings)
    return to_images(x, vae), y.numpy()


def write_npz(path, parts, shape):
    """Gather the parts {(start, end): file} into the ADM evaluator's format (arr_0 uint8 images
    (N, H, W, 3), arr_1 int64 labels (N,)) -> images. The file is read back and compared: only
    a complete, readable .npz may replace the parts."""
    images = np.empty(shape, dtype=np.uint8)  # filled in place: one copy of 50,000 images in RAM
    labels = np.empty(shape[:1], dtype=np.int64)
    for (start, end), part in parts.items():
        with np.load(part) as data:
            images[start:end] = data["images"]
            labels[start:end] = data["labels"]
    sra.atomic_write(path, partial(np.savez, arr_0=images, arr_1=labels), ".npz")
    with np.load(path) as data:
        same = np.array_equal(data["arr_0"], images) and np.array_equal(data["arr_1"], labels)
    if not same:
        raise sra.UserError(f"{path} does not read back as written; the part files are kept")
    return images


def write_samples(model, vae, settings, args, name, npz_path, rank, world_size):
    """Sample --num-fid-samples images batch by batch into part files over all processes, then
    (first process) one .npz, a preview PNG of its first 64 images, and remove the parts."""
    N = args.num_fid_samples
    B = args.per_proc_batch_size
    run_dir = os.path.join(args.sample_dir, name)
    parts_dir = os.path.join(run_dir, f"parts-b{B}")  # part k holds the indices [kB, (k+1)B)
    os.makedirs(parts_dir, exist_ok=True)
    parts = {(s, min(s + B, N)): os.path.join(parts_dir, f"{s:07d}-{min(s + B, N):07d}.npz")
             for s in range(0, N, B)}
    todo = [batch for batch, path in parts.items() if not os.path.exists(path)]  # resume
    barrier()  # every process has listed the parts before any process writes new ones
    done = N - sum(end - start for start, end in todo)
    log(f"{done} of {N} samples already done; {len(todo)} batch(es) to go over {world_size} "
        f"process(es)")
    # Round-robin over the processes: a batch's content depends only on its indices, never on
    # which process makes it, so any process count (and a resumed run) gives the same .npz.
    mine = todo[rank::world_size]
    # (closed on an error too, so that the error line comes after the bar, not inside it)
    with tqdm(total=sum(end - start for start, end in mine), unit="img", disable=rank != 0) as bar:
        for start, end in mine:
            images, labels = make_images(model, vae, settings, args.global_seed, range(start, end))
            if args.save_png:  # before the part file: a finished part implies its PNGs exist
                save_pngs(images, start, os.path.join(run_dir, "png"))
            # atomically: a crash leaves the whole part or none of it (a full disk: one line)
            sra.atomic_write(parts[start, end], partial(np.savez, images=images, labels=labels),
                             "part file")
            bar.update(end - start)  # images, so that the bar's rate is this process's img/s
    barrier()  # all parts are on disk
    if rank != 0:
        return
    size = model.input_size * 8 if vae is not None else model.input_size
    images = write_npz(npz_path, parts, (N, size, size, 3))  # (N, H, W, 3) uint8
    preview = npz_path[:-len(".npz")] + ".png"
    save_image_grid(images[:64], preview, nrow=8)
    if not args.keep_parts:  # at 50,000 x 256^2 the parts would double the disk used
        shutil.rmtree(parts_dir)
        if not os.listdir(run_dir):  # the folder stays if it holds PNGs or other batch sizes
            os.rmdir(run_dir)
    log(f"wrote {npz_path} (arr_0: {N} uint8 images {size}x{size}x3, arr_1: labels) and the "
        f"preview {preview}")
    if args.save_png:  # the folder that FID tools (torch-fidelity, clean-fid) read
        log(f"wrote {N} PNGs to {os.path.join(run_dir, 'png')}")


def write_grid(model, vae, settings, args, name):
    """One PNG of new samples: 8 rows, a column for each of the first 10 classes. The noise comes
    from the per-sample streams of --global-seed (another seed, another grid), the labels from
    the columns."""
    k = min(model.num_classes, 10)
    labels = torch.arange(k).repeat(8)  # (8k,) sample i sits in column i % k
    images, _ = make_images(model, vae, settings, args.global_seed, range(8 * k), labels)
    path = os.path.join(args.sample_dir, f"{name}-grid.png")
    save_image_grid(images, path, nrow=k)
    log(f"wrote {path}")


def main(args):
    """Sample a grid (--grid), or --num-fid-samples images into an .npz over torchrun processes."""
    ddp, rank, world_size, device = sra.setup_distributed()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    check_writable(args.sample_dir)  # before the slow load
    model, info = load_model(args.ckpt, args.model, args.use_raw_model)
    model = model.to(device)
    settings = sampler_settings(args, info, model)
    name = run_name(args, info, settings)
    log(f"{info['model']} ({info['layout']}, {model.num_classes} classes) from {args.ckpt}: "
        + ", ".join(f"{k} {v}" for k, v in settings.items()))
    npz_path = os.path.join(args.sample_dir, f"{name}-n{args.num_fid_samples}.npz")
    if os.path.exists(npz_path) and not args.grid:  # a finished run: written whole, checked
        log(f"{npz_path} already exists: nothing to do (delete it to sample again)")
    else:  # a latent model's samples are decoded by the SD-VAE; a pixel model needs none
        vae = sra.load_vae(args.vae, device) if model.in_channels == 4 else None
        if args.grid and rank == 0:
            write_grid(model, vae, settings, args, name)
        elif not args.grid:
            write_samples(model, vae, settings, args, name, npz_path, rank, world_size)
    if ddp:
        dist.destroy_process_group()


# ==================================================================================================
# Command line (the flags of the official generate.py / gen.sh work unchanged)
# ==================================================================================================

def parse_args(argv=None):
    """Parse and check the flags; paths become absolute, so every message names the full path."""
    p = argparse.ArgumentParser(description="Sample from DiT/SiT/SRA checkpoints.",
                                formatter_class=sra.HelpFormatter)
    add = p.add_argument_group("checkpoint").add_argument
    add("--ckpt", required=True, help="sra.py, SRA, REPA, DiT or SiT checkpoint, or a state dict")
    add("--model", help="e.g. SiT-XL/2 (default: the checkpoint's; needed for bare state dicts)")
    add("--use-raw-model", action="store_true", help="the online `model` weights, not the EMA")
    add = p.add_argument_group("sampler").add_argument
    add("--mode", choices=["sde", "ode", "ddpm"], help="default: sde for SiT, ddpm for DiT")
    add("--num-steps", type=int, help="sampling steps (default: 250; 50 with --grid)")
    add("--heun", action="store_true", help="ODE: Heun instead of Euler")
    add("--path-type", choices=["linear", "cosine", "cos"], help="default: the checkpoint's")
    add("--cfg-scale", type=float, help="classifier-free guidance scale w (default: 1 = off; 4 "
        "with --grid)")
    add("--guidance-low", type=float, default=0.0, help="guide only steps starting at t >= this")
    add("--guidance-high", type=float, default=1.0, help="guide only steps starting at t <= this")
    add = p.add_argument_group("output").add_argument
    add("--sample-dir", default="samples", help="where the .npz, grids and parts go")
    add("--num-fid-samples", type=int, default=50_000, help="images in the .npz")
    add("--per-proc-batch-size", type=int, default=32, help="images per forward pass per process")
    add("--global-seed", type=int, default=0, help="seeds every sample's stream with its index")
    add("--grid", action="store_true", help="only write one PNG: 8 samples for each of 10 classes")
    add("--save-png", action="store_true", help="also keep every image as a PNG")
    add("--keep-parts", action="store_true", help="keep the per-batch part files after the .npz")
    add("--vae", default="ema", help="SD-VAE decoder of latent models: ema, mse or a folder")
    add("--resolution", type=int, help="checked against the checkpoint's")
    add("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on GPUs")
    args = p.parse_args(argv)
    for flag in ("num_fid_samples", "per_proc_batch_size", "num_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise sra.UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0 <= args.guidance_low <= args.guidance_high:
        raise sra.UserError("need 0 <= --guidance-low <= --guidance-high")
    # a grid is a picture: guided as the paper's figures are (w = 4), which also makes a short CPU
    # run's samples clear shapes; the .npz keeps w = 1, the FID setting, unless --cfg-scale says
    args.cfg_scale = (4.0 if args.grid else 1.0) if args.cfg_scale is None else args.cfg_scale
    args.ckpt, args.sample_dir = os.path.abspath(args.ckpt), os.path.abspath(args.sample_dir)
    return args


def cli(argv=None):
    """Command-line entry: 0 on success; 2 and one `error:` line on stderr for bad input."""
    try:
        main(parse_args(argv))
    except sra.UserError as e:
        print(f"error: {sra.error_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
