"""Sampling from DiT/SiT/SRA checkpoints: ODE, SDE and DDPM samplers with CFG, and FID-ready .npz.

    python sample.py --ckpt exps/demo/checkpoints/0001500.pt --grid  # 8 samples x 10 classes
    # the paper's FID-50K run (SiT-XL/2 + SRA: SDE, 250 steps, CFG 1.8 on t in [0, 0.7]), 8 GPUs
    torchrun --nproc_per_node=8 sample.py --model SiT-XL/2 --ckpt CKPT --num-fid-samples 50000 \
        --path-type linear --per-proc-batch-size 64 --mode sde --num-steps 250 --cfg-scale 1.8 \
        --guidance-high 0.7 --resolution 256 --vae ema --global-seed 0 --sample-dir samples
    python sample.py --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --grid  # a bare state dict

The .npz (arr_0: uint8 images (N, H, W, 3) for the ADM evaluator, arr_1: int64 labels) resumes:
the same command again makes only the missing batches. Notable choices:
    * SRA time: t = 1 noise -> t = 0 data; SiT-repository weights (t = 0 noise) are sampled as
      v(x, t) = -f(x, 1 - t)[:, :C], so one set of ODE/SDE samplers serves every SiT.
    * CFG guides all C channels (not DiT's 3 of 4), null label = num_classes (not a fixed 1000),
      on or off for a whole sampler step, decided at the step's start time (REPA).
    * Sample i draws its label, noise and SDE/DDPM noise from its own stream, seeded from
      (--global-seed, i): the number of processes never changes a sample.
"""
import argparse
import hashlib
import itertools
import math
import os
import pickle
import shutil
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import sra


# ==================================================================================================
# Random streams: one generator per sample, so results do not depend on how samples are batched
# ==================================================================================================

def stream_seed(global_seed, index):
    """The seed of sample `index`: a 32-bit bijection of the index, keyed by the global seed."""
    # A CPU generator keeps the low 32 bits of a seed, so (seed << 32 | index) fails. a * index + b
    # mod 2**32, a odd (invertible) and b hashed from the seed: distinct, and scrambled by seed.
    key = int.from_bytes(hashlib.sha256(str(global_seed).encode()).digest()[:8], "little")
    return ((key >> 32 | 1) * index + key) & 0xFFFFFFFF


def randn_like(x, generator=None):
    """Normal noise shaped like x: from one generator, a CPU generator per sample, or None."""
    if not isinstance(generator, (list, tuple)):  # a single stream (None: the global one)
        device = x.device if generator is None else generator.device
        return torch.randn(x.shape, generator=generator, device=device).to(x.device, x.dtype)
    noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator])  # (N, C, H, W)
    # pinned, the copy is queued without waiting for the GPU: no sync per step
    noise = noise.pin_memory() if x.is_cuda else noise
    return noise.to(x.device, x.dtype, non_blocking=True)


def sample_inputs(indices, global_seed, num_classes, shape):
    """Global indices -> noise z (N, *shape), labels y (N,), and their streams (for the sampler)."""
    # CPU generators: the same numbers on every machine and GPU type, cheap to make one per sample
    gens = [torch.Generator().manual_seed(stream_seed(global_seed, i)) for i in indices]
    y = torch.stack([torch.randint(num_classes, (), generator=g) for g in gens])  # (N,) uniform
    z = torch.stack([torch.randn(shape, generator=g) for g in gens])  # (N, C, H, W)
    return z, y, gens


# ==================================================================================================
# Samplers of a function of (x, t) (the tests pass closed-form fields); a network as one, with CFG
# ==================================================================================================

