"""SRA: Self-Representation Alignment for diffusion transformers (Jiang et al., arXiv 2505.02831), in one file.

SRA adds one term to DiT/SiT training: the online network's hidden state after an early block, through a small
projector, is pulled towards the hidden state after a later block of its own EMA, which sees a less noisy
version of the same image. No external encoder is needed.

Run recipes
    # minutes on a CPU: the built-in procedural data (no download)
    python sra.py --model SiT-T/4 --batch-size 32 --learning-rate 3e-4 --ema-decay 0.995 --max-train-steps 2000
    # one GPU, CIFAR-10 in pixel space
    python sra.py --model SiT-B/2 --dataset cifar10 --data-dir data/cifar10 --batch-size 128
    # 8 GPUs, ImageNet 256 latents (the paper: --batch-size is per process, 32 x 8 = 256); two nodes: README
    torchrun --nproc_per_node=8 sra.py --model SiT-XL/2 --data-dir data/imagenet256 --batch-size 32
    # the benchmark: SRA vs vanilla step time, images/s, MFU
    python sra.py --bench --model SiT-XL/2 --batch-size 32

Notable choices
    * SiT time runs from t = 0 (data) to t = 1 (noise), as in SRA/REPA (the SiT repo is reversed).
    * Student: hidden state after block `block_out_s` (1-based) -> projector. Teacher: raw hidden state after
      block `block_out_t` of the EMA, which stops there. Teacher time t' = clamp(t - t_max * u, 0, 1), same
      noise, same labels after label dropout.
    * Loss `sml1` (smooth-L1, beta 0.05; the paper) or `cos` (per token over the feature axis, in fp32).
    * EMA decay 0.9999, an exact copy at step 0, updated after every optimizer step: it is the teacher.
"""
import argparse
import contextlib
import functools
import glob
import itertools
import json
import math
import os
import signal
import sys
import time
from collections import OrderedDict
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------
# Embedders: timesteps and positions

def modulate(x, shift, scale):
    """adaLN: LN(x) * (1 + scale) + shift, one (shift, scale) per sample, broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

class TimestepEmbedder(nn.Module):
    """Scalar time -> 256-dim [cos, sin] sinusoid -> MLP -> D."""

    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        """Sinusoid of t (N,) at frequencies exp(-ln(max_period) * i / (dim/2)); cos first, then sin."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)  # (dim/2,)
        args = t.float()[:, None] * freqs[None]  # (N, dim/2)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))  # (N, D)

def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """MAE-style fixed 2D sin-cos table (T, D), in float64: [0, D/2) encodes the column, [D/2, D) the row,
    each half D/4 sines then D/4 cosines of pos * 10000^(-i / (D/4))."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))  # (D/4,)
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                             indexing="ij")  # token k = (row k // grid, column k % grid)
    encode = lambda pos: np.concatenate([np.sin(np.outer(pos.ravel(), omega)),  # noqa: E731  (T, D/2)
                                         np.cos(np.outer(pos.ravel(), omega))], axis=1)
    return np.concatenate([encode(cols), encode(rows)], axis=1)  # (T, D)


# ----------------------------------------------------------------------------------------------------
# The transformer: adaLN-Zero blocks, final layer, projector, model table

class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, via scaled_dot_product_attention."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, heads, T, D/heads): flash kernels on GPU
        return self.proj(x.transpose(1, 2).reshape(N, T, D))  # (N, T, D)

def mlp(dim, hidden_dim, act, names):
    """Linear -> act -> Linear as an nn.Sequential whose layers carry the released checkpoints' names."""
    return nn.Sequential(OrderedDict([(names[0], nn.Linear(dim, hidden_dim)), ("act", act),
                                      (names[1], nn.Linear(hidden_dim, dim))]))

