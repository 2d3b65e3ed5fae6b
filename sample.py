"""Sampling from DiT/SiT/SRA checkpoints: ODE, SDE and DDPM samplers with CFG, and FID-ready .npz files.

Run recipes
    # a quick look: one PNG grid, 4 images for each of the first 10 classes (50 steps), no .npz
    python sample.py --ckpt exps/SiT-T-4-sra/checkpoints/0002000.pt --grid
    # the paper's FID-50K run (SiT-XL/2 + SRA: SDE, 250 steps, CFG 1.8 on t in [0, 0.7]), 8 GPUs
    torchrun --nproc_per_node=8 sample.py --model SiT-XL/2 --ckpt CKPT --num-fid-samples 50000 \
        --path-type linear --per-proc-batch-size 64 --mode sde --num-steps 250 --cfg-scale 1.8 \
        --guidance-high 0.7 --resolution 256 --vae ema --global-seed 0 --sample-dir samples
    # released weights are bare state dicts: --model names the architecture (and the family's convention)
    python sample.py --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --cfg-scale 1.5 --grid
The .npz is <sample-dir>/<name>.npz: arr_0 = uint8 images (N, H, W, 3) as the ADM evaluator reads them,
arr_1 = int64 class labels (N,). Run the same command again to resume an interrupted run.

Notable choices
    * SRA time: t = 1 noise -> t = 0 data. Weights from the SiT repo (t = 0 noise) are wrapped as
      v(x, t) = -f(x, 1 - t)[:, :C], so one set of ODE/SDE samplers serves every SiT.
    * CFG guides all C channels (not DiT's 3 of 4); a learned-variance DiT keeps its conditional variance
      channels. The null label is the checkpoint's num_classes, never a hard-coded 1000.
    * Every sample owns a random stream seeded from (--global-seed, its index): label, then noise, then the
      SDE/DDPM step noise. Batches are cut at fixed index multiples, so the number of processes never
      changes a sample; finished batches are kept in <name>/parts-b<B>/ and never redone.
"""
import argparse
import hashlib
import json
import math
import os
import re
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import sra


# ----------------------------------------------------------------------------------------------------
# Random streams: one generator per sample, so results do not depend on how samples are batched

def randn_like(x, generator=None):
    """Standard normal noise shaped like x from one generator, a list of one generator per sample, or None."""
    if isinstance(generator, (list, tuple)):
        noise = torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device) for g in generator])
    else:
        noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
    return noise.to(x.device, x.dtype)

def sample_inputs(indices, global_seed, num_classes, shape):
    """Per-sample streams seeded (global_seed, index) -> z (N, C, H, W), uniform labels y (N,), generators.
    Each stream draws its label, then its noise z, then (in the sampler) that sample's SDE/DDPM step noise."""
    gens = [torch.Generator().manual_seed((global_seed & 0xFFFFFFFF) << 32 | i) for i in indices]
    y = torch.stack([torch.randint(num_classes, (), generator=g) for g in gens])  # (N,)
    z = torch.stack([torch.randn(shape, generator=g) for g in gens])  # (N, C, H, W)
    return z, y, gens


# ----------------------------------------------------------------------------------------------------
# Samplers. Each takes a function of (x, t): the tests pass exact closed-form fields.

def sample_ode(velocity, x, num_steps, heun=False):
    """Integrate dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data) on linspace(1, 0, N+1), state in float64:
    Euler, or Heun (2nd order) whose correction is skipped on the last step (it would evaluate v at t = 0)."""
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    x = x.to(torch.float64)  # (N, C, H, W)
    for i in range(num_steps):
        dt = t[i + 1] - t[i]  # negative: we run backwards in time
        d_cur = velocity(x, t[i])
        x_euler = x + dt * d_cur
        x = x + dt * 0.5 * (d_cur + velocity(x_euler, t[i + 1])) if heun and i < num_steps - 1 else x_euler
    return x