def sample_ode(velocity, x, num_steps, heun=False):
    """Euler, or Heun (not on the last step), for dx/dt = v(x, t) from t = 1 (noise) to 0 (data) on
    linspace(1, 0, N+1) in float64. Heun's correction is told the step's start t too (CFG, REPA)."""
    t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    x = x.to(torch.float64)  # (N, C, H, W)
    for i in range(num_steps):
        dt = t[i + 1] - t[i]  # negative: we run backwards in time
        d_cur = velocity(x, t[i])  # (N, C, H, W)
        x_next = x + dt * d_cur  # the Euler step
        if heun and i < num_steps - 1:
            d_next = velocity(x_next, t[i + 1], t[i])
            x_next = x + dt * 0.5 * (d_cur + d_next)  # trapezoid: the mean of both slopes
        x = x_next
    return x


def sample_sde(velocity, x, num_steps, path_type="linear", generator=None):
    """Euler-Maruyama for dx = [v - w/2 * score] dt + sqrt(w) dW, w(t) = 2t, on
    linspace(1, 0.04, N) then 0. The first N-1 steps add noise; the last, to t = 0, is the mean."""
    # linspace(1, 0.04, N), padded with a last t = 0: (N + 1,) in float64, on the host
    t = torch.nn.functional.pad(torch.linspace(1, 0.04, num_steps, dtype=torch.float64), (0, 1))
    x = x.to(torch.float64)  # (N, C, H, W)
    for i in range(num_steps):
        dt = t[i + 1] - t[i]  # negative: backwards in time
        v = velocity(x, t[i].item())  # (N, C, H, W)
        # Score from velocity: x = a x0 + s eps and v = a' x0 + s' eps give eps-hat; score = -eps/s.
        alpha, sigma, d_alpha, d_sigma = sra.interpolant(t[i], path_type)
        ratio = alpha / d_alpha
        score = (ratio * v - x) / (sigma ** 2 - ratio * d_sigma * sigma)
        # w(t) = 2t as in REPA's and SRA's sampler: the noise it injects vanishes at t = 0
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
    # Python ints: a step index read from a GPU tensor would stop the host at every step
    respaced.timestep_map = keep  # respaced step -> original step
    return respaced


def sample_ddpm(eps_model, x, num_steps, generator=None):
    """Ancestral DDPM on `num_steps` evenly spaced steps of the 1000: eps_model(x, step) returns eps
    (N, C, H, W), or eps and the learned-range value (N, 2C, H, W). No noise on the last step."""
    diffusion = respace(sra.GaussianDiffusion.linear(device=x.device), num_steps)
    x = x.to(torch.float64)  # (N, C, H, W)
    for i in reversed(range(diffusion.num_timesteps)):
        # the network was trained on the 1000-step indices, so it is fed the original index
        out = eps_model(x, diffusion.timestep_map[i])  # (N, C or 2C, H, W)
        # no learned variance: DDPM's "fixed large" beta_t, the top end of the learned range
        if out.shape[1] == x.shape[1]:
            out = torch.cat([out, torch.ones_like(out)], dim=1)
        t = torch.full((len(x),), i, device=x.device)  # (N,) index into the respaced tables
        mean, log_var, _ = diffusion.p_mean_variance(out, x, t)
        x = mean + torch.exp(0.5 * log_var) * randn_like(x, generator) if i > 0 else mean
    return x


