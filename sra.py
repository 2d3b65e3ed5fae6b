"""SRA: Self-Representation Alignment for diffusion transformers, in one file.

Jiang et al., "No Other Representation Component Is Needed: Diffusion Transformers Can Provide
Representation Guidance by Themselves" (arXiv 2505.02831). SRA adds one term to DiT/SiT training:
the network's hidden state after an early block, through a small projector, is pulled towards the
hidden state after a later block of the network's own EMA, which sees a less noisy version of the
same image. No external encoder (DINOv2, CLIP, MAE) is needed.

Run recipes
    # a CPU and ten minutes: the built-in procedural data, nothing to download; then pictures
    python sra.py --model SiT-T/4 --batch-size 32 --learning-rate 2e-3 --ema-decay 0.99 \
        --max-train-steps 1500 --checkpoint-steps 500 --exp-name demo
    python sample.py --ckpt exps/demo/checkpoints/0001500.pt --grid
    # one GPU, CIFAR-10 in pixel space
    python sra.py --model SiT-B/2 --dataset cifar10 --data-dir data/cifar10 --batch-size 128 \
        --max-train-steps 400000
    # 8 GPUs, ImageNet 256 as SD-VAE latents (--batch-size is per process: 32 x 8 = 256): encode
    # the JPEGs once (resumable), then train on the latents
    torchrun --nproc_per_node=8 sra.py --encode data/imagenet256 --data-dir data/imagenet/train
    torchrun --nproc_per_node=8 sra.py --model SiT-XL/2 --data-dir data/imagenet256
    # two nodes (run this on both, R = 0 and 1): half the batch per process keeps 256
    torchrun --nnodes=2 --node_rank=R --nproc_per_node=8 --rdzv_backend=c10d \
        --rdzv_endpoint=HOST:29500 sra.py --model SiT-XL/2 --data-dir data/imagenet256 \
        --batch-size 16
    # the benchmark: this file's training loop on synthetic batches, vanilla then SRA
    python sra.py --bench --model SiT-XL/2 --batch-size 32

Notable choices
    * Time runs from t = 0 (data) to t = 1 (noise), as in SRA and REPA (the SiT repo is reversed).
    * Student: the hidden state after block `block_out_s` (1-based), through the projector.
      Teacher: the raw hidden state after block `block_out_t` of the EMA, which stops there.
    * Teacher time t' = clamp(t - t_max * u, 0, 1), u ~ U(0, 1): less noise, the same noise
      sample, the same labels after label dropout.
    * Loss `sml1` (smooth-L1, beta 0.05; the paper) or `cos` (1 - cosine per token, over the
      feature axis, as the paper describes; the official code's ran over the token axis).
    * EMA decay 0.9999, an exact copy of the model at step 0, updated after every optimizer step.
"""
import argparse
import contextlib
import glob
import itertools
import json
import math
import os
import shutil
import signal
import statistics
import sys
import threading
import time
from collections import OrderedDict
from datetime import timedelta
from functools import partial
from operator import methodcaller
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint  # (not imported by `import torch` before PyTorch 2.6)
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm import tqdm


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2."""


# ==================================================================================================
# Embedders: patches, timesteps, positions
# ==================================================================================================

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
        """Sinusoid of t (N,) at frequencies exp(-ln(max_period) i / (dim/2)); cos first, then sin.

        DiT feeds integer steps 0..999 here, SiT the time t in [0, 1] as it is (not times 1000).
        """
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]  # (N, dim/2)
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, dim)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))  # (N, D)


def get_2d_sincos_pos_embed(embed_dim, grid_size):
    """MAE's fixed 2D sin-cos table (T, D), in float64, for tokens in row-major order.

    Entries [0, D/2) encode the column and [D/2, D) the row; each half holds D/4 sines, then D/4
    cosines, of position * omega_i with omega_i = 10000^(-i / (D/4)).
    """
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))
    # token k sits at row k // G, column k % G
    rows, cols = np.divmod(np.arange(grid_size * grid_size, dtype=np.float64), grid_size)
    angles = [np.outer(position, omega) for position in (cols, rows)]  # 2 x (T, D/4)
    return np.concatenate([f(a) for a in angles for f in (np.sin, np.cos)], axis=1)  # (T, D)


# ==================================================================================================
# The transformer: attention, adaLN-Zero block, final layer, the model table
# ==================================================================================================

class Attention(nn.Module):
    """Multi-head self-attention: a fused qkv projection and PyTorch's fused attention kernel."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        N, T, D = x.shape
        q, k, v = self.qkv(x).view(N, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        # q, k, v: (N, heads, T, D / heads) each
        x = F.scaled_dot_product_attention(q, k, v)  # flash / memory-efficient kernels on GPUs
        return self.proj(x.transpose(1, 2).reshape(N, T, D))  # (N, T, D)


def mlp(dim, hidden_dim, activation, names):
    """Linear -> activation -> Linear, its two layers named as in the released checkpoints."""
    return nn.Sequential(OrderedDict([(names[0], nn.Linear(dim, hidden_dim)), ("act", activation),
                                      (names[1], nn.Linear(hidden_dim, dim))]))


class Block(nn.Module):
    """Transformer block with adaLN-Zero: c gives a shift, scale and gate for each branch."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        # LayerNorms without affine parameters: adaLN supplies the scale and shift
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        gelu = nn.GELU(approximate="tanh")
        self.mlp = mlp(hidden_size, int(hidden_size * mlp_ratio), gelu, ("fc1", "fc2"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c):
        modulation = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        # each branch sees the normalised tokens modulated by c; its output is gated by c
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a Linear to the p * p * C_out values of each patch."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p * p * C_out)


class DiT(nn.Module):
    """The transformer of DiT and SiT, with the parameter names of the released checkpoints.

    model(x, t, y) -> (N, C_out, H, W); with block_out_s it also returns the SRA student: the
    hidden state after that block, through the projector `ap_head`. The projector exists only with
    projector=True, so released weights load strictly without it.
    """

    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 learn_sigma=True, projector=False):
        super().__init__()
        if input_size % patch_size:
            raise UserError(f"input size {input_size} is not divisible by patch size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels  # 2C: eps and variance
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        self.grad_checkpointing = False
        # p x p patches -> D channels: a conv with kernel = stride = p
        patchify = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.x_embedder = nn.Sequential(OrderedDict(proj=patchify))
        self.t_embedder = TimestepEmbedder(hidden_size)
        # Label -> D. Row `num_classes` is the null class of classifier-free guidance; labels are
        # dropped in training_losses (not here), so the teacher sees exactly the student's labels.
        table = nn.Embedding(num_classes + int(class_dropout_prob > 0), hidden_size)
        self.y_embedder = nn.Sequential(OrderedDict(embedding_table=table))
        num_patches = (input_size // patch_size) ** 2
        # fixed sin-cos positions, not trained (a parameter only because the checkpoints say so)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        # SRA's projector on the student's features: Linear(D, 2D) -> SiLU -> Linear(2D, D)
        names = ("linear1", "linear2")
        self.ap_head = mlp(hidden_size, 2 * hidden_size, nn.SiLU(), names) if projector else None
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init. adaLN and the final Linear are zeroed: every block starts as the identity
        and a fresh model outputs exactly zero (adaLN-Zero)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        pos = get_2d_sincos_pos_embed(self.hidden_size, self.input_size // self.patch_size)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float().unsqueeze(0))
        weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))  # the conv as a Linear
        nn.init.zeros_(self.x_embedder.proj.bias)
        for weight in (self.y_embedder.embedding_table.weight, self.t_embedder.mlp[0].weight,
                       self.t_embedder.mlp[2].weight):
            nn.init.normal_(weight, std=0.02)
        final = self.final_layer
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [final.adaLN_modulation[-1],
                                                                     final.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x):
        """(N, T, p * p * C) -> (N, C, H, W)."""
        p, c = self.patch_size, self.out_channels
        h = self.input_size // p  # patches per side
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(len(x), h, h, p, p, c))
        return x.reshape(len(x), c, h * p, h * p)

    def embed(self, x, t, y):
        """Tokens (N, T, D) with positions added, and the conditioning c = t_emb + y_emb (N, D)."""
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2)  # (N, D, H/p, W/p) -> (N, T, D)
        return tokens + self.pos_embed, self.t_embedder(t) + self.y_embedder(y)

    def forward(self, x, t, y, block_out_s=None):
        x, c = self.embed(x, t, y)  # (N, T, D), (N, D)
        features = None
        for i, block in enumerate(self.blocks, start=1):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                # keep only the block's input; recompute its insides during backward
                x = torch.utils.checkpoint.checkpoint(block, x, c, use_reentrant=False)
            else:
                x = block(x, c)  # (N, T, D)
            if i == block_out_s:
                features = self.ap_head(x)  # SRA student: projected hidden state after block s
        x = self.unpatchify(self.final_layer(x, c))  # (N, C_out, H, W)
        return x if block_out_s is None else (x, features)

    def forward_features(self, x, t, y, depth):
        """The SRA teacher: the hidden state (N, T, D) after block `depth` (1-based). Only blocks
        1..depth run; the official code ran them all and the final layer, then threw that away."""
        x, c = self.embed(x, t, y)
        for block in self.blocks[:depth]:
            x = block(x, c)
        return x


# Depth, width and heads of the paper's S, B, L, XL, and T: a 6-block model of ours for CPU runs
SIZES = {"T": (6, 192, 3), "S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16),
         "XL": (28, 1152, 16)}


def build_model(family, size, patch, input_size=32, in_channels=4, num_classes=1000,
                class_dropout_prob=0.1, learn_sigma=None, **kwargs):
    """The constructor behind MODELS["<family>-<size>/<patch>"].

    learn_sigma defaults to on for DiT (its variance is learned) and off for SRA's SiT (C_out = C).
    """
    depth, width, heads = SIZES[size]
    learn_sigma = family == "DiT" if learn_sigma is None else learn_sigma
    return DiT(input_size, patch, in_channels, width, depth, heads, num_classes=num_classes,
               class_dropout_prob=class_dropout_prob, learn_sigma=learn_sigma, **kwargs)


MODELS = {f"{family}-{size}/{patch}": partial(build_model, family, size, patch)
          for family in ("SiT", "DiT") for size in SIZES for patch in (2, 4, 8)}

# SRA's block pairs (student block_out_s -> teacher block_out_t), 1-based, from the paper. S models
# have the depth of B and use its pairs; T (6 blocks) takes the authors' rule of thumb,
# depth/4 -> 3 depth/4, that is 1 -> 4.
BLOCK_PAIRS = {"SiT-S": (3, 8), "SiT-B": (3, 8), "SiT-L": (6, 16), "SiT-XL": (8, 20),
               "DiT-S": (3, 7), "DiT-B": (3, 7), "DiT-L": (6, 14), "DiT-XL": (8, 16)}


# ==================================================================================================
# Objectives: the SiT interpolant (flow matching) and the DDPM of DiT
# ==================================================================================================

def mean_flat(x):
    """Mean over every axis but the batch axis."""
    return x.mean(dim=list(range(1, x.ndim)))


def interpolant(t, path_type="linear"):
    """x_t = alpha_t * x + sigma_t * eps, t = 0 data, t = 1 noise.

    Returns alpha_t, sigma_t and their time derivatives; the velocity target of SiT is
    d_alpha_t * x + d_sigma_t * eps.
    """
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    # else cosine, or `cos`: the official trainer accepts that spelling; its loss knew `cosine`
    # (--path-type takes nothing else, and sample.py checks a checkpoint's when it loads it)
    a = math.pi / 2
    return torch.cos(a * t), torch.sin(a * t), -a * torch.sin(a * t), a * torch.cos(a * t)


def sample_time(N, weighting, path_type, device, generator):
    """Training times: uniform on [0, 1], or lognormal (s = e^n, n ~ N(0, 1), mapped to [0, 1])."""
    if weighting == "uniform":
        return torch.rand(N, device=device, generator=generator)
    s = torch.exp(torch.randn(N, device=device, generator=generator))
    return s / (1 + s) if path_type == "linear" else 2 / math.pi * torch.atan(s)


def approx_standard_normal_cdf(x):
    """The tanh approximation of the standard normal CDF that DiT's likelihood uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log P(x) for data in [-1, 1] quantised to 256 bins, under N(means, exp(2 log_scales))."""
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (x - means + 1 / 255))  # the bin's edges
    cdf_min = approx_standard_normal_cdf(inv_stdv * (x - means - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))  # the lowest bin extends to -inf
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))  # the highest to +inf
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    inner = torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta)
    return torch.where(x < -0.999, log_cdf_plus, inner)