def sample_sde(velocity, x, num_steps, path_type="linear", generator=None):
    """Euler-Maruyama for dx = [v - w/2 * score] dt + sqrt(w) dW, w(t) = 2t, on linspace(1, 0.04, N) then 0.
    The first N-1 steps add noise; the last step, to t = 0, is the deterministic mean."""
    t = torch.cat([torch.linspace(1, 0.04, num_steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x = x.to(torch.float64)  # (N, C, H, W)
    for i in range(num_steps):
        t_cur, dt = t[i], t[i + 1] - t[i]
        v = velocity(x, t_cur.item())
        # Score from velocity: x = a x0 + s eps and v = a' x0 + s' eps give eps-hat, and score = -eps-hat / s.
        alpha, sigma, d_alpha, d_sigma = sra.interpolant(t_cur, path_type)
        ratio = alpha / d_alpha
        score = (ratio * v - x) / (sigma ** 2 - ratio * d_sigma * sigma)
        w = 2 * t_cur  # diffusion coefficient w(t)
        x = x + (v - 0.5 * w * score) * dt
        if i < num_steps - 1:
            x = x + w.sqrt() * dt.abs().sqrt() * randn_like(x, generator)
    return x

def respace(diffusion, num_steps):
    """Keep `num_steps` evenly spaced steps (DiT's space_timesteps, one section): betas recomputed from the
    kept alpha-bars; the model is still fed the original step index `timestep_map[i]`."""
    T = diffusion.num_timesteps
    if not 1 <= num_steps <= T:
        raise sra.UserError(f"--num-steps must be between 1 and {T} for DDPM, got {num_steps}")
    keep = sorted({round(i * (T - 1) / max(1, num_steps - 1)) for i in range(num_steps)})
    ac = diffusion.alphas_cumprod[keep]
    return sra.GaussianDiffusion(1 - ac / torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]]),
                                 timestep_map=diffusion.timestep_map[keep])

def sample_ddpm(eps_model, x, num_steps, generator=None):
    """Ancestral DDPM sampling on `num_steps` evenly spaced steps of the 1000-step schedule.
    eps_model(x, step) gets the original step index (0..999) and returns eps (N, C, H, W), or eps and the
    learned-range value (N, 2C, H, W); no noise is added on the last step. 1000 steps = no respacing."""
    diffusion = respace(sra.GaussianDiffusion.linear(), num_steps)
    x = x.to(torch.float64)  # (N, C, H, W)
    for i in reversed(range(diffusion.num_timesteps)):
        out = eps_model(x, int(diffusion.timestep_map[i]))
        mean, log_var, _ = diffusion.p_mean_variance(out, x, torch.full((len(x),), i, device=x.device))
        x = mean + torch.exp(0.5 * log_var) * randn_like(x, generator) if i > 0 else mean
    return x


# ----------------------------------------------------------------------------------------------------
# Networks as sampler functions: classifier-free guidance, the SiT-repo time convention, generate()

def model_fn(model, y, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0, ddpm=False):
    """The function a sampler calls: f(x, t) -> velocity (N, C, H, W), or with ddpm=True eps [+ variance].
    CFG v = v_u + w (v_c - v_u) on all C channels while guidance_low <= t <= guidance_high (DDPM: t = step /
    1000); DiT's variance channels stay conditional. cfg_scale 1 runs no unconditional pass at all."""
    C, dtype = model.in_channels, next(model.parameters()).dtype
    net = getattr(model, "net", model)  # the DiT inside a ReversedSiT
    if cfg_scale != 1 and net.y_embedder.embedding_table.num_embeddings <= model.num_classes:  # no null row
        raise sra.UserError("the model was trained without label dropout (no null label): use --cfg-scale 1")
    y_null = torch.full_like(y, model.num_classes)  # the null label of CFG

    def f(x, t):
        t_in = torch.full((len(x),), float(t), device=x.device)  # SiT: t in [0, 1]; DiT: the step index
        x_in = x.to(dtype)  # the state is float64, the network runs in its own dtype
        if cfg_scale == 1 or not guidance_low <= (t / 1000 if ddpm else t) <= guidance_high:
            out = model(x_in, t_in, y)  # (N, C_out, H, W)
        else:  # one pass over [conditional; unconditional]
            cond, uncond = model(torch.cat([x_in, x_in]), torch.cat([t_in, t_in]), torch.cat([y, y_null])).chunk(2)
            out = torch.cat([uncond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C]), cond[:, C:]], dim=1)
        out = out.to(torch.float64)
        return out if ddpm else out[:, :C]

    return f