def model_fn(model, y, cfg_scale=1.0, guidance_low=0.0, guidance_high=1.0, ddpm=False):
    """The sampler's f(x, t) -> velocity (N, C, H, W), or (ddpm) eps and DiT's variance channels;
    CFG v_u + w (v_c - v_u) while guidance_low <= t <= guidance_high (DDPM: t = step / 1000)."""
    C = model.in_channels
    if cfg_scale != 1 and model.y_embedder.embedding_table.num_embeddings <= model.num_classes:
        raise sra.UserError("no null label (trained without label dropout): use --cfg-scale 1")
    # the labels of a CFG pass, [y; null]: the null label is the row after the classes
    y_cfg = torch.cat([y, torch.full_like(y, model.num_classes)])  # (2N,)
    # SiT-repository weights (t = 0 noise): v(x, t) = -f(x, 1 - t), as d/dt flips with the time
    reverse = getattr(model, "reverse_time", False)
    def f(x, t, t_start=None):
        """Network output at (x, t); CFG is decided at t_start, the start of the sampler step."""
        # the network's time: a SiT's t in [0, 1], a DiT's step
        t_in = torch.full((len(x),), float(1 - t if reverse else t), device=x.device)  # (N,)
        # the state is float64, the network runs in its own dtype
        x_in = x.to(next(model.parameters()).dtype)
        # DDPM steps 0..999 are compared on the same [0, 1] scale as SiT times
        t_cfg = (t if t_start is None else t_start) / (1000 if ddpm else 1)
        if cfg_scale == 1 or not guidance_low <= t_cfg <= guidance_high:
            out = model(x_in, t_in, y)  # (N, C_out, H, W)
        else:  # one batched pass over [conditional; unconditional] instead of two calls
            cond, uncond = model(torch.cat([x_in, x_in]), torch.cat([t_in, t_in]), y_cfg).chunk(2)
            # every data channel is guided (DiT guided 3 of 4, a quirk); the variance stays cond.
            guided = uncond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C])
            out = torch.cat([guided, cond[:, C:]], dim=1)
        # the SiT repository's sign flip: CFG is linear in the outputs, so the two commute
        out = (-out if reverse else out).to(torch.float64)
        return out if ddpm else out[:, :C]  # a SiT's sigma channels serve no ODE/SDE
    return f


@torch.no_grad()
def generate(model, z, y, *, mode, num_steps, path_type="linear", cfg_scale=1.0,
             guidance_low=0.0, guidance_high=1.0, heun=False, generator=None):
    """Float32 samples (N, C, H, W) from noise z, labels y: ode/sde for a SiT, ddpm for a DiT."""
    f = model_fn(model, y, cfg_scale, guidance_low, guidance_high, ddpm=mode == "ddpm")
    if mode == "ode":
        return sample_ode(f, z, num_steps, heun).float()
    if mode == "sde":
        return sample_sde(f, z, num_steps, path_type, generator).float()
    return sample_ddpm(f, z, num_steps, generator).float()


# ==================================================================================================
# Checkpoints: ours, official SRA/REPA/DiT/SiT training checkpoints, released bare state dicts
# ==================================================================================================

# A checkpoint's path type -> (ours, reversed time). The SiT repository (t = 0 noise) writes Linear,
# t x + (1 - t) eps, and GVP, sin(pi t/2) x + cos(pi t/2) eps: with t -> 1 - t, linear and cosine.
PATHS = {"linear": ("linear", False), "cosine": ("cosine", False), "cos": ("cosine", False),
         "Linear": ("linear", True), "GVP": ("cosine", True)}