class GaussianDiffusion:
    """DDPM with a learned-range variance, as DiT trains and samples it.

    Every table is float64 and lives on the device of `betas`, so a training step indexes it there
    without a copy.
    """

    def __init__(self, betas):
        self.betas = betas = torch.as_tensor(betas, dtype=torch.float64)
        self.num_timesteps = len(betas)
        ac = torch.cumprod(1 - betas, dim=0)  # abar_t, the fraction of signal left at step t
        ac_prev = torch.cat([torch.ones_like(ac[:1]), ac[:-1]])  # abar_{t-1}
        self.alphas_cumprod = ac
        # q(x_{t-1} | x_t, x_0): its variance (beta tilde) and the two coefficients of its mean.
        # The variance at t = 0 is 0, whose log is -inf: DiT takes the one at t = 1 instead.
        self.posterior_variance = betas * (1 - ac_prev) / (1 - ac)
        variance = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([variance[1:2], variance[1:]]))
        self.posterior_mean_coef1 = betas * ac_prev.sqrt() / (1 - ac)
        self.posterior_mean_coef2 = (1 - ac_prev) * (1 - betas).sqrt() / (1 - ac)

    @classmethod
    def linear(cls, num_timesteps=1000, device="cpu"):
        """DDPM's linear schedule, beta from 1e-4 to 0.02 (scaled for other step counts)."""
        scale = 1000 / num_timesteps
        return cls(torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64,
                                  device=device))

    @staticmethod
    def _per_sample(values, x):
        """Per-sample values (N,) in x's dtype, shaped (N, 1, 1, 1) to broadcast against x."""
        return values.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))

    def q_sample(self, x0, t, noise):
        """x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), with the given noise."""
        ac = self.alphas_cumprod[t]  # (N,) in float64: the roots are taken before the cast
        return self._per_sample(ac.sqrt(), x0) * x0 + self._per_sample((1 - ac).sqrt(), x0) * noise

    def q_posterior(self, x0, xt, t):
        """Mean and log-variance of the true posterior q(x_{t-1} | x_t, x_0)."""
        mean = (self._per_sample(self.posterior_mean_coef1[t], xt) * x0
                + self._per_sample(self.posterior_mean_coef2[t], xt) * xt)
        return mean, self._per_sample(self.posterior_log_variance_clipped[t], xt)

    def p_mean_variance(self, model_output, xt, t):
        """The model's p(x_{t-1} | x_t) -> mean, log-variance and the predicted x_0.

        The model's 2C output channels are eps, then a value in [-1, 1] that interpolates the
        log-variance between log beta_t and log beta tilde_t ("learned range").
        """
        C = xt.shape[1]
        frac = (model_output[:, C:] + 1) / 2  # in [0, 1]
        log_var = (frac * self._per_sample(self.betas[t].log(), xt)
                   + (1 - frac) * self._per_sample(self.posterior_log_variance_clipped[t], xt))
        ac = self.alphas_cumprod[t]  # x_0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)
        x0 = (self._per_sample((1 / ac).sqrt(), xt) * xt
              - self._per_sample((1 / ac - 1).sqrt(), xt) * model_output[:, :C])
        return self.q_posterior(x0, xt, t)[0], log_var, x0

    def training_losses(self, model_output, x0, xt, t, noise):
        """Per-sample DiT loss: MSE on eps, plus (with a learned variance) the variational bound."""
        C = x0.shape[1]
        mse = mean_flat((noise - model_output[:, :C]) ** 2)
        if model_output.shape[1] != 2 * C:
            return mse
        # The bound sees a detached eps, so that it trains only the variance (Improved DDPM, DiT)
        frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
        mean, log_var, _ = self.p_mean_variance(frozen, xt, t)
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        # KL(q || p) of two Gaussians in nats, turned into bits per dimension
        kl = mean_flat(0.5 * (-1 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                              + (true_mean - mean) ** 2 * torch.exp(-log_var))) / math.log(2.0)
        # at t = 0 the bound is the decoder's likelihood of x_0 instead
        log_likelihood = discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
        nll = -mean_flat(log_likelihood) / math.log(2.0)
        return mse + torch.where(t == 0, nll, kl)