class Block(nn.Module):
    """Transformer block with adaLN-Zero conditioning: c gives shift, scale and gate for both branches."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp(hidden_size, int(hidden_size * mlp_ratio), nn.GELU(approximate="tanh"), ("fc1", "fc2"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)

class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a Linear to p*p*C_out values per token."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)

class DiT(nn.Module):
    """The transformer of DiT and SiT, with the parameter names of the released checkpoints. `model(x, t, y)`
    -> (N, C_out, H, W); with `block_out_s` also the projected hidden state after that block (SRA student).
    The projector `ap_head` exists only with projector=True: released weights load strictly without it."""

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
                 mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000, learn_sigma=True, projector=False):
        super().__init__()
        if input_size % patch_size:
            raise UserError(f"input size {input_size} is not divisible by the patch size {patch_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma, self.num_classes, self.depth, self.hidden_size = learn_sigma, num_classes, depth, hidden_size
        self.grad_checkpointing = False
        conv = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)  # p x p patches -> D
        self.x_embedder = nn.Sequential(OrderedDict(proj=conv))  # named as in the released checkpoints
        self.t_embedder = TimestepEmbedder(hidden_size)
        # label -> D; row `num_classes` is CFG's null class (labels are dropped in training_losses, not here)
        table = nn.Embedding(num_classes + int(class_dropout_prob > 0), hidden_size)
        self.y_embedder = nn.Sequential(OrderedDict(embedding_table=table))
        num_patches = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)  # fixed
        self.blocks = nn.ModuleList([Block(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # SRA's projector on the student features: Linear(D, 2D) -> SiLU -> Linear(2D, D)
        self.ap_head = mlp(hidden_size, 2 * hidden_size, nn.SiLU(), ("linear1", "linear2")) if projector else None
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init. adaLN and the final Linear are zeroed: every block starts as the identity, output 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        pos = get_2d_sincos_pos_embed(self.hidden_size, self.input_size // self.patch_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))  # the patch conv as a Linear over flattened patches
        nn.init.zeros_(self.x_embedder.proj.bias)
        for w in (self.y_embedder.embedding_table.weight, self.t_embedder.mlp[0].weight, self.t_embedder.mlp[2].weight):
            nn.init.normal_(w, std=0.02)
        zeroed = [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                  self.final_layer.linear]
        for layer in zeroed:  # adaLN-Zero
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        p, c, h = self.patch_size, self.out_channels, self.input_size // self.patch_size
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, h, p, p, c))
        return x.reshape(x.shape[0], c, h * p, h * p)

    def embed(self, x, t, y):
        """Tokens (N, T, D) and the conditioning c = t_emb + y_emb (N, D)."""
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, T, D), row-major
        return tokens + self.pos_embed, self.t_embedder(t) + self.y_embedder(y)

    def forward(self, x, t, y, block_out_s=None):
        x, c = self.embed(x, t, y)  # (N, T, D), (N, D)
        features = None
        for i, block in enumerate(self.blocks, start=1):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():  # recompute in backward
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)  # (N, T, D)
            if i == block_out_s:
                features = self.ap_head(x)  # SRA student: projected hidden state after block s
        x = self.unpatchify(self.final_layer(x, c))  # (N, C_out, H, W)
        return x if block_out_s is None else (x, features)

    def forward_features(self, x, t, y, depth):
        """Hidden state (N, T, D) after block `depth` (1-based), running only blocks 1..depth: the teacher."""
        x, c = self.embed(x, t, y)
        for block in self.blocks[:depth]:
            x = block(x, c)
        return x

# depth, width, heads of the paper's S, B, L, XL, plus T, a tiny 6-block model of ours for CPU tutorials
SIZES = {"T": (6, 192, 3), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

def build_model(family, size, patch, input_size=32, in_channels=4, num_classes=1000, class_dropout_prob=0.1,
                learn_sigma=None, **kw):
    """The constructor behind MODELS["<family>-<size>/<patch>"]; learn_sigma defaults to on for DiT only."""
    depth, width, heads = SIZES[size]
    learn_sigma = family == "DiT" if learn_sigma is None else learn_sigma  # SRA's SiT: C_out = C
    return DiT(input_size, patch, in_channels, width, depth, heads, class_dropout_prob=class_dropout_prob,
               num_classes=num_classes, learn_sigma=learn_sigma, **kw)

MODELS = {f"{fam}-{s}/{p}": functools.partial(build_model, fam, s, p) for fam in ("SiT", "DiT") for s in SIZES
          for p in (2, 4, 8)}
# SRA block pairs (student s -> teacher block_out_t), 1-based, from the paper (S uses the B pairs)
BLOCK_PAIRS = {"SiT-S": (3, 8), "SiT-B": (3, 8), "SiT-L": (6, 16), "SiT-XL": (8, 20),
               "DiT-S": (3, 7), "DiT-B": (3, 7), "DiT-L": (6, 14), "DiT-XL": (8, 16)}

def default_blocks(model_name):
    """The paper's (block_out_s, block_out_t) for a model, else the rule of thumb depth/4 -> 3*depth/4."""
    key = model_name.split("/")[0]
    depth = SIZES[key.split("-")[1]][0]
    return BLOCK_PAIRS.get(key, (max(1, depth // 4), 3 * depth // 4))


# ----------------------------------------------------------------------------------------------------
# Objectives: SiT interpolants and the DDPM of DiT

def mean_flat(x):
    """Mean over every axis but the batch axis."""
    return x.mean(dim=list(range(1, x.ndim)))

def interpolant(t, path_type="linear"):
    """x_t = alpha_t * x + sigma_t * eps (t = 0 data, t = 1 noise) -> alpha_t, sigma_t, d alpha/dt, d sigma/dt."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path_type in ("cosine", "cos"):  # the official trainer accepts `cos`, but its loss only knew `cosine`
        a = math.pi / 2
        return torch.cos(a * t), torch.sin(a * t), -a * torch.sin(a * t), a * torch.cos(a * t)
    raise UserError(f"unknown path type {path_type!r}: use linear or cosine")

def sample_time(N, weighting, path_type, device, generator):
    """Training times: uniform on [0, 1], or lognormal (s = e^n, n ~ N(0, 1), mapped onto [0, 1])."""
    if weighting == "uniform":
        return torch.rand(N, device=device, generator=generator)
    s = torch.exp(torch.randn(N, device=device, generator=generator))
    return s / (1 + s) if path_type == "linear" else 2 / math.pi * torch.atan(s)

def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) for x in [-1, 1] quantised to 256 bins under N(means, e^(2 log_scales)), elementwise."""
    cdf = lambda v: 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))  # noqa: E731
    centered, inv_stdv = x - means, torch.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv_stdv * (centered + 1 / 255)), cdf(inv_stdv * (centered - 1 / 255))
    log = lambda v: torch.log(v.clamp(min=1e-12))  # noqa: E731
    return torch.where(x < -0.999, log(cdf_plus), torch.where(x > 0.999, log(1 - cdf_min), log(cdf_plus - cdf_min)))

class GaussianDiffusion:
    """DDPM with linear betas and learned-range variance (DiT); float64 tables indexed by the step t.
    A respaced schedule (sample.py) feeds the model the original step index `timestep_map[t]`."""

    def __init__(self, betas, timestep_map=None):
        self.betas = b = torch.as_tensor(betas, dtype=torch.float64)
        self.num_timesteps = T = len(b)
        self.timestep_map = torch.arange(T) if timestep_map is None else torch.as_tensor(timestep_map)
        self.alphas_cumprod = ac = torch.cumprod(1 - b, dim=0)
        ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.posterior_variance = pv = b * (1 - ac_prev) / (1 - ac)  # beta tilde
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]]))  # pv[0] = 0: use pv[1]
        self.posterior_mean_coef1 = b * ac_prev.sqrt() / (1 - ac)
        self.posterior_mean_coef2 = (1 - ac_prev) * (1 - b).sqrt() / (1 - ac)
        self.fixed_large_log_variance = torch.log(torch.cat([pv[1:2], b[1:]]))  # models without learned sigma

    @classmethod
    def linear(cls, num_timesteps=1000):
        """DDPM's linear schedule, beta from 1e-4 to 0.02 (scaled for other step counts)."""
        scale = 1000 / num_timesteps
        return cls(torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64))

    @staticmethod
    def _at(table, t, x):
        """table[t] shaped to broadcast against x, in x's dtype."""
        return table.to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), with the given noise."""
        ac = self.alphas_cumprod
        return self._at(ac.sqrt(), t, x0) * x0 + self._at((1 - ac).sqrt(), t, x0) * noise

    def q_posterior(self, x0, xt, t):
        """Mean and log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._at(self.posterior_mean_coef1, t, xt) * x0 + self._at(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._at(self.posterior_log_variance_clipped, t, xt)

    def p_mean_variance(self, model_output, xt, t):
        """The model's p(x_{t-1} | x_t): mean, log-variance and predicted x_0 (eps in the first C channels)."""
        C, ac = xt.shape[1], self.alphas_cumprod
        if model_output.shape[1] == 2 * C:  # learned range: log var between log beta and log beta tilde
            frac = (model_output[:, C:] + 1) / 2
            log_var = frac * self._at(self.betas.log(), t, xt) + (1 - frac) * self._at(
                self.posterior_log_variance_clipped, t, xt)
        else:
            log_var = self._at(self.fixed_large_log_variance, t, xt).expand_as(xt)
        x0 = self._at((1 / ac).sqrt(), t, xt) * xt - self._at((1 / ac - 1).sqrt(), t, xt) * model_output[:, :C]
        return self.q_posterior(x0, xt, t)[0], log_var, x0

    def training_losses(self, model_output, x0, xt, t, noise):
        """Per-sample loss: MSE on eps + the variational-bound term (bits/dim) that trains the variance."""
        C = x0.shape[1]
        mse = mean_flat((noise - model_output[:, :C]) ** 2)
        if model_output.shape[1] != 2 * C:
            return mse
        # The vb term sees a detached eps, so that it trains only the variance output (Improved DDPM / DiT).
        frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
        mean, log_var, _ = self.p_mean_variance(frozen, xt, t)
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        kl = 0.5 * (-1 + log_var - true_log_var + torch.exp(true_log_var - log_var) + (true_mean - mean) ** 2
                    * torch.exp(-log_var))  # KL(q || p) of two Gaussians, in nats
        kl = mean_flat(kl) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)) / math.log(2.0)
        return mse + torch.where(t == 0, nll, kl)  # at t = 0 the decoder's likelihood of x_0