def load_model(path, model_name=None, use_raw_model=False):
    """A checkpoint's network (CPU, eval mode) -> (model, info: model, family, path_type)."""
    # weights_only: a full unpickle could run code (the official trainers' args: a Namespace);
    # mmap: tensors are paged in when used, and the 8 processes of a node share one copy
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:  # weights_only met a class or function: it would run code
        raise sra.UserError(f"refusing to load {path}: not only tensors (weights_only)") from None
    except Exception as e:  # missing, cut short, or not the zip archive that torch.save writes
        reason = getattr(e, "strerror", None) or sra.error_line(e).split(". ")[0]
        raise sra.UserError(f"cannot load checkpoint {path}: {reason}") from None
    if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        # released weights, named by --model; SiT's are the SiT repository's (Linear, reversed)
        sit_repo = (model_name or "").startswith("SiT")
        ckpt = dict(ema=ckpt, args=dict(path_type="Linear" if sit_repo else "linear"))
    key = "model" if use_raw_model else "ema"  # the online weights, or (by default) the EMA
    state = ckpt.get(key) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or "x_embedder.proj.weight" not in state:
        raise sra.UserError(f"{path} holds no DiT/SiT weights under {key!r} (a state dict, or "
                            f"a checkpoint with model/ema/args)")
    # training checkpoints: sra.py stores its args as a dict; SRA, REPA, DiT, SiT as a Namespace
    args = ckpt.get("args") or {}
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    name = args.get("model", model_name)
    if name not in sra.MODELS:  # a bare state dict names no model: --model does
        raise sra.UserError(f"{path} needs --model, one of {', '.join(sra.MODELS)} (got {name})")
    if model_name and name != model_name:
        raise sra.UserError(f"{path} holds a {name}; --model says {model_name}")
    path_type = args.get("path_type") or "linear"
    prediction = args.get("prediction", "v")  # the SiT repository's may be score or noise
    if path_type not in PATHS or prediction not in ("v", "velocity"):
        raise sra.UserError(f"{path}: path type {path_type!r}, prediction {prediction!r}: only "
                            f"linear, cosine, or the SiT repository's velocity on Linear or GVP")
    path_type, reverse = PATHS[path_type]
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()
             if not k.startswith(("ap_head.", "projectors."))}  # SRA/REPA projectors: training only
    _, C, p, _ = state["x_embedder.proj.weight"].shape  # (D, C, p, p)
    rows = state["y_embedder.embedding_table.weight"].shape[0]
    tokens = state["pos_embed"].shape[1]  # pos_embed: (1, T, D), T = (size / p)^2
    learn_sigma = state["final_layer.linear.weight"].shape[0] == 2 * C * p * p  # (p p C_out, D)
    num_classes = int(args.get("num_classes") or rows - 1)  # released weights carry the null row
    with torch.device("meta"):  # no random init for the checkpoint to overwrite (XL: ~15 s)
        net = sra.MODELS[name](input_size=math.isqrt(tokens) * p, in_channels=C,
                               num_classes=num_classes, learn_sigma=learn_sigma,
                               class_dropout_prob=0.1 if rows > num_classes else 0.0)
    try:  # strict: every tensor of the model from the file, none left over, the same shapes
        net.load_state_dict(state, assign=True)
    except RuntimeError as e:  # PyTorch lists the problems, one a line: say the first
        first = str(e).split("\n\t")[1]
        raise sra.UserError(f"{path} does not fit {name}: {first[:200]}") from None
    net.eval().requires_grad_(False)
    net.reverse_time = reverse  # the SiT repository's time: model_fn turns it around
    return net, dict(model=name, family=name.split("-")[0], path_type=path_type)


# ==================================================================================================
# Output: images, a grid, or per-batch part files (resumable) and then one ADM-style .npz
# ==================================================================================================

@torch.no_grad()
def to_images(x, vae=None, chunk=32):
    """Model space -> uint8 images (N, H, W, 3): latents are decoded, pixels are in [-1, 1]."""
    # `chunk` latents a call: past ~128, one fp32 activation of the decoder has 2^31 elements
    if vae is not None:
        x = torch.cat([vae.decode(part / 0.18215).sample for part in x.float().split(chunk)])
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


def log(message):
    """Print on the first process only, so that a torchrun job says each thing once."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, flush=True)


def sampler_settings(args, info, model):
    """generate()'s keyword arguments from the flags and the checkpoint, checked against it."""
    dit = info["family"] == "DiT"
    mode = args.mode or ("ddpm" if dit else "sde")
    if dit != (mode == "ddpm"):  # a DiT predicts eps: DDPM; a SiT the velocity: ODE or SDE
        fits = "ddpm" if dit else "sde or ode"
        raise sra.UserError(f"{args.ckpt} is a {info['family']} model: use --mode {fits}")
    resolution = model.input_size * (8 if model.in_channels == 4 else 1)  # the SD-VAE: 8x
    if args.resolution and args.resolution != resolution:
        raise sra.UserError(f"the checkpoint makes {resolution}px images, not {args.resolution}px")
    return dict(mode=mode, num_steps=args.num_steps or (50 if args.grid else 250), heun=args.heun,
                path_type=PATHS[args.path_type or info["path_type"]][0], cfg_scale=args.cfg_scale,
                guidance_low=args.guidance_low, guidance_high=args.guidance_high)