# ==================================================================================================
# SRA: the EMA teacher, the alignment loss, and one training batch
# ==================================================================================================

@torch.no_grad()
def update_ema(ema_params, model_params, decay=0.9999):
    """ema <- decay * ema + (1 - decay) * model, as two fused multi-tensor ops.

    The EMA is SRA's teacher: a slowly moving average of the student, so its features are a
    stable target.
    """
    torch._foreach_mul_(ema_params, decay)
    torch._foreach_add_(ema_params, model_params, alpha=1 - decay)


def align_loss(student, teacher, loss_type="sml1"):
    """SRA's distance between the projected student tokens and the teacher tokens (N, T, D).

    `sml1` is smooth-L1 with beta 0.05 over all elements (the paper); `cos` is 1 - cosine
    similarity per token over the feature axis. Also returns the mean per-token cosine (logged).
    """
    student, teacher = student.float(), teacher.float()  # fp16 normalisation can give NaNs
    cos = F.cosine_similarity(student, teacher, dim=-1)  # (N, T)
    if loss_type == "cos":
        return (1 - cos).mean(), cos.detach().mean()
    return F.smooth_l1_loss(student, teacher, beta=0.05), cos.detach().mean()


def align_weight(step, weight, decay_start, decay_steps):
    """lambda, decayed tenfold every `decay_steps` steps after step `decay_start` (0: never)."""
    return weight * 0.1 ** (max(0, step - decay_start) / decay_steps) if decay_steps > 0 else weight


def training_losses(model, ema, x, y, args, diffusion, generator):
    """One batch -> (denoising loss, SRA alignment loss, mean cosine), all device scalars.

    Draws from `generator`, in this order: label dropout, noise, student time, teacher offset.
    """
    N, device = len(x), x.device
    # Label dropout (for classifier-free guidance), here rather than inside the model, so that a
    # dropped label stays dropped for the teacher too
    drop = torch.rand(N, device=device, generator=generator) < args.cfg_prob
    y = torch.where(drop, ema.num_classes, y)
    noise = torch.randn(x.shape, device=device, generator=generator)
    if args.family == "SiT":
        t = sample_time(N, args.weighting, args.path_type, device, generator)  # (N,)
        alpha, sigma, d_alpha, d_sigma = interpolant(t.view(-1, 1, 1, 1), args.path_type)
        x_t = alpha * x + sigma * noise  # (N, C, H, W)
        target = d_alpha * x + d_sigma * noise  # the velocity
        # The teacher sees the same image and the same noise at an earlier time t' <= t (less noise)
        t_teacher = (t - args.t_max * torch.rand(N, device=device, generator=generator)).clamp(0, 1)
        alpha, sigma, _, _ = interpolant(t_teacher.view(-1, 1, 1, 1), args.path_type)
        x_teacher = alpha * x + sigma * noise
    else:
        T = diffusion.num_timesteps
        t = torch.randint(0, T, (N,), device=device, generator=generator)
        x_t = diffusion.q_sample(x, t, noise)
        # DiT: t' = t - j with j uniform in [0, t_max * T), clamped at step 1 as the official code
        offset = torch.randint(0, max(1, round(args.t_max * T)), (N,), device=device,
                               generator=generator)
        t_teacher = (t - offset).clamp(1, T - 1)
        x_teacher = diffusion.q_sample(x, t_teacher, noise)
    if args.no_sra:  # vanilla: no projector, no teacher, no alignment term
        output = model(x_t, t, y)
        align, cos = x.new_zeros(()), x.new_zeros(())
    else:
        output, student = model(x_t, t, y, block_out_s=args.block_out_s)  # student: (N, T, D)
        with torch.no_grad():  # stop-gradient: the teacher is never trained, only averaged
            teacher = ema.forward_features(x_teacher, t_teacher, y, args.block_out_t)  # (N, T, D)
        align, cos = align_loss(student, teacher, args.loss_type)
    if args.family == "SiT":
        denoise = mean_flat((output[:, :x.shape[1]].float() - target) ** 2)
    else:
        denoise = diffusion.training_losses(output.float(), x, x_t, t, noise)
    return denoise.mean(), align, cos


# ==================================================================================================
# Data: built-in shapes, CIFAR-10, image folders, pre-encoded SD-VAE latents
# ==================================================================================================

class ShapesDataset(torch.utils.data.Dataset):
    """Built-in data: 10 classes of coloured shapes on a shaded background, drawn on the fly.

    Classes 0-4 are a filled disc, square, diamond, cross and bar, classes 5-9 their outlines,
    each class in its own hue. The index seeds the jitter (position, size, hue, background), so
    an index always gives the same image. Nothing to download; a small model learns it on a CPU.
    """

    def __init__(self, resolution=32):
        self.resolution = resolution

    def __len__(self):
        return 50_000  # an "epoch", as CIFAR-10's

    def __getitem__(self, index):
        rng = np.random.default_rng(index)
        label = index % 10
        R = self.resolution
        yy, xx = (np.mgrid[0:R, 0:R] + 0.5) / R  # pixel centres in (0, 1), each (R, R)
        # centres jitter by 0.04 and outlines are 0.5 s thick (were 0.12 and 0.4 s): the README's
        # 2,000-step CPU demo then draws every class's shape, where thin rings broke up into blocks
        dx = abs(xx - 0.5 - rng.uniform(-0.04, 0.04))  # distances to a jittered centre
        dy = abs(yy - 0.5 - rng.uniform(-0.04, 0.04))
        # each shape is where a distance from the centre is below the size s
        distance = [np.hypot(dx, dy), np.maximum(dx, dy), dx + dy,
                    np.minimum(np.maximum(dx, 3 * dy), np.maximum(3 * dx, dy)),
                    np.maximum(1.7 * dx, dy)][label % 5]
        s = rng.uniform(0.24, 0.32)
        inside = (distance < s) & (distance > (0.5 * s if label >= 5 else -1))  # 5-9: outlines
        hue = label / 10 + rng.uniform(-0.02, 0.02)
        color = 0.5 + 0.5 * np.cos(2 * np.pi * (hue + np.array([0, 1 / 3, 2 / 3])))  # (3,) RGB
        shade = rng.uniform(0.1, 0.3) + 0.1 * (xx - 0.5)  # (R, R) background
        image = np.where(inside[..., None], color * rng.uniform(0.8, 1.0), shade[..., None])
        return torch.from_numpy(image.transpose(2, 0, 1) * 2 - 1).float(), label  # (3, R, R)


def center_crop_arr(image, resolution):
    """ADM's center crop: box-downsample while the short side >= 2 * resolution, then bicubic to
    the resolution on the short side, then crop the centre. PIL image -> (R, R, 3) uint8 array."""
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    arr = np.array(image.resize(tuple(round(x * scale) for x in image.size), Image.BICUBIC))
    top, left = (arr.shape[0] - resolution) // 2, (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution]