class ReversedSiT(nn.Module):
    """A SiT-repo network (t = 0 noise, t = 1 data, learned sigma) in SRA time: v = -f(x, 1 - t)[:, :C]."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.in_channels = self.out_channels = net.in_channels
        self.num_classes, self.input_size, self.learn_sigma = net.num_classes, net.input_size, False

    def forward(self, x, t, y):
        return -self.net(x, 1 - t, y)[:, :self.in_channels]  # (N, C, H, W); its velocity x - eps, reversed

@torch.no_grad()
def generate(model, z, y, *, mode, num_steps, path_type="linear", cfg_scale=1.0, guidance_low=0.0,
             guidance_high=1.0, heun=False, generator=None):
    """Samples (N, C, H, W) float32 in model space from noise z and labels y (N,).
    mode: "ode" (Euler, or Heun with heun=True), "sde" (Euler-Maruyama) for SiT velocity models; "ddpm" for
    DiT eps models. generator: one torch.Generator, a list of one per sample, or None (global RNG)."""
    f = model_fn(model, y, cfg_scale, guidance_low, guidance_high, ddpm=mode == "ddpm")
    samplers = dict(ode=lambda: sample_ode(f, z, num_steps, heun), ddpm=lambda: sample_ddpm(f, z, num_steps, generator),
                    sde=lambda: sample_sde(f, z, num_steps, path_type, generator))
    if mode not in samplers:
        raise sra.UserError(f"unknown sampling mode {mode!r}: use sde, ode or ddpm")
    return samplers[mode]().float()


# ----------------------------------------------------------------------------------------------------
# Images: SD-VAE decoding, uint8 conversion, PNG grids (also the trainer's sample grids)

def load_vae(name, device):
    """The SD-VAE (`ema` or `mse`) from diffusers, imported only when latents must be decoded."""
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise sra.UserError("decoding latents needs the SD-VAE: pip install diffusers") from None
    return AutoencoderKL.from_pretrained(f"stabilityai/sd-vae-ft-{name}").to(device).eval()

@torch.no_grad()
def to_images(x, vae=None):
    """Model space -> uint8 images (N, H, W, 3): latents are decoded by the VAE, pixels are in [-1, 1]."""
    x = vae.decode(x.float() / 0.18215).sample if vae is not None else x
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

def save_image_grid(images, path, nrow):
    """Save uint8 images (N, H, W, 3) as one PNG grid with `nrow` images per row."""
    from PIL import Image
    N, H, W, _ = images.shape
    grid = np.zeros((math.ceil(N / nrow) * H, nrow * W, 3), dtype=np.uint8)
    for i, image in enumerate(images):
        grid[i // nrow * H:(i // nrow + 1) * H, i % nrow * W:(i % nrow + 1) * W] = image
    Image.fromarray(grid).save(path)

def save_grid(model, path, device, vae=None, **settings):
    """One PNG from fixed noise (seed 0): 4 rows, a column for each of the first 10 classes."""
    k = min(model.num_classes, 10)
    z = torch.randn((4 * k, model.in_channels, model.input_size, model.input_size),
                    generator=torch.Generator().manual_seed(0)).to(device)
    x = generate(model, z, torch.arange(k, device=device).repeat(4), generator=torch.Generator(device).manual_seed(0),
                 **settings)
    save_image_grid(to_images(x, vae), path, nrow=k)

def training_grid(ema, args, step, device, run_dir, log):
    """The trainer's sample grid at `step`: the EMA, 50 SDE (DiT: DDPM) steps, no guidance."""
    try:
        vae = load_vae("ema", device) if args.dataset == "latents" else None
    except Exception as e:  # no diffusers or no internet: training goes on without grids
        return log(f"skipping the sample grid at step {step}: cannot decode latents ({sra.error_line(e)})")
    save_grid(ema, os.path.join(run_dir, "samples", f"{step:07d}.png"), device, vae, num_steps=50,
              mode="ddpm" if args.family == "DiT" else "sde", path_type=args.path_type)
    log(f"saved sample grid samples/{step:07d}.png")


# ----------------------------------------------------------------------------------------------------
# Checkpoints: ours, official SRA/REPA/DiT/SiT training checkpoints, released bare state dicts

def read_checkpoint(path):
    """torch.load with weights_only=True (argparse.Namespace allowed); UserError for anything else."""
    if not os.path.isfile(path):
        raise sra.UserError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # official checkpoints keep args so
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found:  # the pickle names a function or class: loading it could run code
            raise sra.UserError(f"refusing to load {path}: it would import {found.group(1)}, and only tensors "
                                f"and plain containers are loaded (weights_only=True)") from None
        reason = f"{type(e).__name__}: {str(e)[:100]}"
        raise sra.UserError(f"{path} is not a PyTorch checkpoint ({reason})") from None