def make_images(model, vae, settings, global_seed, indices, labels=None):
    """uint8 images (n, H, W, 3) and labels (n,) of these global indices (or `labels`)."""
    shape = (model.in_channels, model.input_size, model.input_size)
    z, y, gens = sample_inputs(indices, global_seed, model.num_classes, shape)
    y = y if labels is None else labels
    device = next(model.parameters()).device
    x = generate(model, z.to(device), y.to(device), generator=gens, **settings)
    return to_images(x, vae), y.numpy()


def write_samples(model, vae, settings, args, npz_path, rank, world_size):
    """--num-fid-samples images into part files over all processes, then (rank 0) the one .npz."""
    N = args.num_fid_samples
    B = args.per_proc_batch_size
    parts_dir = npz_path[:-len(".npz")] + "-parts"  # a part holds the samples [kB, (k+1)B)
    png_dir = os.path.join(npz_path[:-len(".npz")], "png")  # <sample-dir>/<name>/png
    os.makedirs(parts_dir, exist_ok=True)
    parts = {(s, min(s + B, N)): os.path.join(parts_dir, f"{s:07d}-{min(s + B, N):07d}.npz")
             for s in range(0, N, B)}
    todo = [batch for batch, path in parts.items() if not os.path.exists(path)]  # resume
    # every process has listed the parts before any writes new ones
    if dist.is_initialized():
        dist.barrier()
    log(f"{len(todo)} of {len(parts)} batches to make, over {world_size} process(es)")
    # round-robin: a batch depends only on its indices, never on the process that makes it
    mine = todo[rank::world_size]
    with tqdm(total=sum(end - start for start, end in mine), unit="img", disable=rank != 0) as bar:
        for start, end in mine:
            images, labels = make_images(model, vae, settings, args.global_seed, range(start, end))
            # PNGs before the part file: a finished part implies its PNGs exist
            if args.save_png:
                os.makedirs(png_dir, exist_ok=True)
                for i, image in enumerate(images, start):  # named by the sample's index
                    Image.fromarray(image).save(os.path.join(png_dir, f"{i:06d}.png"))
            # atomically: a crash leaves the whole part or none of it (a full disk: one line)
            with sra.atomic_write(parts[start, end], "part file") as f:
                np.savez(f, images=images, labels=labels)
            bar.update(end - start)  # images, so that the bar's rate is this process's img/s
    if dist.is_initialized():  # all parts are on disk
        dist.barrier()
    if rank != 0:
        return
    size = model.input_size * (8 if vae is not None else 1)
    images = np.empty((N, size, size, 3), dtype=np.uint8)  # filled in place: one copy in RAM
    labels = np.empty(N, dtype=np.int64)
    for (start, end), part in parts.items():
        with np.load(part) as data:
            images[start:end] = data["images"]
            labels[start:end] = data["labels"]
    with sra.atomic_write(npz_path, ".npz") as f:
        np.savez(f, arr_0=images, arr_1=labels)
        f.flush()  # read back before the rename: only a whole .npz may replace the parts
        with np.load(f.name) as data:
            same = np.array_equal(data["arr_0"], images) and np.array_equal(data["arr_1"], labels)
        if not same:  # an OSError: atomic_write removes the .tmp, and the parts stay
            raise OSError("it does not read back as written")
    save_image_grid(images[:64], npz_path[:-len(".npz")] + ".png", nrow=8)  # a preview
    shutil.rmtree(parts_dir)  # at 50,000 x 256^2 they would double the disk used
    log(f"wrote {npz_path} (arr_0: {N} uint8 images {size}x{size}x3, arr_1: labels), a preview")
    if args.save_png:  # the folder that torch-fidelity and clean-fid read
        log(f"wrote {N} PNGs to {png_dir}")