def to_tensor(image):
    """An RGB image (PIL or (H, W, 3) uint8 array) -> (3, H, W) float tensor in [-1, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1


def load_image(path, resolution):
    """ImageFolder's loader: the ADM crop, then to_tensor; a file that does not decode is a
    one-line error naming it."""
    try:
        with Image.open(path) as image:
            return to_tensor(center_crop_arr(image.convert("RGB"), resolution))
    except Exception as e:
        raise UserError(f"cannot read image {path}: {e}") from None


class LatentDataset(torch.utils.data.Dataset):
    """Pre-encoded ImageNet as SRA/REPA/EDM2 write it: vae-sd/dataset.json and one .npy per image
    of shape (8, R/8, R/8), the SD-VAE posterior's mean and std stacked on the channel axis.

    Items are returned as stored (fp16 stays fp16); prepare_batch draws the latent on the device.
    A file is opened only when it is read, so start-up does not touch 1.28M files; a missing or
    bad one is reported then, by name.
    """

    def __init__(self, root, resolution):
        meta = os.path.join(root, "vae-sd", "dataset.json")
        try:
            with open(meta) as f:
                labels = json.load(f)["labels"]
            self.files = [(os.path.join(root, "vae-sd", p), int(label)) for p, label in labels]
            self.num_classes = 1 + max(label for _, label in self.files)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"cannot read {meta} ({e}): expected a non-empty "
                            f"{{\"labels\": [[path, class], ...]}}") from None
        self.shape = (8, resolution // 8, resolution // 8)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path, label = self.files[index]
        try:
            moments = np.load(path)
        except Exception as e:
            raise UserError(f"cannot read latent file {path}: {e}") from None
        # (8, h, w), or (1, 8, h, w) as EDM2's tool writes it
        if moments.shape[-3:] != self.shape or moments.size != np.prod(self.shape):
            raise UserError(f"latent file {path} has shape {moments.shape}, expected {self.shape} "
                            f"(VAE mean and std at resolution/8): check --resolution")
        return torch.from_numpy(np.ascontiguousarray(moments.reshape(self.shape))), label


def build_dataset(args):
    """The data that --dataset / --data-dir name. Fills in args.dataset (the kind), resolution,
    num_classes, and the model's in_channels and input_size."""
    from torchvision import datasets
    kind = args.dataset
    if kind is None:  # inferred: no folder -> built-in; a folder with vae-sd/ -> latents
        has_latents = os.path.isdir(os.path.join(args.data_dir or "", "vae-sd"))
        kind = "builtin" if args.data_dir is None else "latents" if has_latents else "folder"
    R = args.resolution or (256 if kind in ("latents", "folder") else 32)
    if R % 8 and (kind == "latents" or args.encode):
        raise UserError(f"--resolution {R} is not divisible by 8 (the SD-VAE's downsampling)")
    if kind == "latents":
        dataset = LatentDataset(args.data_dir, R)
    elif kind == "folder":  # labels from the sorted class folder names
        try:
            dataset = datasets.ImageFolder(args.data_dir, loader=partial(load_image, resolution=R))
        except FileNotFoundError as e:  # no class folders, or a class folder without images
            raise UserError(f"image folder {args.data_dir}: {e}") from None
        dataset.num_classes = len(dataset.classes)
    elif kind == "cifar10":  # torchvision's: read from --data-dir, downloaded there if missing
        args.data_dir = args.data_dir or "data/cifar10"
        made = [d for d in (args.data_dir, os.path.dirname(args.data_dir)) if not os.path.isdir(d)]
        try:
            dataset = datasets.CIFAR10(args.data_dir, download=True, transform=to_tensor)
        except Exception as e:  # offline, and not there: leave no folder behind that it made
            for folder in made:
                shutil.rmtree(folder, ignore_errors=True)
            raise UserError(f"CIFAR-10 is not in {args.data_dir} and cannot be downloaded ({e})")
        R = 32
    elif kind == "synthetic":  # --bench: random inputs and labels, the shape of --bench-shape
        labels = torch.arange(64 * args.batch_size) % args.num_classes
        dataset = TensorDataset(torch.randn(len(labels), *args.bench_shape), labels)
        dataset.num_classes = args.num_classes
        R = args.bench_shape[1]
    else:
        dataset = ShapesDataset(R)
    channels = {"latents": 4, "synthetic": args.bench_shape[0]}.get(kind, 3)
    args.in_channels, args.input_size = channels, R // 8 if kind == "latents" else R
    found = getattr(dataset, "num_classes", 10)
    if (args.num_classes or found) < found:
        raise UserError(f"--num-classes {args.num_classes} is below the data's {found} classes")
    args.num_classes = args.num_classes or found
    args.dataset, args.resolution = kind, R  # as inferred
    # The paper trains on 256 tokens (the 4x32x32 SD-VAE latents of a 256 px image, patch 2);
    # 256 px pixels at patch 2 would be 16,384 tokens: some 200x the FLOPs of a step
    size, tokens = args.input_size, (args.input_size // int(args.model.split("/")[1])) ** 2
    space = "latents" if channels == 4 else "pixels"
    args.input_space = f"{space} {channels}x{size}x{size}, {tokens} tokens"
    if tokens > 4096 and not args.encode:
        raise UserError(f"{args.model} on {args.input_space} per image (the paper: 256): encode "
                        f"them (sra.py --encode DIR), or lower --resolution, or a bigger patch")
    return dataset


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start `skip` samples into an epoch, so that a resumed run
    sees exactly the batches that the interrupted one would have seen. main sets `skip`."""

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)


def epochs_of(loader, sampler, first_epoch):
    """(epoch, x, y) forever, from `first_epoch` on; the sampler's `skip` applies to it alone."""
    for epoch in itertools.count(first_epoch):
        sampler.set_epoch(epoch)  # the shuffled order is a function of (seed, epoch)
        batches = iter(loader)
        # PyTorch's SIGCHLD handler raises a dead worker's error at whatever line the trainer is
        # on (inside torch.save, say). Without it, the error comes at the next fetch, between two
        # steps, where the loop can still write a checkpoint (step 1 of the loop).
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for x, y in batches:
            yield epoch, x, y
        sampler.skip = 0


def prepare_batch(x, kind, generator):
    """On the device: draw the latent from its stored posterior, or flip images at random. Both
    draw from the training generator, which checkpoints hold."""
    if kind == "latents":  # z = (mean + std * eps) * 0.18215: a fresh posterior sample each step
        mean, std = x.float().chunk(2, dim=1)
        noise = torch.randn(mean.shape, device=x.device, generator=generator)
        return (mean + std * noise) * 0.18215
    flip = torch.rand(len(x), device=x.device, generator=generator) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)  # random horizontal flips


def load_vae(name, device):
    """The SD-VAE in fp32, eval mode: `ema` or `mse` (stabilityai/sd-vae-ft-*, fetched once by
    diffusers), or a folder of diffusers weights (save_pretrained's: for machines offline).
    diffusers is imported only here, so everything else runs without it."""
    source = f"stabilityai/sd-vae-ft-{name}" if name in ("ema", "mse") else name
    try:
        from diffusers import AutoencoderKL
        # low_cpu_mem_usage=False: what diffusers falls back to without the accelerate package,
        # said here so that it does not print its six-line advice to install accelerate
        return AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False).to(device).eval()
    except ImportError:
        raise UserError("the SD-VAE needs diffusers: pip install diffusers") from None
    except Exception as e:  # offline, or not a folder of diffusers weights
        raise UserError(f"cannot load the SD-VAE {source} ({error_line(e)}): --vae takes ema, "
                        f"mse or a folder that AutoencoderKL.save_pretrained wrote") from None