def check_keys(expected, state, name, path):
    """UserError naming (a few of) the missing, unexpected and mis-shaped keys of a state dict."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        few = lambda keys: ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")  # noqa
        problems = [f"{what} {few(keys)}" for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                              ("checkpoint vs model shape", wrong)) if keys]
        raise sra.UserError(f"{path} does not fit {name}: " + "; ".join(problems))

META_INIT_PARAMS = 20_000_000  # bigger models are built on the meta device (an XL's CPU init takes ~15 s)

def load_model(path, model_name=None, use_raw_model=False):
    """Build the network a checkpoint holds, on the CPU in eval mode -> (model, info).
    info: model (name), family (SiT/DiT), path_type, layout. Sizes, learn_sigma and the class count come from
    the tensor shapes; a bare SiT state dict is taken to be the SiT repo's and wrapped in ReversedSiT."""
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and isinstance(ckpt.get("ema"), dict):
        # Training checkpoints: sra.py stores args as a dict, SRA/REPA/DiT/SiT as an argparse.Namespace.
        layout = "sra.py" if isinstance(ckpt.get("args"), dict) else "official training checkpoint"
        args = ckpt.get("args") or {}
        args = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
        name = args.get("model", model_name)
        if name is None or (model_name and name != model_name):
            what = name or "model of unknown architecture"
            raise sra.UserError(f"{path} holds a {what}; --model says {model_name}")
        if use_raw_model and not isinstance(ckpt.get("model"), dict):
            raise sra.UserError(f"{path} holds only EMA weights: drop --use-raw-model")
        state = ckpt["model" if use_raw_model else "ema"]
        path_type, reverse = {"cos": "cosine"}.get(args.get("path_type"), args.get("path_type", "linear")), False
    elif isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        if model_name is None:
            raise sra.UserError(f"{path} is a bare state dict: say its architecture with --model (e.g. DiT-XL/2)")
        layout, state, name, args = "bare state dict", ckpt, model_name, {}
        path_type, reverse = "linear", model_name.startswith("SiT")  # released SiT weights: the SiT repo's time
    else:
        raise sra.UserError(f"{path} is not a DiT/SiT checkpoint (expected a state dict, or model/ema/args)")
    if name not in sra.MODELS:
        raise sra.UserError(f"unknown model {name!r}; valid: {', '.join(sra.MODELS)}")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()
             if not k.startswith(("ap_head.", "projectors."))}  # SRA / REPA projectors only serve training
    needed = {"x_embedder.proj.weight", "y_embedder.embedding_table.weight", "pos_embed",
              "final_layer.linear.weight"}
    if not needed <= state.keys():
        raise sra.UserError(f"{path} is not a DiT/SiT checkpoint: no {', '.join(sorted(needed - state.keys()))}")
    _, C, p, _ = state["x_embedder.proj.weight"].shape  # (D, C, p, p)
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    num_classes = int(args.get("num_classes") or rows - 1)  # released weights all carry the null row
    big = sum(v.numel() for v in state.values()) > META_INIT_PARAMS
    with torch.device("meta" if big else "cpu"):  # meta: skip the random init that the checkpoint overwrites
        net = sra.MODELS[name](input_size=math.isqrt(state["pos_embed"].shape[1]) * p, in_channels=C,
                               num_classes=num_classes, class_dropout_prob=0.1 if rows > num_classes else 0.0,
                               learn_sigma=state["final_layer.linear.weight"].shape[0] == 2 * C * p * p)
    check_keys(net.state_dict(), state, name, path)
    net.load_state_dict(state, assign=True)
    net.eval().requires_grad_(False)
    info = dict(model=name, family=name.split("-")[0], path_type=path_type, layout=layout)
    return (ReversedSiT(net) if reverse else net), info


# ----------------------------------------------------------------------------------------------------
# Output: per-batch part files (resumable), then one ADM-style .npz

def save_part(path, images, labels):
    """Write one finished batch atomically: a crash leaves the whole file or none of it."""
    with open(path + ".tmp", "wb") as f:
        np.savez(f, images=images, labels=labels)
    os.replace(path + ".tmp", path)