def main(args):
    """Sample a grid (--grid), or --num-fid-samples images into an .npz over torchrun processes."""
    ddp, rank, world_size, device = sra.setup_distributed()
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    os.makedirs(args.sample_dir, exist_ok=True)  # fail now, not after an hour of sampling
    model, info = load_model(args.ckpt, args.model, args.use_raw_model)
    model = model.to(device)
    settings = sampler_settings(args, info, model)
    log(f"{info['model']} ({model.num_classes} classes) from {args.ckpt}: {settings}")
    # named by the settings, and a hash of them and the checkpoint's path: runs never share parts
    key = repr([args.ckpt, args.use_raw_model, args.vae, args.global_seed, settings])
    tag = hashlib.sha1(key.encode()).hexdigest()[:8]
    stem = os.path.splitext(os.path.basename(args.ckpt))[0]
    name = (f"{info['model'].replace('/', '-')}-{stem}-{settings['mode']}{settings['num_steps']}"
            f"-cfg{args.cfg_scale}-seed{args.global_seed}-{tag}")
    npz_path = os.path.join(args.sample_dir, f"{name}-n{args.num_fid_samples}.npz")
    if os.path.exists(npz_path) and not args.grid:  # a finished run: written whole, read back
        log(f"{npz_path} already exists: nothing to do (delete it to sample again)")
    elif not args.grid or rank == 0:  # latents are decoded by the SD-VAE; pixels need none
        vae = sra.load_vae(args.vae, device) if model.in_channels == 4 else None
        if not args.grid:
            write_samples(model, vae, settings, args, npz_path, rank, world_size)
        else:  # 8 rows, a column for each of the first 10 classes
            k = min(model.num_classes, 10)
            labels = torch.arange(k).repeat(8)  # (8k,) sample i sits in column i % k
            images, _ = make_images(model, vae, settings, args.global_seed, range(8 * k), labels)
            save_image_grid(images, os.path.join(args.sample_dir, f"{name}-grid.png"), nrow=k)
            log(f"wrote {os.path.join(args.sample_dir, name)}-grid.png")
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
    add("--cfg-scale", type=float, help="guidance scale w (default: 1 = off; 4 with --grid)")
    add("--guidance-low", type=float, default=0.0, help="guide only steps starting at t >= this")
    add("--guidance-high", type=float, default=1.0, help="guide only steps starting at t <= this")
    add = p.add_argument_group("output").add_argument
    add("--sample-dir", default="samples", help="where the .npz, grids and parts go")
    add("--num-fid-samples", type=int, default=50_000, help="images in the .npz")
    add("--per-proc-batch-size", type=int, default=32, help="images per forward pass per process")
    add("--global-seed", type=int, default=0, help="seeds every sample's stream with its index")
    add("--grid", action="store_true", help="only write one PNG: 8 samples for each of 10 classes")
    add("--save-png", action="store_true", help="also keep every image as a PNG")
    add("--vae", default="ema", help="SD-VAE decoder of latent models: ema, mse or a folder")
    add("--resolution", type=int, help="checked against the checkpoint's")
    add("--tf32", action=argparse.BooleanOptionalAction, default=True, help="TF32 matmuls on GPUs")
    args = p.parse_args(argv)
    for flag in ("num_fid_samples", "per_proc_batch_size", "num_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise sra.UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if not 0 <= args.guidance_low <= args.guidance_high:
        raise sra.UserError("need 0 <= --guidance-low <= --guidance-high")
    # a grid is a picture, guided as the paper's figures are (w = 4); the .npz keeps w = 1 (FID)
    if args.cfg_scale is None:
        args.cfg_scale = 4.0 if args.grid else 1.0
    args.ckpt = os.path.abspath(args.ckpt)
    args.sample_dir = os.path.abspath(args.sample_dir)
    return args


def cli(argv=None):
    """Command-line entry: 0 on success, or 2 and one `error:` line (bad input, an OSError)."""
    try:
        main(parse_args(argv))
    except (sra.UserError, OSError) as e:
        print(f"error: {sra.error_line(e)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