@torch.no_grad()
def encode_latents(args):
    """--encode DIR: the image folder --data-dir -> DIR/vae-sd/, the layout LatentDataset reads.

    As the official preprocessing (EDM2's dataset tool) makes it: the ADM crop at --resolution,
    pixels in [-1, 1], the SD-VAE in fp32, one float32 .npy (8, R/8, R/8) per image holding the
    posterior's mean and std. Unlike it: batched, sharded over torchrun processes, resumable.
    Batches are cut at fixed index multiples, so an image's bytes depend neither on the process
    count nor on interruptions; a rerun makes only the missing files, each written atomically;
    dataset.json comes last, once every file exists.
    """
    ddp, rank, world_size, device = setup_distributed(args.dist_timeout)
    args.dataset = "folder"
    dataset = build_dataset(args)  # ImageFolder: labels from the sorted class folder names
    out = Path(args.encode, "vae-sd")
    vae_name = args.vae if args.vae in ("ema", "mse") else os.path.abspath(args.vae)
    made_by = json.dumps({"resolution": args.resolution, "vae": vae_name})  # one encoding only
    marker = out / "encoding.json"
    vae = load_vae(args.vae, device)
    if rank == 0 and out.exists() and not (marker.exists() and marker.read_text() == made_by):
        raise UserError(f"{out} holds another encoding, not {made_by}: choose another --encode "
                        f"folder (the two must not mix)")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(marker, methodcaller("write", made_by.encode()))  # (before any latent)
    files = [out / (os.path.relpath(path, args.data_dir) + ".npy") for path, _ in dataset.samples]
    N, B = len(files), args.batch_size
    batches = [range(start, min(start + B, N)) for start in range(0, N, B)]
    todo = [batch for batch in batches if not all(files[i].exists() for i in batch)]
    if ddp:
        dist.barrier()  # every process has listed what is missing before any writes
    mine = todo[rank::world_size]
    loader = DataLoader(dataset, batch_sampler=mine, num_workers=args.num_workers)
    with tqdm(total=N, initial=N - sum(map(len, todo)), unit="img", disable=rank != 0,
              desc=f"encoding {args.resolution} px images with {vae_name}") as bar:
        for indices, (x, _) in zip(mine, loader):
            posterior = vae.encode(x.to(device)).latent_dist
            moments = torch.cat([posterior.mean, posterior.std], dim=1).float().cpu().numpy()
            for i, array in zip(indices, moments):  # (8, R/8, R/8) each
                if not files[i].exists():
                    files[i].parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(files[i], partial(np.save, arr=array), "latent file")
            bar.update(len(indices) * world_size)  # (the other processes' pace taken as ours)
    if ddp:
        dist.barrier()  # every file is written (a process that failed ended the job)
    if rank == 0:
        labels = [[str(f.relative_to(out)), label] for f, (_, label) in zip(files, dataset.samples)]
        listing = json.dumps({"labels": labels}).encode()
        atomic_write(out / "dataset.json", methodcaller("write", listing))  # f.write(listing)
        print(f"wrote {N} latents and {out}/dataset.json: train with --data-dir {args.encode}")
    if ddp:
        dist.destroy_process_group()


# ==================================================================================================
# Helpers: distributed setup, logging, checkpoints, FLOPs, preemption
# ==================================================================================================

def setup_distributed(timeout_s=1800):
    """-> (ddp, rank, world_size, device). DDP when torchrun set RANK. The GPU is LOCAL_RANK's:
    the global rank would point past the GPUs of a node."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return False, 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return True, dist.get_rank(), dist.get_world_size(), device


class Logger:
    """Rank 0's output: lines on stdout (above tqdm's progress bar), log.txt and metrics.jsonl."""

    def __init__(self, run_dir, quiet):
        self.run_dir, self.quiet = run_dir, quiet  # (quiet: ranks but 0, and the benchmark)

    def write(self, name, line):
        """Append a line to a file of the run folder."""
        if self.run_dir and os.path.isdir(self.run_dir) and not self.quiet:  # once it exists
            with open(os.path.join(self.run_dir, name), "a") as f:
                f.write(line + "\n")

    def info(self, message):
        """A time-stamped line on stdout and in log.txt."""
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
        if not self.quiet:
            tqdm.write(line, file=sys.stdout)
            sys.stdout.flush()
        self.write("log.txt", line)


def atomic_write(path, write, what="file", note=""):
    """write(f) into path.tmp, fsync, rename: a crash leaves the old file or the new one, never
    half of one. A write that fails (a full disk, an I/O error, no permission) removes its .tmp
    and is one line naming the file and the reason (and ending with `note`)."""
    try:
        with open(f"{path}.tmp", "wb") as f:
            write(f)
            f.flush()
            # numpy's np.save writes arrays with C stdio, which can lose a failed write without a
            # word (a full disk, a file-size limit): the file is then shorter than its position
            if os.fstat(f.fileno()).st_size < f.tell():
                raise OSError("a write did not reach the file (is the disk full?)")
            os.fsync(f.fileno())
        os.replace(f"{path}.tmp", path)  # atomic: readers see the old file or the new one
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(f"{path}.tmp")
        cause = e if isinstance(e, OSError) else e.__context__  # torch.save wraps the OSError
        reason = getattr(cause, "strerror", None) or error_line(e)
        raise UserError(f"cannot write {what} {path}: {reason}{note}") from None


def load_checkpoint(path):
    """A training checkpoint of sra.py, loaded with weights_only=True: no code in it can run."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # official ones hold args
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path} is not a loadable checkpoint ({error_line(e)[:200]})") from None
    if not isinstance(ckpt, dict) or not {"model", "ema", "opt", "step", "args"} <= ckpt.keys():
        raise UserError(f"{path} is not a training checkpoint of sra.py (of the official SRA/REPA "
                        f"trainer? sample.py reads those: python sample.py --ckpt {path})")
    return ckpt


# What makes a run what it is: a resumed run may not change it (the model, the data's shape, the
# objective, the random streams)
FIXED_SETTINGS = {"model", "learn_sigma", "num_classes", "cfg_prob", "dataset", "resolution",
                  "path_type", "prediction", "weighting", "no_sra", "block_out_s", "block_out_t",
                  "t_max", "loss_type", "mixed_precision", "seed"}


def saved_settings(args):
    """The settings of the run that --resume continues, from its args.json ({} if it has none):
    the run folder of --output-dir/--exp-name for `auto`, the checkpoint's own for a path."""
    run_dir = Path(args.output_dir, args.exp_name) if args.resume == "auto" else (
        Path(args.resume).absolute().parent.parent)  # <run>/checkpoints/NNNNNNN.pt
    path = run_dir / "args.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    # the run goes on in its folder, wherever that is now (moved, or named from another folder)
    return saved and {**saved, "output_dir": str(run_dir.parent), "exp_name": run_dir.name}


def list_checkpoints(run_dir):
    """The step checkpoints of a run, newest first (unfinished *.tmp files are never listed)."""
    paths = glob.glob(os.path.join(run_dir, "checkpoints", "*.pt"))
    return sorted((p for p in paths if os.path.basename(p)[:-3].isdigit()), reverse=True)


def find_resume_checkpoint(resume, run_dir, log):
    """--resume -> (path, checkpoint): PATH's; for `auto`, the newest checkpoint of run_dir that
    loads (unreadable ones, from a crash or a full disk, are reported and skipped), or (None,
    None), as without --resume."""
    if resume != "auto":
        return resume, resume and load_checkpoint(resume)
    for path in list_checkpoints(run_dir):
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            log(f"warning: {e}; trying an older checkpoint")
    log(f"--resume auto: no loadable checkpoint in {run_dir}, starting from scratch")
    return None, None


def prune_checkpoints(run_dir, keep_last, keep_every, current):
    """Delete all but the newest `keep_last` checkpoints up to step `current` (the one just
    written), sparing multiples of `keep_every`: a newer, unreadable file never pushes the fresh
    checkpoint out."""
    steps = {path: int(os.path.basename(path)[:-3]) for path in list_checkpoints(run_dir)}
    older = [path for path, step in steps.items() if step <= current]  # newest first
    for path in older[keep_last:]:
        if not (keep_every and steps[path] % keep_every == 0):
            os.remove(path)


# Dense bf16/fp16 tensor-core peaks in TFLOP/s (SXM parts), for MFU
PEAK_TFLOPS = {"A100": 312, "H100": 989, "H200": 989}