def write_npz(path, parts):
    """Concatenate the parts into the ADM evaluator's format (arr_0 uint8 images, arr_1 labels); -> images."""
    loaded = [np.load(part) for part in parts]
    images, labels = np.concatenate([p["images"] for p in loaded]), np.concatenate([p["labels"] for p in loaded])
    with open(path + ".tmp", "wb") as f:
        np.savez(f, images, labels.astype(np.int64))  # positional: arr_0, arr_1
    os.replace(path + ".tmp", path)
    return images

def run_name(args, info, mode, num_steps, path_type):
    """Folder/file name: readable settings plus a hash of everything that changes the samples."""
    ckpt = os.path.abspath(args.ckpt)
    stat = os.stat(ckpt)  # a checkpoint overwritten in place gets a new name, so stale parts are never reused
    key = [ckpt, stat.st_size, stat.st_mtime_ns, args.use_raw_model, info["model"], mode, num_steps, path_type,
           args.cfg_scale, args.guidance_low, args.guidance_high, args.heun, args.vae, args.global_seed]
    tag = hashlib.sha1(json.dumps(key).encode()).hexdigest()[:8]
    stem = os.path.splitext(os.path.basename(ckpt))[0]
    model = info["model"].replace("/", "-")
    return f"{model}-{stem}-{mode}{num_steps}-cfg{args.cfg_scale}-seed{args.global_seed}-{tag}"

def main(args):
    """Sample a grid (--grid) or --num-fid-samples images into an .npz, split over torchrun processes."""
    ddp, rank, world_size, device = sra.setup_distributed()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    log = print if rank == 0 else (lambda *a, **k: None)
    try:  # fail now, not after an hour of sampling
        os.makedirs(args.sample_dir, exist_ok=True)
        open(os.path.join(args.sample_dir, f".write-test-{rank}"), "w").close()
        os.remove(os.path.join(args.sample_dir, f".write-test-{rank}"))
    except OSError as e:
        raise sra.UserError(f"cannot write to --sample-dir {args.sample_dir}: {e.strerror or e}") from None
    model, info = load_model(args.ckpt, args.model, args.use_raw_model)
    model = model.to(device)
    family, C, size = info["family"], model.in_channels, model.input_size
    mode = args.mode or ("ddpm" if family == "DiT" else "sde")
    if (family == "DiT") != (mode == "ddpm"):
        raise sra.UserError(f"{args.ckpt} is a {family} model: use --mode " + ("ddpm" if family == "DiT" else
                            "sde or --mode ode") + f", not {mode}")
    path_type = {"cos": "cosine"}.get(args.path_type, args.path_type) or info["path_type"]
    if path_type != info["path_type"] and family == "SiT":
        log(f"warning: --path-type {path_type}, but the checkpoint was trained with {info['path_type']}")
    num_steps = args.num_steps or (50 if args.grid else 250)
    if C not in (3, 4):
        raise sra.UserError(f"the model has {C} channels: only RGB pixels (3) or SD-VAE latents (4) decode")
    resolution = size * 8 if C == 4 else size
    if args.resolution and args.resolution != resolution:
        raise sra.UserError(f"the checkpoint makes {resolution}px images, but --resolution is {args.resolution}")
    vae = load_vae(args.vae, device) if C == 4 else None  # latents are decoded by the SD-VAE
    settings = dict(mode=mode, num_steps=num_steps, path_type=path_type, cfg_scale=args.cfg_scale,
                    guidance_low=args.guidance_low, guidance_high=args.guidance_high, heun=args.heun)
    name = run_name(args, info, mode, num_steps, path_type)
    log(f"{info['model']} ({info['layout']}, {model.num_classes} classes, {resolution}px) from {args.ckpt}: "
        + ", ".join(f"{k} {v}" for k, v in settings.items()))

    def make_images(start, end):
        """uint8 images (n, H, W, 3) and labels (n,) of the samples with global indices start..end-1."""
        z, y, gens = sample_inputs(range(start, end), args.global_seed, model.num_classes, (C, size, size))
        return to_images(generate(model, z.to(device), y.to(device), generator=gens, **settings), vae), y.numpy()

    if args.grid and rank == 0:  # one PNG, a column per class; no .npz
        save_grid(model, os.path.join(args.sample_dir, f"{name}-grid.png"), device, vae, **settings)
        log(f"wrote {os.path.join(args.sample_dir, f'{name}-grid.png')}")
    elif not args.grid:
        N, B = args.num_fid_samples, args.per_proc_batch_size
        parts_dir = os.path.join(args.sample_dir, name, f"parts-b{B}")  # batches: [kB, (k+1)B) of the indices
        os.makedirs(parts_dir, exist_ok=True)
        parts = {(s, min(s + B, N)): os.path.join(parts_dir, f"{s:07d}-{min(s + B, N):07d}.npz") for s in range(0, N, B)}
        todo = [batch for batch, path in parts.items() if not os.path.exists(path)]  # finished ones are kept
        if ddp:
            dist.barrier()  # every rank has listed the parts before any rank writes new ones
        log(f"{N - sum(e - s for s, e in todo)} of {N} samples already done; {len(todo)} batch(es) to go "
            f"over {world_size} process(es)")
        for count, (start, end) in enumerate(tqdm(todo[rank::world_size], disable=rank != 0, desc="batches"), 1):
            images, labels = make_images(start, end)
            if args.save_png:  # before the part file: a finished part implies its PNGs exist
                from PIL import Image
                os.makedirs(os.path.join(args.sample_dir, name, "png"), exist_ok=True)
                for i, image in zip(range(start, end), images):
                    Image.fromarray(image).save(os.path.join(args.sample_dir, name, "png", f"{i:06d}.png"))
            save_part(parts[start, end], images, labels)
            if count == args.fault_stop_after:  # test hook: simulate an interruption
                raise SystemExit(3)
        if ddp:
            dist.barrier()  # all parts are on disk
        if rank == 0:
            path = os.path.join(args.sample_dir, f"{name}.npz")
            images = write_npz(path, list(parts.values()))
            save_image_grid(images[:64], os.path.join(args.sample_dir, f"{name}.png"), nrow=8)
            log(f"wrote {path} (arr_0: {N} uint8 images {resolution}x{resolution}x3, arr_1: labels) and a preview "
                f"{name}.png")
    if ddp:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Command line (the flags of the official generate.py / gen.sh work unchanged)