# ----------------------------------------------------------------------------------------------------
# The EMA teacher and the SRA loss

@torch.no_grad()
def update_ema(ema_params, model_params, decay=0.9999):
    """ema <- decay * ema + (1 - decay) * model, as two fused multi-tensor ops (no per-parameter loop)."""
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, model_params, alpha=1 - decay)

def align_loss(student, teacher, loss_type="sml1"):
    """SRA distance between projected student tokens and teacher tokens, in fp32; and the mean
    per-token cosine similarity (logged). `cos` is per token over the feature axis (the official code's
    cosine_similarity(dim=1) ran over the token axis)."""
    student, teacher = student.float(), teacher.float()  # (N, T, D); fp16 normalisation can give NaNs
    cos = F.cosine_similarity(student, teacher, dim=-1)  # (N, T)
    loss = F.smooth_l1_loss(student, teacher, beta=0.05) if loss_type == "sml1" else (1 - cos).mean()
    return loss, cos.detach().mean()

def align_weight(step, weight, decay_start, decay_steps):
    """lambda * 0.1^((step - start) / steps) after `decay_start` optimizer steps, else lambda."""
    return weight * 0.1 ** (max(0, step - decay_start) / decay_steps) if decay_steps > 0 else weight

def training_losses(model, ema, x, y, args, diffusion, generator):
    """One batch: the student's denoising loss and the SRA alignment to the EMA teacher.

    Draws, in order, from `generator`: label dropout, noise, student time, teacher time offset."""
    N, device = x.shape[0], x.device
    drop = torch.rand(N, device=device, generator=generator) < args.cfg_prob
    y = torch.where(drop, unwrap(model).num_classes, y)  # a dropped label stays dropped for the teacher
    noise = torch.randn(x.shape, device=device, generator=generator)
    if args.family == "SiT":
        t = sample_time(N, args.weighting, args.path_type, device, generator)
        alpha, sigma, d_alpha, d_sigma = interpolant(t.view(-1, 1, 1, 1), args.path_type)
        x_t, target = alpha * x + sigma * noise, d_alpha * x + d_sigma * noise  # x_t and the velocity target
        t_teacher = (t - args.t_max * torch.rand(N, device=device, generator=generator)).clamp(0, 1)  # t' <= t
        alpha_t, sigma_t, _, _ = interpolant(t_teacher.view(-1, 1, 1, 1), args.path_type)
        x_teacher = alpha_t * x + sigma_t * noise  # the same image and noise, less of it
    else:
        T = diffusion.num_timesteps
        t = torch.randint(0, T, (N,), device=device, generator=generator)
        x_t = diffusion.q_sample(x, t, noise)
        offset = torch.randint(0, max(1, round(args.t_max * T)), (N,), device=device, generator=generator)
        t_teacher = (t - offset).clamp(1, T - 1)  # as the official DiT-SRA: clamped at step 1
        x_teacher = diffusion.q_sample(x, t_teacher, noise)
    if args.no_sra:
        output, align, cos = model(x_t, t, y), x.new_zeros(()), x.new_zeros(())
    else:
        output, student = model(x_t, t, y, block_out_s=args.block_out_s)  # (N, C_out, H, W), (N, T, D)
        with torch.no_grad():  # stop-gradient: the EMA teacher is never trained
            teacher = ema.forward_features(x_teacher, t_teacher, y, args.block_out_t)  # (N, T, D)
        align, cos = align_loss(student, teacher, args.loss_type)
    if args.family == "SiT":
        denoise = mean_flat((output[:, :x.shape[1]].float() - target) ** 2)
    else:
        denoise = diffusion.training_losses(output.float(), x, x_t, t, noise)
    return denoise.mean(), align, cos


# ----------------------------------------------------------------------------------------------------
# Data: built-in shapes, CIFAR-10, image folders, pre-encoded SD-VAE latents