def forward_flops(model, depth=None):
    """FLOPs of one image's forward through `depth` blocks, or through all of them and the final
    layer. 2 FLOPs per multiply-add (DiT's "118.6 GFLOPs" counts multiply-adds). Per block: the
    qkv, proj and MLP matmuls 24 T D^2, attention 4 T^2 D, adaLN 12 D^2; patch embedding
    2 T p^2 C D; final layer 2 T D p^2 C_out + 4 D^2."""
    T, D = (model.input_size // model.patch_size) ** 2, model.hidden_size  # tokens, width
    flops = (depth or len(model.blocks)) * (24 * T * D * D + 4 * T * T * D + 12 * D * D)
    flops += 2 * T * model.patch_size ** 2 * model.in_channels * D  # the patch embedding
    if depth is None:  # the final layer
        flops += 2 * T * D * model.patch_size ** 2 * model.out_channels + 4 * D * D
    return flops


def train_flops(model, args):
    """FLOPs per training image: forward + backward = 3 forwards; SRA adds the projector (3 x its
    8 T D^2) and the teacher's partial forward."""
    T = (model.input_size // model.patch_size) ** 2
    sra_flops = 24 * T * model.hidden_size ** 2 + forward_flops(model, args.block_out_t)
    return 3 * forward_flops(model) + (0 if args.no_sra else sra_flops)


# SIGTERM (a scheduler's preemption, a time limit) only sets this flag: the loop finishes its
# step, writes a checkpoint and exits 0
STOP_REQUESTED = threading.Event()


def on_sigterm(signum, frame):
    """The SIGTERM handler."""
    STOP_REQUESTED.set()


# ==================================================================================================
# Training
# ==================================================================================================

def build(args, device):
    """The model (with the projector unless --no-sra), its EMA teacher, AdamW and the fp16 loss
    scaler. Every rank builds the same initial weights from args.seed."""
    torch.manual_seed(args.seed)
    spec = dict(input_size=args.input_size, in_channels=args.in_channels,
                num_classes=args.num_classes, class_dropout_prob=args.cfg_prob,
                learn_sigma=args.learn_sigma)
    model = MODELS[args.model](**spec, projector=not args.no_sra).to(device)
    model.grad_checkpointing = args.grad_checkpointing
    # The EMA starts as an exact copy of the backbone. It never holds the projector, which only
    # the student uses.
    ema = MODELS[args.model](**spec).to(device).requires_grad_(False).eval()
    ema.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("ap_")})
    # Fused AdamW reads its step counts and the loss scaler's inf flag on the device: no sync
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, eps=args.adam_epsilon,
                            betas=(args.adam_beta1, args.adam_beta2),
                            weight_decay=args.adam_weight_decay, fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=args.mixed_precision == "fp16")
    return model, ema, opt, scaler


def run_length(args, steps_per_epoch):
    """The optimizer steps of a run: --max-train-steps when it is given, else --epochs epochs."""
    return args.epochs * steps_per_epoch if args.max_train_steps is None else args.max_train_steps