def parse_args(argv=None):
    """Parse and check the flags."""
    p = argparse.ArgumentParser(description="Sample from DiT/SiT/SRA checkpoints.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    # checkpoint
    add("--ckpt", required=True, help="sra.py, SRA, REPA, DiT or SiT checkpoint, or a bare state dict")
    add("--model", default=None, help="architecture, e.g. SiT-XL/2 (default: from the checkpoint; required for "
        "bare state dicts, where SiT-... means the SiT repo's reverse time convention)")
    add("--use-raw-model", action="store_true", help="the online `model` weights instead of the EMA")
    # sampler
    add("--mode", default=None, choices=["sde", "ode", "ddpm"], help="default: sde (SiT), ddpm (DiT)")
    add("--num-steps", type=int, default=None, help="sampling steps (default 250; 50 with --grid)")
    add("--heun", action="store_true", help="ODE: Heun instead of Euler")
    add("--path-type", choices=["linear", "cosine", "cos"], help="SiT interpolant (default: the checkpoint's)")
    add("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale w (1 = off)")
    add("--guidance-low", type=float, default=0.0, help="guide only while t >= this")
    add("--guidance-high", type=float, default=1.0, help="guide only while t <= this (paper: 0.7)")
    # output
    add("--sample-dir", default="samples", help="where the .npz, grids and parts go")
    add("--num-fid-samples", type=int, default=50_000, help="images in the .npz")
    add("--per-proc-batch-size", type=int, default=32, help="images per forward pass per process")
    add("--global-seed", type=int, default=0, help="seeds every sample's stream with its index")
    add("--grid", action="store_true", help="only write one PNG grid, 4 images per class")
    add("--save-png", action="store_true", help="also keep every image as a PNG")
    add("--vae", default="ema", choices=["ema", "mse"], help="SD-VAE decoder for latent models")
    add("--resolution", type=int, default=None, help="checked against the checkpoint's resolution")
    add("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on GPUs")
    add("--fault-stop-after", type=int, default=0, help=argparse.SUPPRESS)  # test hook
    args = p.parse_args(argv)
    for flag in ("num_fid_samples", "per_proc_batch_size", "num_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise sra.UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0 <= args.guidance_low <= args.guidance_high:
        raise sra.UserError("need 0 <= --guidance-low <= --guidance-high")
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