class ShapesDataset(Dataset):
    """Built-in data: 10 classes of coloured shapes (disc, square, triangle, ring, cross, h-stripes, v-stripes,
    checker, diamond, two dots), each with its own hue, drawn per index (the index seeds the jitter)."""

    def __init__(self, resolution=32, length=50_000):
        self.resolution, self.length = resolution, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        rng, label = np.random.default_rng(index), index % 10
        yy, xx = (np.mgrid[0:self.resolution, 0:self.resolution] + 0.5) / self.resolution  # (R, R) in (0, 1)
        dx, dy = xx - 0.5 - rng.uniform(-0.12, 0.12), yy - 0.5 - rng.uniform(-0.12, 0.12)
        s = rng.uniform(0.22, 0.32)  # half-size of the shape
        r, box = np.hypot(dx, dy), np.maximum(abs(dx), abs(dy)) < s
        band = lambda v: np.floor(v / (0.4 * s)) % 2 == 0  # noqa: E731  (stripes 0.4 s wide)
        mask = [r < s, np.maximum(abs(dx), abs(dy)) < 0.8 * s, (dy < 0.7 * s) & (abs(dx) < 0.6 * (dy + 0.9 * s)),
                (r < s) & (r > 0.6 * s), ((abs(dx) < 0.3 * s) & (abs(dy) < s)) | ((abs(dy) < 0.3 * s) & (abs(dx) < s)),
                box & band(dy), box & band(dx), box & (band(dx) ^ band(dy)), abs(dx) + abs(dy) < s,
                (np.hypot(dx - 0.5 * s, dy) < 0.4 * s) | (np.hypot(dx + 0.5 * s, dy) < 0.4 * s)][label]
        hue = label / 10 + rng.uniform(-0.02, 0.02)
        color = np.clip(0.5 + 0.5 * np.cos(2 * np.pi * (hue + np.array([0, 1 / 3, 2 / 3]))), 0, 1)  # (3,)
        angle = rng.uniform(0, 2 * np.pi)
        shade = rng.uniform(0.05, 0.3) + 0.15 * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle))
        image = np.where(mask[..., None], color * rng.uniform(0.8, 1.0), shade[..., None])  # (R, R, 3) in [0, 1]
        return torch.from_numpy(image.transpose(2, 0, 1) * 2 - 1).float(), label  # (3, R, R) in [-1, 1]

def center_crop_arr(image, resolution):
    """ADM center crop: box-downsample while the short side >= 2 * resolution, bicubic, then crop."""
    from PIL import Image
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    arr = np.array(image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC))
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution]

class ImageFolderDataset(Dataset):
    """root/<class>/<image>: labels from the sorted class names, ADM center crop, [-1, 1]."""

    EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm")

    def __init__(self, root, resolution):
        self.resolution, self.samples = resolution, []
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not classes:
            raise UserError(f"{root} has no class sub-folders: expected {root}/<class>/<image>.png")
        for label, name in enumerate(classes):
            folder = os.path.join(root, name)
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith(self.EXTENSIONS))
            if not files:
                raise UserError(f"class folder {folder} holds no images ({', '.join(self.EXTENSIONS)})")
            self.samples += [(os.path.join(folder, f), label) for f in files]
        self.num_classes = len(classes)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        from PIL import Image
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                arr = center_crop_arr(image.convert("RGB"), self.resolution)
        except Exception as e:
            raise UserError(f"cannot read image {path}: {e}") from None
        return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1, label  # (3, R, R)