def main(args):
    """Train a DiT/SiT with SRA (vanilla with --no-sra). With --bench, the same loop runs on
    synthetic batches, writes nothing, and returns its timings."""
    ddp, rank, world_size, device = setup_distributed(args.dist_timeout)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.allow_tf32

    # ---- Resume from a checkpoint (parse_args took the run's settings from its args.json). Every
    # input check passes before the run folder is made.
    run_dir = None if args.bench else os.path.abspath(os.path.join(args.output_dir, args.exp_name))
    if run_dir and list_checkpoints(run_dir) and not args.resume:
        raise UserError(f"{run_dir} has a run: continue with --resume auto, or another --exp-name")
    logger = Logger(run_dir, quiet=rank != 0 or args.bench)
    resume_path, ckpt = find_resume_checkpoint(args.resume, run_dir, logger.info)
    dataset = build_dataset(args)
    model, ema, opt, scaler = build(args, device)
    raw_model = model  # the plain module, for state dicts and the EMA, whatever wraps `model`
    parts = {"model": raw_model, "ema": ema, "opt": opt, "scaler": scaler}  # what checkpoints hold
    if ckpt is not None:  # the checkpoint fits the model (the run's own settings) unless edited
        try:
            for key, part in parts.items():
                part.load_state_dict(ckpt[key])
        except (RuntimeError, ValueError, KeyError) as e:  # PyTorch's lines name keys and shapes
            reason = " ".join(str(e).split())[:400]
            raise UserError(f"{resume_path} does not fit {args.model}: {reason}")

    # ---- Random streams. Training randomness (label dropout, noise, times, flips, latents) comes
    # from one generator per rank, seeded seed * world_size + rank, and checkpoints hold every
    # rank's state: a resumed run draws the very numbers the interrupted one would have drawn.
    # (Resumed with another process count, the old streams cannot be replayed: fresh ones.)
    step = 0 if ckpt is None else ckpt["step"]
    generator = torch.Generator(device).manual_seed(args.seed * world_size + rank + 1000003 * step)
    if ckpt is not None and len(ckpt["rng"]) == world_size:
        generator.set_state(ckpt["rng"][rank])

    # ---- Data. Each rank reads its shard of a shuffled order that depends only on (seed, epoch),
    # from where the checkpoint left off (mid-epoch if need be).
    accum = args.gradient_accumulation_steps
    sampler = ResumableSampler(dataset, world_size, rank, seed=args.seed, drop_last=True)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                        num_workers=args.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=args.num_workers > 0)
    if len(loader) < accum:
        raise UserError(f"{len(dataset)} items make less than one step: lower --batch-size")
    epoch, skip = divmod(step * accum, len(loader))  # the micro-batch to resume at
    sampler.skip = skip * args.batch_size
    batches = epochs_of(loader, sampler, epoch)
    total_steps = run_length(args, len(loader) // accum)
    if run_dir and rank == 0:  # every input check has passed: now the run folder is made
        os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
        Path(run_dir, "args.json").write_text(json.dumps(vars(args), indent=2))
    if ckpt is not None:
        logger.info(f"resumed from {resume_path} at step {step}, with the run's settings"
                    + "".join(f"; {change}" for change in args.changes))

    # ---- Speed: DDP, then torch.compile; bf16 autocast; the DiT tables live on the device
    if ddp:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    diffusion = GaussianDiffusion.linear(device=device) if args.family == "DiT" else None
    if args.compile:  # after DDP, so that DDP's bucketed all-reduce overlaps the compiled backward
        try:
            torch.compile(torch.sin)(torch.zeros(1, device=device))  # can this machine compile?
            torch._dynamo.config.suppress_errors = True  # a graph that still fails runs eagerly
            model = torch.compile(model)
            ema.forward_features = torch.compile(ema.forward_features)  # the teacher's forward
        except Exception as e:
            logger.info(f"torch.compile failed ({error_line(e)}): training without it")
    ema_params = list(ema.parameters())
    model_params = [raw_model.get_parameter(name) for name, _ in ema.named_parameters()]
    flops_per_image = train_flops(raw_model, args)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)
    signal.signal(signal.SIGTERM, on_sigterm)
    # a CPU group for the stop flag, as quick to give up on a hung peer as the main group
    timeout = timedelta(seconds=args.dist_timeout)
    stop_group = dist.new_group(backend="gloo", timeout=timeout) if ddp else None
    bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stdout,
               disable=logger.quiet or not sys.stdout.isatty())  # on a terminal only
    # Running sums on the device (denoising loss, alignment loss, cosine, gradient norm, steps
    # with a non-finite gradient), read by the host only at log and checkpoint steps
    sums = torch.zeros(5, device=device)
    skipped_steps = 0
    last_ckpt = resume_path or "none yet"
    saved_step = logged_step = step
    step_times = []
    timer = time.perf_counter()
    batch = args.batch_size * world_size * accum  # the global batch of one optimizer step
    logger.info(f"{args.model} ({sum(p.numel() for p in ema.parameters()) / 1e6:.2f}M parameters) "
                f"on {args.input_space}, {world_size} process(es) on {device}, global batch "
                f"{batch}, steps {step} -> {total_steps}; every setting is in args.json")

    # ==============================================================================================
    # The training loop. Between two steps (and before the first): the next step's data, whether
    # to stop, checks, logging, checkpoints. Then one optimizer step.
    # ==============================================================================================
    while True:
        # 1. The next step's micro-batches. Fetched here, between two steps, a dead DataLoader
        #    worker (a scheduler signals every process of a job; an OOM killer) is an error at a
        #    point where model, EMA, optimizer and random stream hold a completed step.
        if step < total_steps and not STOP_REQUESTED.is_set():
            try:
                micro_batches = [next(batches) for _ in range(accum)]
            except (RuntimeError, OSError, EOFError) as e:  # (OSError: it died mid-batch)
                time.sleep(1)  # a SIGTERM to this process, or the worker's end, may lag behind
                if not STOP_REQUESTED.is_set():  # (its SIGTERM reached us too: stop, below)
                    # name the dead worker if PyTorch did not: a look, without reaping it (Linux)
                    waitid = getattr(os, "waitid", None)
                    dead = waitid and waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
                    cause = f"DataLoader worker (pid {dead.si_pid}) died" if dead else error_line(e)
                    raise UserError(f"the data loader failed after step {step} ({cause}); last "
                                    f"good checkpoint: {last_ckpt}") from None
        # 2. Stop? After a SIGTERM to any rank, they all stop after the same step: they agree over
        #    the CPU group (no GPU sync) before any starts a step that another would not finish.
        flag = torch.tensor([float(STOP_REQUESTED.is_set())])  # on the CPU
        if ddp:
            dist.all_reduce(flag, group=stop_group)
        stopping = flag.item() > 0
        log_now = step > logged_step and (step % args.log_every == 0 or step == total_steps)
        save_now = step > saved_step and (step % args.checkpoint_steps == 0
                                          or step == total_steps or stopping)
        # 3. Check the sums: the only place where the host waits for the device. Nothing
        #    non-finite is ever logged as progress or checkpointed.
        if log_now or save_now:
            if ddp:  # the mean over ranks (a mean of equal means is that mean, so this is safe)
                dist.all_reduce(sums)
                sums /= world_size
            denoise, align, cos, grad, nonfinite = sums.tolist()
            if not math.isfinite(denoise + align) or (nonfinite and not scaler.is_enabled()):
                raise UserError(f"non-finite loss or gradient by step {step}; stopping. Last good "
                                f"checkpoint: {last_ckpt} (resume from it, maybe with a lower lr)")
        # 4. Log: one line, one JSON record in metrics.jsonl
        if log_now:
            n = step - logged_step
            elapsed = time.perf_counter() - timer
            step_times.append(elapsed / n)
            skipped_steps += round(nonfinite)
            denoise, align, cos, grad = denoise / n, align / n, cos / n, grad / n
            images_per_s = n * batch / elapsed
            mfu = flops_per_image * images_per_s / world_size / peak / 1e12 if peak else None
            mfu_text = f" | MFU {100 * mfu:.1f}%" if mfu else ""  # where the GPU's peak is known
            logger.info(f"step {step}/{total_steps} | loss {denoise + weight * align:.4f} | "
                        f"denoise {denoise:.4f} | align {align:.4f} (cos {cos:.3f}) | "
                        f"grad {grad:.3f} | {images_per_s:.1f} img/s{mfu_text} | "
                        f"ETA {(total_steps - step) * elapsed / n / 60:.1f} min")
            logger.write("metrics.jsonl", json.dumps(dict(step=step, epoch=epoch, gen_loss=denoise,
                align_loss=align, align_cos=cos, align_weight=weight, grad_norm=grad, mfu=mfu,
                lr=opt.param_groups[0]["lr"], img_per_s=images_per_s, skipped_steps=skipped_steps)))
            sums.zero_()
            timer, logged_step = time.perf_counter(), step  # the next interval starts
        # 5. Checkpoint: rank 0 writes the parts, the step and every rank's random stream,
        #    atomically; only then are old checkpoints pruned. A write that fails (a full disk)
        #    ends the run; under torchrun the other ranks go with it (torchrun stops them).
        if save_now and run_dir:  # (the benchmark saves nothing)
            rng = [generator.get_state()] * world_size
            if ddp:
                dist.all_gather_object(rng, generator.get_state())
            path = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
            if rank == 0:
                state = {key: part.state_dict() for key, part in parts.items()}
                state.update(args=vars(args), step=step, epoch=epoch, rng=rng)
                atomic_write(path, partial(torch.save, state), "checkpoint",
                             note=f"; last good checkpoint: {last_ckpt}")
            last_ckpt, saved_step = path, step
            if args.keep_last and rank == 0:
                prune_checkpoints(run_dir, args.keep_last, args.keep_every, current=step)
            logger.info(f"saved checkpoint {path}")
        if stopping:
            logger.info(f"SIGTERM: stopped at step {step}; continue with --resume auto")
        if stopping or step == total_steps:
            break

        # ---- One optimizer step
        weight = align_weight(step, args.align_weight, args.align_decay_start,
                              args.align_decay_steps)
        # 6. Micro-batches. DDP all-reduces gradients during backward; no_sync skips that on all
        #    but the last micro-batch, so a step costs one all-reduce.
        for micro, (epoch, x, y) in enumerate(micro_batches):
            x = prepare_batch(x.to(device, non_blocking=True), args.dataset, generator)
            y = y.to(device, non_blocking=True)
            with model.no_sync() if ddp and micro < accum - 1 else contextlib.nullcontext():
                # 7. The SRA loss: L = L_denoise + lambda * L_align (student vs EMA teacher)
                with autocast:
                    denoise, align, cos = training_losses(model, ema, x, y, args, diffusion,
                                                          generator)
                    loss = (denoise + weight * align) / accum
                # 8. Backward; fp16 scales the loss so that small gradients do not underflow
                scaler.scale(loss).backward()
            sums[:3] += torch.stack([denoise.detach(), align.detach(), cos]) / accum
        # 9. Unscale and clip. A non-finite norm is an fp16 overflow: the scaler skips this step
        #    and lowers its scale. In bf16/fp32 it stops the run at the next check.
        scaler.unscale_(opt)
        grad_norm = nn.utils.clip_grad_norm_(raw_model.parameters(), args.max_grad_norm)
        finite = torch.isfinite(grad_norm)
        sums[3:] += torch.stack([torch.where(finite, grad_norm, 0.0), (~finite).float()])
        # 10. The optimizer step (a plain opt.step() when the scaler is off), then the EMA teacher
        #     follows the student
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        update_ema(ema_params, model_params, args.ema_decay)
        step += 1
        bar.update()

    bar.close()
    logger.info(f"done: {step} steps, last checkpoint {last_ckpt}")
    if ddp:
        dist.destroy_process_group()
    # The benchmark's figures: the median of the timed steps, each clocked at a log step (where
    # the host waits for the device). Images/s and TFLOP/s count the whole job; MFU is per GPU.
    seconds = statistics.median(step_times[BENCH_WARMUP:] or [math.nan])
    tflops = flops_per_image * batch / seconds / 1e12  # the whole job
    peak_mem = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else None
    return dict(model=args.model, sra=not args.no_sra, batch=args.batch_size,
                shape=args.bench_shape, dtype=args.mixed_precision.replace("no", "fp32"),
                device=device_name, world_size=world_size, compile=args.compile,
                grad_checkpointing=args.grad_checkpointing, step_s_median=seconds,
                img_per_s=batch / seconds, peak_mem_gb=peak_mem, flops_per_img=flops_per_image,
                tflops=tflops, mfu=tflops / world_size / peak if peak else None)


BENCH_WARMUP = 2  # untimed steps first: the first step allocates (and compiles, with --compile)


def bench(args):
    """--bench: main()'s training loop on synthetic batches, vanilla then SRA, logging every step;
    one JSON line each. Under torchrun it measures the DDP step."""
    vanilla = main(argparse.Namespace(**{**vars(args), "no_sra": True}))
    with_sra = main(argparse.Namespace(**{**vars(args), "no_sra": False}))
    with_sra["sra_overhead_ratio"] = with_sra["step_s_median"] / vanilla["step_s_median"]
    with_sra["flop_ratio"] = with_sra["flops_per_img"] / vanilla["flops_per_img"]
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(vanilla), json.dumps(with_sra), sep="\n", flush=True)


# ==================================================================================================
# Command line: the flags of the official train.py work unchanged
# ==================================================================================================

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help prints each default once; a flag without a plain default describes it in words."""

    def _get_help_string(self, action):
        quiet = str(action.default) in ("None", "False")  # (0 == False, so not `in (None, False)`)
        return action.help if quiet else super()._get_help_string(action)


def parse_args(argv=None):
    """Parse and check the flags; fill in the defaults that depend on the model and the loss."""
    parser = argparse.ArgumentParser(description="Train DiT/SiT with Self-Representation "
                                     "Alignment.", formatter_class=HelpFormatter)
    add = parser.add_argument_group("model and objective").add_argument
    add("--model", default="SiT-XL/2", help="SiT|DiT-{T,S,B,L,XL}/{2,4,8}")
    add("--path-type", default="linear", choices=["linear", "cosine", "cos"], help="SiT path")
    add("--prediction", default="v", choices=["v"], help="SiT predicts the velocity")
    add("--weighting", default="uniform", choices=["uniform", "lognormal"], help="SiT times")
    add("--learn-sigma", action=argparse.BooleanOptionalAction, help="default: DiT yes, SiT no")
    add("--cfg-prob", type=float, default=0.1, help="label dropout probability (for CFG)")
    add("--num-classes", type=int, help="default: the data's")
    add = parser.add_argument_group("SRA").add_argument
    add("--no-sra", action="store_true", help="vanilla: no teacher, no projector")
    add("--block-out-s", type=int, help="student block, 1-based (default: the paper's)")
    add("--block-out-t", type=int, help="teacher block, 1-based (default: the paper's)")
    add("--t-max", type=float, default=0.2, help="teacher time t' = t - t_max * U(0, 1)")
    add("--loss-type", default="sml1", choices=["sml1", "cos"], help="alignment distance")
    add("--align-weight", type=float, help="lambda (default: 0.2 SiT, 0.04 DiT; 0.5 for cos)")
    add("--align-decay-start", type=int, default=745_596, help="step where lambda starts to decay")
    add("--align-decay-steps", type=int,
        help="steps per tenfold decay (default: 5004000 for sml1, 0 = constant for cos)")
    add("--ema-decay", type=float, default=0.9999, help="EMA (teacher) decay per step")
    add = parser.add_argument_group("data").add_argument
    add("--data-dir", help="image folder, folder with vae-sd/, CIFAR-10 root; none: built-in")
    add("--dataset", choices=["builtin", "cifar10", "folder", "latents"], help="default: inferred")
    add("--resolution", type=int, help="default: 256 (32 for built-in and CIFAR-10)")
    add("--num-workers", type=int, default=min(4, os.cpu_count() // 2), help="loader processes")
    add("--encode", metavar="DIR", help="only encode the image folder --data-dir to SD-VAE "
        "latents in DIR/vae-sd/ (then train with --data-dir DIR)")
    add("--vae", default="ema", help="SD-VAE of --encode: ema, mse or a folder of its weights")
    add = parser.add_argument_group("optimisation").add_argument
    add("--batch-size", type=int, default=32, help="per process (the paper: 32 x 8 GPUs)")
    add("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per step")
    add("--epochs", type=int, default=801, help="the run's length, unless --max-train-steps")
    add("--max-train-steps", type=int, help="steps of the run; when given, --epochs is ignored")
    add("--learning-rate", type=float, default=1e-4, help="AdamW, constant")
    add("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    add("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    add("--adam-weight-decay", type=float, default=0.0, help="AdamW weight decay")
    add("--adam-epsilon", type=float, default=1e-8, help="AdamW epsilon")
    add("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    add = parser.add_argument_group("precision and speed").add_argument
    add("--mixed-precision", default="auto", choices=["auto", "no", "fp16", "bf16"],
        help="auto: bf16 where the GPU has it, else fp32")
    add("--allow-tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs")
    add("--compile", action="store_true", help="torch.compile the student and the teacher")
    add("--grad-checkpointing", action="store_true", help="recompute blocks in backward")
    add = parser.add_argument_group("run").add_argument
    add("--output-dir", default="exps", help="runs go to <output-dir>/<exp-name>/")
    add("--exp-name", help="run folder (default: from the model, e.g. SiT-XL-2-sra)")
    add("--seed", type=int, default=0, help="rank r draws from seed * world_size + r")
    add("--log-every", type=int, default=100, help="steps between log lines")
    add("--checkpoint-steps", type=int, default=50_000, help="steps between checkpoints")
    add("--resume", "--resume-ckpt", help="a checkpoint, or auto: the run folder's newest")
    add("--keep-last", type=int, default=0, help="keep the newest K checkpoints (0: all)")
    add("--keep-every", type=int, default=0, help="but never those at multiples of this step")
    add("--dist-timeout", type=int, default=1800, help="seconds before a stuck collective fails")
    add = parser.add_argument_group("benchmark").add_argument
    add("--bench", action="store_true", help="time the loop on synthetic batches, print JSON")
    add("--bench-shape", type=int, nargs=3, default=[4, 32, 32], metavar=("C", "H", "W"),
        help="input shape (latents of 256 px images)")
    add("--bench-steps", type=int, help="timed steps (default: 20 on a GPU, 3 on a CPU)")
    add("--peak-tflops", type=float, help="peak of the device for MFU (default: known GPUs)")
    args = parser.parse_args(argv)
    if args.exp_name is None:
        args.exp_name = args.model.replace("/", "-") + ("-vanilla" if args.no_sra else "-sra")
    # A resumed run takes its settings from its args.json and the flags given now: parsed onto
    # those settings, as argparse fills in defaults only where the namespace has no value
    saved = saved_settings(args) if args.resume and not args.bench else {}
    args = parser.parse_args(argv, argparse.Namespace(**saved)) if saved else args
    changed = [key for key, old in saved.items() if getattr(args, key) != old and key != "resume"]
    for key in sorted(set(changed) & FIXED_SETTINGS):  # (the first of them is refused)
        raise UserError(f"--{key.replace('_', '-')} cannot change in a resumed run (it was "
                        f"{saved[key]}): drop it, or start a new run with another --exp-name")
    args.changes = [f"--{k.replace('_', '-')} {getattr(args, k)} (was {saved[k]})" for k in changed]

    if args.model not in MODELS:
        raise UserError(f"unknown model {args.model!r}: models are SiT|DiT-{{T,S,B,L,XL}}/{{2,4,8}}"
                        f", e.g. SiT-XL/2")
    args.family, size = args.model.split("/")[0].split("-")
    args.learn_sigma = args.family == "DiT" if args.learn_sigma is None else args.learn_sigma
    depth = SIZES[size][0]
    student, teacher = BLOCK_PAIRS.get(args.model.split("/")[0], (1, 4))  # (1, 4): T
    args.block_out_s = student if args.block_out_s is None else args.block_out_s
    args.block_out_t = teacher if args.block_out_t is None else args.block_out_t
    for flag, block in (("--block-out-s", args.block_out_s), ("--block-out-t", args.block_out_t)):
        if not 1 <= block <= depth:
            raise UserError(f"{flag} {block} is out of range: {args.model} has blocks 1..{depth}")
    weight = {"cos": 0.5, "sml1": 0.2 if args.family == "SiT" else 0.04}[args.loss_type]
    args.align_weight = weight if args.align_weight is None else args.align_weight
    if args.align_decay_steps is None:  # the official code decays lambda for sml1 only
        args.align_decay_steps = 1000 * 5004 if args.loss_type == "sml1" else 0
    # auto: bf16 where the GPU has it natively (Ampere on; False: not emulated), else fp32
    if args.mixed_precision == "auto":
        args.mixed_precision = "bf16" if torch.cuda.is_bf16_supported(False) else "no"
    if args.bench:  # synthetic data; log every step, so that the loop's own clock times each step
        args.bench_steps = args.bench_steps or (20 if torch.cuda.is_available() else 3)
        vars(args).update(dataset="synthetic", num_classes=args.num_classes or 1000, log_every=1,
                          max_train_steps=BENCH_WARMUP + args.bench_steps)
    for flag in ("batch_size", "gradient_accumulation_steps", "log_every", "checkpoint_steps"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    return args


def error_line(e):
    """One line for the user. An error re-raised from a DataLoader worker carries the worker's
    traceback: keep its last line, the error itself."""
    text = str(e).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1].split("Error: ", 1)[-1]
    return text.splitlines()[0] if text else type(e).__name__


if __name__ == "__main__":
    try:
        arguments = parse_args()
        (encode_latents if arguments.encode else bench if arguments.bench else main)(arguments)
    except UserError as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        sys.exit(2)