class LatentDataset(Dataset):
    """SRA/REPA/EDM2 pre-encoded ImageNet: vae-sd/dataset.json and one (8, R/8, R/8) .npy per image holding
    the VAE posterior's mean and std, returned as stored (fp16 stays fp16); see prepare_batch."""

    def __init__(self, root, resolution):
        meta = os.path.join(root, "vae-sd", "dataset.json")
        try:
            with open(meta) as f:
                self.files = [(os.path.join(root, "vae-sd", p), int(label)) for p, label in json.load(f)["labels"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read {meta} ({e}): expected {{\"labels\": [[path, class], ...]}}") from None
        missing = [p for p, _ in self.files if not os.path.isfile(p)]
        if missing or not self.files:
            raise UserError(f"{meta} lists {len(missing)} missing files, e.g. {missing[0]}" if missing
                            else f"{meta} lists no files")
        self.num_classes = 1 + max(label for _, label in self.files)
        self.shape = (8, resolution // 8, resolution // 8)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path, label = self.files[index]
        try:
            moments = np.load(path)
        except Exception as e:
            raise UserError(f"cannot read latent file {path}: {e}") from None
        moments = moments[0] if moments.ndim == 4 and moments.shape[0] == 1 else moments
        if tuple(moments.shape) != self.shape:
            raise UserError(f"latent file {path} has shape {tuple(moments.shape)}, expected {self.shape} "
                            f"(VAE mean and std at resolution/8): check --resolution")
        return torch.from_numpy(np.ascontiguousarray(moments)), label

def cifar10(root):
    """torchvision's CIFAR-10 training split in [-1, 1], downloaded when missing and online."""
    import torchvision
    import torchvision.transforms as T
    transform = T.Compose([T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    for download in (False, True):
        with contextlib.suppress(Exception):
            return torchvision.datasets.CIFAR10(root, train=True, download=download, transform=transform)
    raise UserError(f"CIFAR-10 is not in {root} and could not be downloaded: put cifar-10-batches-py/ there or "
                    f"run once online")

def build_dataset(args):
    """The data source named by --dataset/--data-dir; sets args.num_classes, in_channels and input_size."""
    kind = args.dataset or ("builtin" if args.data_dir is None else "latents" if os.path.isdir(
        os.path.join(args.data_dir, "vae-sd")) else "folder")
    if kind in ("latents", "folder") and not (args.data_dir and os.path.isdir(args.data_dir)):
        raise UserError(f"data folder {args.data_dir!r} does not exist: pass --data-dir, or omit it for the "
                        f"built-in data")
    args.resolution = R = args.resolution or (32 if kind in ("builtin", "cifar10") else 256)
    if kind == "latents":
        if R % 8:
            raise UserError(f"--resolution {R} is not divisible by 8 (the SD-VAE downsamples by 8)")
        dataset, shape = LatentDataset(args.data_dir, R), (4, R // 8)  # (channels, input size) of the model
    elif kind == "folder":
        dataset, shape = ImageFolderDataset(args.data_dir, R), (3, R)
    elif kind == "cifar10":
        dataset, shape = cifar10(args.data_dir or "data/cifar10"), (3, 32)
    else:
        dataset, shape = ShapesDataset(R), (3, R)
    args.in_channels, args.input_size = shape
    inferred = getattr(dataset, "num_classes", 10)
    if (args.num_classes or inferred) < inferred:
        raise UserError(f"--num-classes {args.num_classes} is smaller than the {inferred} classes in the data")
    args.num_classes, args.dataset = args.num_classes or inferred, kind
    if args.input_size % int(args.model.split("/")[1]):
        raise UserError(f"input size {args.input_size} (from --resolution {args.resolution}) is not divisible by "
                        f"the patch size {args.model.split('/')[1]} of {args.model}")
    return dataset

class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch (`skip` samples in), so a resumed run sees the same batches."""

    skip = 0

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)

def prepare_batch(x, kind, generator):
    """On-device latent sampling or random flips, drawn from the (checkpointed) training generator."""
    if kind == "latents":  # z = (mean + std * eps) * 0.18215: a fresh posterior sample every step
        mean, std = x.float().chunk(2, dim=1)
        return (mean + std * torch.randn(mean.shape, device=x.device, generator=generator)) * 0.18215
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < 0.5  # random horizontal flip
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


# ----------------------------------------------------------------------------------------------------
# Helpers: distributed setup, checkpoints, logging

def unwrap(model):
    """The plain DiT inside DDP and/or torch.compile wrappers (for state dicts and the EMA)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)

def setup_distributed(timeout_s=1800):
    """(ddp, rank, world_size, device). DDP when torchrun set RANK; the GPU comes from LOCAL_RANK, not RANK."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return False, 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return True, dist.get_rank(), dist.get_world_size(), device

def atomic_save(obj, path):
    """torch.save to path.tmp, fsync, then rename: a crash leaves the old file or the new one, never half."""
    with open(f"{path}.tmp", "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(f"{path}.tmp", path)
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)

def load_checkpoint(path):
    """Load a training checkpoint with weights_only=True (no code can run); UserError if it is not one."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip() or type(e).__name__).splitlines()[0][:200]
        raise UserError(f"{path} is not a loadable checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or not {"model", "ema", "opt", "step", "args"} <= ckpt.keys():
        raise UserError(f"{path} is not an sra.py training checkpoint (needs model, ema, opt, step, args)")
    return ckpt

def list_checkpoints(run_dir):
    """Step checkpoints of a run, newest first (temporary *.tmp files are never listed)."""
    paths = glob.glob(os.path.join(run_dir, "checkpoints", "*.pt"))
    return sorted((p for p in paths if os.path.basename(p)[:-3].isdigit()), reverse=True)

def find_resume_checkpoint(run_dir, log):
    """--resume auto: the newest checkpoint that loads; unreadable ones are reported and skipped."""
    for path in list_checkpoints(run_dir):
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            log(f"warning: {e}; trying an older checkpoint")
    log(f"--resume auto: no loadable checkpoint in {run_dir}, starting from scratch")
    return None, None

def prune_checkpoints(run_dir, keep_last, keep_every, current):
    """Delete all but the newest `keep_last` step checkpoints up to step `current` (the one just written),
    sparing multiples of `keep_every`; a newer, unreadable file never pushes the fresh one out."""
    steps = {path: int(os.path.basename(path)[:-3]) for path in list_checkpoints(run_dir)}
    older = [path for path, step in steps.items() if step <= current]  # newest first
    for path in older[keep_last:]:
        if not (keep_every and steps[path] % keep_every == 0):
            os.remove(path)


# ----------------------------------------------------------------------------------------------------
# Training

def build(args, device):
    """The model (with the projector unless --no-sra), its EMA teacher, AdamW and the fp16 loss scaler."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    net_args = dict(input_size=args.input_size, in_channels=args.in_channels, num_classes=args.num_classes,
                    class_dropout_prob=args.cfg_prob, learn_sigma=args.learn_sigma)
    model = MODELS[args.model](**net_args, projector=not args.no_sra).to(device)
    model.grad_checkpointing = args.grad_checkpointing
    ema = MODELS[args.model](**net_args).to(device).requires_grad_(False).eval()  # backbone only, no projector
    ema.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("ap_head.")})  # a copy
    pairs = (list(ema.parameters()), [model.get_parameter(name) for name, _ in ema.named_parameters()])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                            betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                            eps=args.adam_epsilon, fused=device.type == "cuda")
    return model, ema, pairs, opt, torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")

def train_step(model, ema, opt, scaler, ema_pairs, data, args, diffusion, generator, autocast, weight, sums,
               nan=False):
    """One optimizer step over the micro-batches, then the EMA update. Adds (denoise, align, cos, grad norm,
    non-finite) to the device tensor `sums`; returns the epoch and whether an fp16 overflow skipped the step."""
    ddp, accum = isinstance(model, nn.parallel.DistributedDataParallel), args.gradient_accumulation_steps
    for micro in range(accum):
        epoch, (x, y) = next(data)
        x = prepare_batch(x.to(sums.device, non_blocking=True), args.dataset, generator)
        y = y.to(sums.device, non_blocking=True)
        with model.no_sync() if ddp and micro < accum - 1 else contextlib.nullcontext():  # one grad sync a step
            with autocast:
                denoise, align, cos = training_losses(model, ema, x, y, args, diffusion, generator)
                loss = (denoise + weight * align) / accum  # L = L_denoise + lambda * L_align
            loss = loss * float("nan") if nan else loss  # test hook (--fault-nan-at)
            scaler.scale(loss).backward()
        sums[:3] += torch.stack([denoise.detach(), align.detach(), cos]) / accum
    scaler.unscale_(opt)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    sums[3:] += torch.stack([grad_norm, (~torch.isfinite(loss.detach())).float()])
    scale = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(opt)  # a plain opt.step() when the scaler is disabled
    scaler.update()
    opt.zero_grad(set_to_none=True)
    update_ema(*ema_pairs, args.ema_decay)
    return epoch, scale is not None and scaler.get_scale() < scale  # fp16 overflow: a skipped step, not a crash

def main(args):
    """Train a DiT/SiT with SRA (or vanilla with --no-sra); rank 0 logs, samples and checkpoints."""
    ddp, rank, world_size, device = setup_distributed(args.dist_timeout)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.allow_tf32
    dataset = build_dataset(args)
    run_dir = os.path.join(args.output_dir, args.exp_name)
    if rank == 0:  # rank 0 writes the run folder and logs (stdout, log.txt, metrics.jsonl); the others are silent
        for sub in ("checkpoints", "samples"):
            os.makedirs(os.path.join(run_dir, sub), exist_ok=True)
        with open(os.path.join(run_dir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        text, metrics = (open(os.path.join(run_dir, name), "a", buffering=1) for name in ("log.txt", "metrics.jsonl"))

    def log(message):
        for out in (sys.stdout, text) if rank == 0 else ():
            print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}", file=out, flush=True)

    model, ema, ema_pairs, opt, scaler = build(args, device)
    log(f"{args.model} ({sum(p.numel() for p in ema.parameters()) / 1e6:.2f}M parameters) on {args.dataset} data "
        f"({len(dataset)} items, {args.num_classes} classes, {args.in_channels}x{args.input_size}x{args.input_size}),"
        f" {world_size} process(es) on {device}, " + ("vanilla (--no-sra)" if args.no_sra else f"SRA blocks "
        f"{args.block_out_s}->{args.block_out_t}, t_max {args.t_max}, {args.loss_type} x {args.align_weight}"))
    # Training randomness (noise, times, label dropout, flips, latent samples) comes from one generator per
    # rank, seeded seed * world_size + rank, and is checkpointed: a resumed run draws the same numbers.
    generator = torch.Generator(device).manual_seed(args.seed * world_size + rank)

    step, last_ckpt, ckpt = 0, None, None
    if args.resume == "auto":
        last_ckpt, ckpt = find_resume_checkpoint(run_dir, log)
    elif args.resume:
        last_ckpt, ckpt = args.resume, load_checkpoint(args.resume)
    if ckpt is not None:
        try:
            for part, key in ((model, "model"), (ema, "ema"), (opt, "opt"), (scaler, "scaler")):
                part.load_state_dict(ckpt[key])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"{last_ckpt} does not fit {args.model} with these flags: {str(e).splitlines()[0]}")
        step = ckpt["step"]
        if len(ckpt["rng"]) == world_size:
            generator.set_state(ckpt["rng"][rank])
        else:  # another process count cannot replay the old streams: fresh, distinct ones
            generator.manual_seed((args.seed * world_size + rank) * 1_000_003 + step)
        log(f"resumed from {last_ckpt} at step {step}")

    # Data: each rank reads its shard of a shuffled order that depends only on (seed, epoch).
    sampler = ResumableSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=args.seed,
                               drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0, drop_last=True)
    micro_per_epoch, accum = len(loader), args.gradient_accumulation_steps
    if micro_per_epoch < accum:
        raise UserError(f"{len(dataset)} items make less than one step of {args.batch_size} x {world_size} x "
                        f"{accum}: lower --batch-size")
    total_steps = min(args.max_train_steps or math.inf, args.epochs * (micro_per_epoch // accum))

    def batches(epoch, skip):
        """(epoch, batch) forever from the resume position: `skip` micro-batches into `epoch`."""
        while True:
            sampler.set_epoch(epoch)
            sampler.skip = skip * args.batch_size
            yield from ((epoch, batch) for batch in loader)
            epoch, skip = epoch + 1, 0

    epoch, skip = divmod(step * accum, micro_per_epoch)  # the resume position
    data = batches(epoch, skip)
    if args.compile:  # where compiling fails, dynamo falls back to eager with a warning
        torch._dynamo.config.suppress_errors, model = True, torch.compile(model)
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    model.train()
    diffusion = GaussianDiffusion.linear() if args.family == "DiT" else None
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    stop = []  # SIGTERM (preemption): checkpoint at the current step, then exit
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))

    def checkpoint():
        """Rank 0 writes a complete checkpoint atomically, holding every rank's generator state."""
        nonlocal last_ckpt
        states = [generator.get_state()] * world_size
        if ddp:
            dist.all_gather_object(states, generator.get_state())
        if rank == 0:
            last_ckpt = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
            atomic_save({"model": unwrap(model).state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "scaler": scaler.state_dict(), "args": vars(args), "step": step, "epoch": epoch,
                         "rng": states}, last_ckpt)
            if args.keep_last:  # only now that the new checkpoint is safely on disk
                prune_checkpoints(run_dir, args.keep_last, args.keep_every, current=step)
            log(f"saved checkpoint {last_ckpt}")

    sums = torch.zeros(5, device=device)  # running denoise, align, cos, grad norm, non-finite losses
    skipped, timer, logged_step = 0, time.time(), step
    log(f"training steps {step} -> {total_steps}, global batch {args.batch_size * world_size * accum}")
    while step < total_steps:
        weight = align_weight(step, args.align_weight, args.align_decay_start, args.align_decay_steps)
        epoch, skip = train_step(model, ema, opt, scaler, ema_pairs, data, args, diffusion, generator, autocast,
                                 weight, sums, nan=args.fault_nan_at == step + 1)
        skipped, step = skipped + skip, step + 1
        log_now, save_now = step % args.log_every == 0 or step == total_steps, step % args.checkpoint_steps == 0
        stopping = bool(stop) and not ddp  # under DDP the ranks agree on stopping at log steps (below)
        if log_now or save_now or stopping:  # the only host-device syncs of the loop
            stats = sums.clone()
            if ddp:
                dist.all_reduce(stats)
                stats /= world_size
            if stats[4] > 0:  # never checkpoint non-finite weights
                raise UserError(f"non-finite loss by step {step}; stopping. Last good checkpoint: "
                                f"{last_ckpt or 'none yet'} (resume from it, perhaps with a lower learning rate)")
        if log_now:
            n, elapsed = step - logged_step, time.time() - timer
            denoise, align, cos, grad = (stats[:4] / n).tolist()
            images_per_s = n * args.batch_size * world_size * accum / elapsed
            log(f"step {step}/{total_steps} | loss {denoise + weight * align:.4f} | denoise {denoise:.4f} | align "
                f"{align:.4f} (cos {cos:.3f}) | grad {grad:.3f} | {n / elapsed:.2f} it/s {images_per_s:.1f} img/s"
                f" | ETA {(total_steps - step) * elapsed / n / 60:.1f} min")
            if rank == 0:
                metrics.write(json.dumps(dict(step=step, epoch=epoch, gen_loss=denoise, align_loss=align,
                                              align_cos=cos, align_weight=weight, grad_norm=grad,
                                              lr=opt.param_groups[0]["lr"], img_per_s=images_per_s,
                                              skipped_steps=int(skipped))) + "\n")
            sums.zero_()
            timer, logged_step = time.time(), step
            if ddp:  # every rank must stop at the same step
                flag = torch.tensor([float(bool(stop))], device=device)
                dist.all_reduce(flag)
                stopping = flag.item() > 0
        if save_now or step == total_steps or stopping:
            checkpoint()
        if rank == 0 and args.sample_steps and step % args.sample_steps == 0:
            import sample  # image making (samplers, VAE, grids) lives in sample.py
            sample.training_grid(ema, args, step, device, run_dir, log)
        if stopping:
            log(f"received SIGTERM: checkpoint {last_ckpt} written at step {step}; continue with --resume auto")
            break
    log(f"done: {step} steps, last checkpoint {last_ckpt}")
    if ddp:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Benchmark (--bench): step time, images/s, MFU and the SRA overhead, on synthetic batches

PEAK_TFLOPS = {"A100": 312, "H100": 989, "H200": 989}  # dense bf16/fp16 tensor-core peaks (SXM parts)

def forward_flops(model, depth=None):
    """FLOPs (2 per multiply-add; DiT's "118.6 GFLOPs" count multiply-adds) of one image's forward through
    `depth` blocks or all of them and the final layer. Per block: qkv, proj and MLP matmuls 24*T*D^2,
    attention 4*T^2*D, adaLN 12*D^2; patch embedding 2*T*p^2*C*D; final layer 2*T*D*p^2*C_out + 4*D^2."""
    T, D, p = (model.input_size // model.patch_size) ** 2, model.hidden_size, model.patch_size
    flops = (depth or model.depth) * (24 * T * D * D + 4 * T * T * D + 12 * D * D) + 2 * T * p * p * model.in_channels * D
    return flops + (2 * T * D * p * p * model.out_channels + 4 * D * D if depth is None else 0)

def train_flops(model, args):
    """Per image: 3 forwards (forward + backward), and for SRA the projector (3 x 8*T*D^2) and the teacher."""
    T = (model.input_size // model.patch_size) ** 2
    sra_flops = 24 * T * model.hidden_size ** 2 + forward_flops(model, args.block_out_t)
    return 3 * forward_flops(model) + (0 if args.no_sra else sra_flops)

def median_time(fn, repeats, warmup, device):
    """(median, min, max) wall-clock seconds of fn() after `warmup` untimed calls."""
    times = []
    for _ in range(warmup + repeats):
        torch.cuda.synchronize() if device.type == "cuda" else None
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize() if device.type == "cuda" else None
        times.append(time.perf_counter() - start)
    times = sorted(times[warmup:])
    return times[len(times) // 2], times[0], times[-1]

def bench(args):
    """Time the vanilla and the SRA training step (and optionally the sampler); print one JSON line each."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    C, H, W = args.bench_shape or (4, (args.resolution or 256) // 8, (args.resolution or 256) // 8)
    if H != W or H % int(args.model.split("/")[1]):
        raise UserError(f"--bench-shape needs square inputs divisible by the patch of {args.model}")
    args.dataset, args.num_classes, args.in_channels, args.input_size, B = "bench", 1000, C, H, args.batch_size
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    data = itertools.repeat((0, (torch.randn(B, C, H, W), torch.randint(0, 1000, (B,)))))
    steps, diffusion = args.bench_steps or (20 if device.type == "cuda" else 3), GaussianDiffusion.linear()
    for no_sra in (True, False):  # the vanilla step first: the SRA one reports its ratio to it
        args.no_sra = no_sra  # build() and train_step() read it from args
        model, ema, pairs, opt, scaler = build(args, device)
        net, sums = torch.compile(model) if args.compile else model, torch.zeros(5, device=device)
        generator = torch.Generator(device).manual_seed(0)
        torch.cuda.reset_peak_memory_stats() if device.type == "cuda" else None
        med, low, high = median_time(lambda: train_step(net, ema, opt, scaler, pairs, data, args, diffusion,
                                                        generator, autocast, args.align_weight, sums), steps, 2, device)
        flops = train_flops(model, args)
        r = dict(model=args.model, sra=not args.no_sra, batch=B, shape=[C, H, W], dtype=args.mixed_precision,
                 device=name, compile=args.compile, grad_checkpointing=args.grad_checkpointing, step_s_median=med,
                 step_s_min=low, step_s_max=high, img_per_s=B / med,
                 peak_mem_gb=torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else None,
                 flops_per_img=flops, tflops=flops * B / med / 1e12, mfu=flops * B / med / 1e12 / peak if peak else None)
        if not args.no_sra:  # where the SRA step's time goes: teacher forward, EMA update, optimizer step
            (x, y), t = (v.to(device) for v in next(data)[1]), torch.rand(B, device=device)
            teacher = torch.no_grad()(autocast(lambda: ema.forward_features(x, t, y, args.block_out_t)))
            for p in opt.param_groups[0]["params"]:  # zero_grad dropped the gradients: AdamW would skip them
                p.grad = torch.zeros_like(p)
            for part, fn in (("teacher", teacher), ("ema", lambda: update_ema(*pairs, args.ema_decay)),
                             ("optimizer", opt.step)):
                r[f"{part}_frac"] = median_time(fn, steps, 1, device)[0] / med
            r.update(sra_overhead_ratio=med / vanilla["step_s_median"], flop_ratio=flops / vanilla["flops_per_img"])
        vanilla = r
        print(json.dumps(r), flush=True)
    if args.bench_sample:  # the paper's sampler: SDE (DDPM for DiT) with CFG 1.8 on t in [0, 0.7]
        import sample
        z, y, mode = torch.randn(B, C, H, W, device=device), torch.arange(B, device=device) % 1000, \
            "ddpm" if args.family == "DiT" else "sde"
        seconds = median_time(lambda: sample.generate(ema, z, y, mode=mode, num_steps=args.bench_sample, cfg_scale=1.8,
                                                      guidance_high=0.7), 1, 0, device)[0]
        print(json.dumps(dict(model=args.model, sampler=mode, num_steps=args.bench_sample, cfg_scale=1.8, batch=B,
                              device=name, seconds=seconds, img_per_s=B / seconds)), flush=True)


# ----------------------------------------------------------------------------------------------------
# Command line (flags of the official train.py are accepted unchanged)

def parse_args(argv=None):
    """Parse and validate the flags; fill the model-dependent defaults (block pair, align weight, precision)."""
    p = argparse.ArgumentParser(description="Train DiT/SiT with Self-Representation Alignment (SRA).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = p.add_argument
    # model and objective
    add("--model", default="SiT-XL/2", help=f"one of {', '.join(MODELS)}")
    add("--path-type", default="linear", choices=["linear", "cosine", "cos"], help="SiT interpolant")
    add("--prediction", default="v", choices=["v"], help="SiT predicts the velocity")
    add("--weighting", default="uniform", choices=["uniform", "lognormal"], help="SiT time sampling")
    add("--learn-sigma", action=argparse.BooleanOptionalAction, help="predict the variance (default: DiT yes, SiT no)")
    add("--cfg-prob", type=float, default=0.1, help="label dropout probability (for CFG)")
    add("--num-classes", type=int, default=None, help="default: inferred from the data")
    # SRA
    add("--no-sra", action="store_true", help="vanilla baseline: no teacher, no projector")
    add("--block-out-s", type=int, default=None, help="student block, 1-based (default: the paper's)")
    add("--block-out-t", type=int, default=None, help="teacher block, 1-based (default: the paper's)")
    add("--t-max", type=float, default=0.2, help="teacher time t' = t - t_max * U(0, 1)")
    add("--loss-type", default="sml1", choices=["sml1", "cos"], help="alignment distance")
    add("--align-weight", type=float, default=None, help="lambda (default 0.2 SiT / 0.04 DiT / 0.5 cos)")
    add("--align-decay-start", type=int, default=149 * 5004, help="step after which lambda decays (official: "
        "epoch 149 at batch 256)")
    add("--align-decay-steps", type=int, default=1000 * 5004, help="steps per tenfold decay of lambda (0: never)")
    add("--ema-decay", type=float, default=0.9999, help="EMA (teacher) decay per optimizer step")
    # data
    add("--data-dir", default=None, help="image folder, folder holding vae-sd/, or CIFAR-10 root; none: built-in")
    add("--dataset", choices=["builtin", "cifar10", "folder", "latents"], help="data kind (default: inferred)")
    add("--resolution", type=int, default=None, help="image resolution (default 256; 32 built-in and CIFAR)")
    add("--num-workers", type=int, default=min(4, (os.cpu_count() or 2) // 2), help="DataLoader workers per process")
    # optimisation
    add("--batch-size", type=int, default=32, help="per process (the paper: 32 x 8 GPUs)")
    add("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step")
    add("--epochs", type=int, default=1400, help="stop after this many epochs ...")
    add("--max-train-steps", type=int, default=400_000, help="... or this many optimizer steps")
    add("--learning-rate", type=float, default=1e-4, help="AdamW, constant")
    add("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    add("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    add("--adam-weight-decay", type=float, default=0.0, help="AdamW weight decay")
    add("--adam-epsilon", type=float, default=1e-8, help="AdamW epsilon")
    add("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    # precision and speed
    add("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"], help="auto: bf16 if the GPU "
        "has it, else fp32")
    add("--allow-tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs")
    add("--compile", action="store_true", help="torch.compile the model")
    add("--grad-checkpointing", action="store_true", help="recompute blocks in backward: less memory")
    # run, logging, checkpoints
    add("--output-dir", default="exps", help="runs go to <output-dir>/<exp-name>/")
    add("--exp-name", default=None, help="run folder name (default: from the model name)")
    add("--seed", type=int, default=0, help="process seed = seed * world_size + rank")
    add("--log-every", type=int, default=100, help="steps between log lines and metrics")
    add("--checkpoint-steps", type=int, default=50_000, help="steps between checkpoints")
    add("--sample-steps", type=int, default=10_000, help="steps between EMA sample grids (0: never)")
    add("--resume", "--resume-ckpt", default=None, help="checkpoint path, or `auto`: the newest in the run folder")
    add("--keep-last", type=int, default=0, help="keep only the newest K step checkpoints (0: all)")
    add("--keep-every", type=int, default=0, help="never delete checkpoints at multiples of this step")
    add("--dist-timeout", type=int, default=1800, help="seconds before a stuck collective fails")
    # benchmark
    add("--bench", action="store_true", help="time SRA and vanilla steps on synthetic data, print JSON")
    add("--bench-shape", type=int, nargs=3, metavar=("C", "H", "W"), help="default 4 x resolution/8 x resolution/8")
    add("--bench-steps", type=int, default=0, help="timed steps (default 20 on GPU, 3 on CPU)")
    add("--bench-sample", type=int, default=0, metavar="STEPS", help="also time SDE sampling, CFG 1.8 (paper: 250)")
    add("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs)")
    add("--fault-nan-at", type=int, default=0, help=argparse.SUPPRESS)  # test hook: a NaN loss at this step
    args = p.parse_args(argv)

    if args.model not in MODELS:
        raise UserError(f"unknown model {args.model!r}; valid: {', '.join(MODELS)}")
    args.family, args.path_type = args.model.split("-")[0], "cosine" if args.path_type == "cos" else args.path_type
    args.learn_sigma = args.family == "DiT" if args.learn_sigma is None else args.learn_sigma
    s, t = default_blocks(args.model)
    args.block_out_s = s if args.block_out_s is None else args.block_out_s
    args.block_out_t = t if args.block_out_t is None else args.block_out_t
    depth = SIZES[args.model.split("-")[1].split("/")[0]][0]
    for flag, block in (("--block-out-s", args.block_out_s), ("--block-out-t", args.block_out_t)):
        if not 1 <= block <= depth:
            raise UserError(f"{flag} {block} is out of range: {args.model} has blocks 1..{depth}")
    if args.align_weight is None:
        args.align_weight = 0.5 if args.loss_type == "cos" else (0.2 if args.family == "SiT" else 0.04)
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    args.exp_name = args.exp_name or args.model.replace("/", "-") + ("-vanilla" if args.no_sra else "-sra")
    for flag in ("batch_size", "gradient_accumulation_steps", "log_every", "checkpoint_steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    return args

def error_line(e):
    """One line for the user: a worker's re-raised error carries a traceback; keep its last line."""
    text = str(e).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1].split("Error: ", 1)[-1]
    return text.splitlines()[0] if text else type(e).__name__


if __name__ == "__main__":
    try:
        args = parse_args()
        bench(args) if args.bench else main(args)
    except UserError as e:
        print(f"error: {error_line(e)}", file=sys.stderr)
        sys.exit(2)
