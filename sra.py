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
    # the JPEGs once (resumable), then train on the latents; on two nodes, add --nnodes=2
    # --node_rank=R --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 and halve --batch-size
    torchrun --nproc_per_node=8 sra.py --encode data/imagenet256 --data-dir data/imagenet/train
    torchrun --nproc_per_node=8 sra.py --model SiT-XL/2 --data-dir data/imagenet256
    # the benchmark: this file's training loop on synthetic batches, vanilla then SRA
    python sra.py --bench --model SiT-XL/2 --batch-size 32

Notable choices
    * Time runs from t = 0 (data) to t = 1 (noise), as in SRA and REPA (the SiT repo is reversed).
    * Student: the hidden state after block `block_out_s` (1-based), through the projector.
      Teacher: the raw hidden state after block `block_out_t` of the EMA, which stops there.
    * Teacher time t' = clamp(t - t_max * u, 0, 1), u ~ U(0, 1): less noise, the same noise
      sample, the same labels after label dropout. DiT: t' = clamp(t - j, 1, 999), j uniform in
      [0, 200).
    * Loss `sml1` (smooth-L1, beta 0.05; the paper) or `cos` (1 - cosine per token, over the
      feature axis, as the paper describes; the official code's ran over the token axis).
    * EMA decay 0.9999, an exact copy of the model at step 0, updated after every optimizer step.
"""
import argparse
import contextlib
import io
import itertools
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from collections import OrderedDict
from datetime import timedelta
from functools import partial
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


# ==== Embedders: patches, timesteps, positions ====================================================

def modulate(x, shift, scale):
    """adaLN: x * (1 + scale) + shift, for x already layer-normed; one (shift, scale) per sample."""
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


# ==== The transformer: attention, adaLN-Zero block, final layer, the model table ==================

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
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels  # 2C: and the variance
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


# ==== Objectives: the SiT interpolant (flow matching) and the DDPM of DiT =========================

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
        betas = torch.as_tensor(betas, dtype=torch.float64)
        self.betas = betas
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


# ==== SRA: the EMA teacher, the alignment loss, and one training batch ============================

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
    N = len(x)
    device = x.device
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


# ==== Data: built-in shapes, CIFAR-10, image folders, pre-encoded SD-VAE latents ==================

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
    """ADM's center crop: box-downsample while the short side >= 2 * resolution, bicubic to the
    resolution on the short side, crop the centre. PIL image -> (R, R, 3) uint8 array."""
    while min(*image.size) >= 2 * resolution:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = resolution / min(*image.size)
    arr = np.array(image.resize(tuple(round(x * scale) for x in image.size), Image.BICUBIC))
    top = (arr.shape[0] - resolution) // 2
    left = (arr.shape[1] - resolution) // 2
    return arr[top:top + resolution, left:left + resolution]


def to_tensor(image):
    """An RGB image (PIL or (H, W, 3) uint8 array) -> (3, H, W) float tensor in [-1, 1]."""
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1


def load_image(path, resolution):
    """ImageFolder's loader: the ADM crop, then to_tensor. A file that does not decode is named."""
    try:
        with Image.open(path) as image:
            return to_tensor(center_crop_arr(image.convert("RGB"), resolution))
    except Exception as e:
        raise UserError(f"cannot read image {path}: {e}") from None


class LatentDataset(torch.utils.data.Dataset):
    """Pre-encoded ImageNet as SRA/REPA/EDM2 write it: vae-sd/dataset.json and one .npy per image,
    (8, R/8, R/8): the SD-VAE posterior's mean and std. A file is read (and a bad one named) when
    it is used, so start-up does not touch 1.28M files. prepare_batch draws the latent."""

    def __init__(self, root, resolution):
        with open(os.path.join(root, "vae-sd", "dataset.json")) as f:
            labels = json.load(f)["labels"]
        self.files = [(os.path.join(root, "vae-sd", path), int(label)) for path, label in labels]
        self.num_classes = 1 + max(label for _, label in self.files)
        self.shape = (8, resolution // 8, resolution // 8)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        path, label = self.files[index]
        try:  # (8, h, w), or (1, 8, h, w) as EDM2's tool writes it
            return torch.from_numpy(np.load(path).reshape(self.shape)), label
        except Exception as e:
            raise UserError(f"cannot read latent file {path} as {self.shape} (the VAE's mean and "
                            f"std at --resolution / 8): {e}") from None


def build_dataset(args):
    """The data that --dataset / --data-dir name. Fills in args.dataset (the kind), resolution,
    num_classes, and the model's in_channels and input_size."""
    from torchvision import datasets
    kind = args.dataset
    if kind is None:  # inferred: no folder -> built-in; a folder with vae-sd/ -> latents
        kind = "builtin"
        if args.data_dir:
            has_latents = os.path.isdir(os.path.join(args.data_dir, "vae-sd"))
            kind = "latents" if has_latents else "folder"
    R = args.resolution or (256 if kind in ("latents", "folder") else 32)
    if R % 8 and (kind == "latents" or args.encode):
        raise UserError(f"--resolution {R} is not divisible by 8 (the SD-VAE's downsampling)")
    if kind == "latents":
        dataset = LatentDataset(args.data_dir, R)
    elif kind == "folder":  # labels from the sorted class folder names
        dataset = datasets.ImageFolder(args.data_dir, loader=partial(load_image, resolution=R))
        dataset.num_classes = len(dataset.classes)
    elif kind == "cifar10":  # 32 px. Rank 0 downloads it if missing while the others wait: had
        R = 32  # they all fetched it at once, they would have overwritten each other's files
        first = not dist.is_initialized() or dist.get_rank() == 0
        if not first:
            dist.barrier()
        args.data_dir = args.data_dir or "data/cifar10"
        dataset = datasets.CIFAR10(args.data_dir, download=first, transform=to_tensor)
        if first and dist.is_initialized():
            dist.barrier()
    elif kind == "synthetic":  # --bench: random inputs and labels, the shape of --bench-shape
        R = args.bench_shape[1]
        labels = torch.arange(64 * args.batch_size) % args.num_classes
        dataset = TensorDataset(torch.randn(len(labels), *args.bench_shape), labels)
    else:
        dataset = ShapesDataset(R)
    args.dataset = kind
    args.resolution = R
    args.in_channels = {"latents": 4, "synthetic": args.bench_shape[0]}.get(kind, 3)
    args.input_size = R // 8 if kind == "latents" else R
    args.num_classes = args.num_classes or getattr(dataset, "num_classes", 10)
    # The paper trains on 256 tokens (the 4x32x32 SD-VAE latents of a 256 px image, patch 2);
    # 256 px pixels at patch 2 would be 16,384 tokens: some 200x the FLOPs of a step
    tokens = (args.input_size // int(args.model.split("/")[1])) ** 2
    if tokens > 4096 and not args.encode:
        raise UserError(f"{args.model} on {args.input_size} px images is {tokens} tokens (the "
                        f"paper: 256): encode them (sra.py --encode DIR), or lower --resolution, "
                        f"or a bigger patch")
    return dataset


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can start `skip` samples into an epoch, so that a resumed run
    sees exactly the batches that the interrupted one would have seen. main sets `skip`."""

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.skip, None)


def epochs_of(loader, sampler, first_epoch):
    """(x, y) forever, epoch after epoch from `first_epoch`; the sampler's skip applies to it."""
    for epoch in itertools.count(first_epoch):
        sampler.set_epoch(epoch)  # the shuffled order is a function of (seed, epoch)
        batches = iter(loader)
        # PyTorch's SIGCHLD handler raises a dead worker's error at whatever line the trainer is
        # on (inside torch.save, say); without it, the next fetch fails, between two steps
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        yield from batches
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
    diffusers), or a folder that AutoencoderKL.save_pretrained wrote (for machines offline).
    diffusers is imported only here, so everything else runs without it."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError("the SD-VAE needs diffusers: pip install diffusers") from None
    source = f"stabilityai/sd-vae-ft-{name}" if name in ("ema", "mse") else name
    # low_cpu_mem_usage=False: what diffusers does without accelerate, minus its advice
    return AutoencoderKL.from_pretrained(source, low_cpu_mem_usage=False).to(device).eval()


@torch.no_grad()
def encode_latents(args):
    """--encode DIR: the image folder --data-dir -> DIR/vae-sd/, the layout LatentDataset reads.

    As the official preprocessing (EDM2's dataset tool): the ADM crop, pixels in [-1, 1], the
    SD-VAE in fp32, one float32 .npy (8, R/8, R/8) per image, the posterior's mean and std. Unlike
    it: batched, shared over torchrun processes, resumable. Batches are cut at fixed index
    multiples, so the bytes depend neither on the process count nor on interruptions; a rerun makes
    only the missing files; dataset.json comes last.
    """
    ddp, rank, world_size, device = setup_distributed()
    args.dataset = "folder"
    dataset = build_dataset(args)
    vae = load_vae(args.vae, device)
    out = Path(args.encode, "vae-sd")
    files = [out / (os.path.relpath(path, args.data_dir) + ".npy") for path, _ in dataset.samples]
    starts = range(0, len(files), args.batch_size)
    batches = [range(i, min(i + args.batch_size, len(files))) for i in starts]
    todo = [batch for batch in batches if not all(files[i].exists() for i in batch)]
    if ddp:
        dist.barrier()  # every process has listed what is missing before any writes
    mine = todo[rank::world_size]  # whole batches, round-robin over the processes
    loader = DataLoader(dataset, batch_sampler=mine, num_workers=args.num_workers)
    with tqdm(total=len(files), initial=len(files) - sum(map(len, todo)), unit="img",
              disable=rank != 0, desc=f"encoding {args.resolution} px images") as bar:
        for indices, (x, _) in zip(mine, loader):
            posterior = vae.encode(x.to(device)).latent_dist
            moments = torch.cat([posterior.mean, posterior.std], dim=1).float().cpu().numpy()
            for i, array in zip(indices, moments):  # (8, R/8, R/8) each
                files[i].parent.mkdir(parents=True, exist_ok=True)
                buffer = io.BytesIO()  # (np.save to a file writes through C stdio, which can
                np.save(buffer, array)  # lose an error: a full disk)
                with atomic_write(files[i], "latent file") as f:
                    f.write(buffer.getbuffer())
            bar.update(len(indices) * world_size)  # (the other processes' pace taken as ours)
    if ddp:
        dist.barrier()  # every file is written (a process that failed ended the job)
    if rank == 0:
        labels = [[str(f.relative_to(out)), label] for f, (_, label) in zip(files, dataset.samples)]
        with atomic_write(out / "dataset.json") as f:
            f.write(json.dumps({"labels": labels}).encode())
        print(f"wrote {len(files)} latents to {out}: train with --data-dir {args.encode}")


# ==== Helpers: distributed setup, files, FLOPs, preemption, logging ===============================

def error_line(e):
    """One line for the user. An error re-raised from a DataLoader worker carries the worker's
    traceback: keep its last line, the error itself."""
    text = str(e).strip()
    if "Traceback" in text:
        text = text.splitlines()[-1].split("Error: ", 1)[-1]
    return text.splitlines()[0] if text else type(e).__name__


def setup_distributed():
    """-> (ddp, rank, world_size, device). DDP when torchrun set RANK. The GPU is LOCAL_RANK's (the
    global rank would point past a node's GPUs), modulo the GPUs that this process sees."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return False, 0, 1, torch.device("cuda" if cuda else "cpu")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # (--bench runs main twice in one process group)
        # a stuck collective fails after 30 min (rank 0 may write a 10 GB checkpoint meanwhile)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    return True, dist.get_rank(), dist.get_world_size(), device


@contextlib.contextmanager
def atomic_write(path, what="file"):
    """`with atomic_write(path) as f:` writes path.tmp, fsyncs and renames it: a crash leaves the
    old file or the new one, never half of one. A write that fails (a full disk, no permission)
    removes the .tmp and is one line naming the file and the reason."""
    try:
        with open(f"{path}.tmp", "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(f"{path}.tmp", path)  # atomic: readers see the old file or the new one
    except (OSError, RuntimeError) as e:
        with contextlib.suppress(OSError):
            os.remove(f"{path}.tmp")
        cause = e if isinstance(e, OSError) else e.__context__  # torch.save wraps the OSError
        reason = getattr(cause, "strerror", None) or error_line(e)
        raise UserError(f"cannot write {what} {path}: {reason}") from None


def forward_flops(model, depth=None):
    """FLOPs of one image's forward through `depth` blocks, or through all of them and the final
    layer. 2 FLOPs per multiply-add (DiT's "118.6 GFLOPs" counts multiply-adds). Per block: the
    qkv, proj and MLP matmuls 24 T D^2, attention 4 T^2 D, adaLN 12 D^2; patch embedding
    2 T p^2 C D; final layer 2 T D p^2 C_out + 4 D^2."""
    T = (model.input_size // model.patch_size) ** 2  # tokens
    D = model.hidden_size
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


def peak_flops(device):
    """A known GPU's dense bf16/fp16 peak in FLOP/s (SXM parts), for MFU; else None."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peaks = {"A100": 312e12, "H100": 989e12, "H200": 989e12}
    return next((peak for gpu, peak in peaks.items() if gpu in name), None)


# SIGTERM (a scheduler's preemption, a time limit) only sets this flag: the loop finishes its
# step, writes a checkpoint and exits 0
STOP_REQUESTED = threading.Event()


def on_sigterm(signum, frame):
    """The SIGTERM handler."""
    STOP_REQUESTED.set()


def next_micro_batches(batches, accum):
    """The next step's micro-batches, or None once a SIGTERM came. Fetched between two steps, so
    a DataLoader worker that dies (a scheduler signals every process of a job) fails here, where
    model, EMA, optimizer and random stream hold a completed step."""
    try:
        return None if STOP_REQUESTED.is_set() else [next(batches) for _ in range(accum)]
    except Exception as e:
        time.sleep(1)  # the SIGTERM that killed a worker may reach this process a moment later
        if STOP_REQUESTED.is_set():
            return None
        raise UserError(f"the data loader failed: {error_line(e)}") from None


def agree_to_stop(group):
    """Whether any rank got a SIGTERM, the same answer on every rank (over a CPU group: no GPU
    sync), so that they all stop after the same step."""
    flag = torch.tensor([float(STOP_REQUESTED.is_set())])
    if group is not None:
        dist.all_reduce(flag, group=group)
    return flag.item() > 0


class Progress:
    """Rank 0's output (stdout, log.txt, metrics.jsonl) and the loop's running figures, summed on
    the device at every step and read by the host at log steps only (where it waits for it)."""

    def __init__(self, run_dir, quiet, device, step, total_steps, images_per_step, flops):
        self.run_dir = run_dir
        self.quiet = quiet  # ranks but 0, and the benchmark
        self.sums = {name: torch.zeros((), device=device)
                     for name in ("denoise", "align", "cos", "grad", "nonfinite")}
        self.step = step  # of the last log line
        self.total_steps = total_steps
        self.images_per_step = images_per_step  # the global batch
        self.flops = flops  # per image
        self.peak = peak_flops(device)  # of one device
        self.records = []  # what metrics.jsonl holds; main returns them
        self.timer = time.perf_counter()

    def write(self, name, line):
        """A line at the end of a file of the run folder."""
        if self.run_dir and not self.quiet:
            with open(os.path.join(self.run_dir, name), "a") as f:
                print(line, file=f)

    def info(self, message):
        """A time-stamped line on stdout and in log.txt."""
        line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
        if not self.quiet:
            print(line, flush=True)
        self.write("log.txt", line)

    def add(self, **values):
        """Add device scalars to the sums (no host-device sync)."""
        for name, value in values.items():
            self.sums[name] += value.detach()

    def log(self, step, weight, fp16, last_ckpt):
        """The means since the last log line (over ranks too), checked, as a line and a record.
        Nothing non-finite is checkpointed: in fp32/bf16 a non-finite figure stops the run here."""
        n = step - self.step
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        # each rank's sums over n steps, divided by n and by the rank count: their all-reduced
        # sum is the mean over the steps and the ranks
        sums = torch.stack(list(self.sums.values())) / world_size / n
        if world_size > 1:
            dist.all_reduce(sums)
        mean = dict(zip(self.sums, sums.tolist()))
        # fp16's scaler skips a step that overflows (forward or backward): the weights stay finite
        if not fp16 and (mean["nonfinite"] or not math.isfinite(mean["denoise"] + mean["align"])):
            raise UserError(f"non-finite loss or gradient by step {step}; stopping. Last good "
                            f"checkpoint: {last_ckpt} (resume from it, maybe with a lower lr)")
        seconds = (time.perf_counter() - self.timer) / n  # per step
        images_per_s = self.images_per_step / seconds
        mfu = self.flops * images_per_s / world_size / self.peak if self.peak else None
        self.records.append(dict(
            step=step, gen_loss=mean["denoise"], align_loss=mean["align"], align_cos=mean["cos"],
            align_weight=weight, grad_norm=mean["grad"], skipped_steps=round(n * mean["nonfinite"]),
            step_s=seconds, img_per_s=images_per_s, mfu=mfu))
        self.write("metrics.jsonl", json.dumps(self.records[-1]))
        loss = mean["denoise"] + weight * mean["align"]
        self.info(f"step {step}/{self.total_steps} | loss {loss:.4f} | denoise "
                  f"{mean['denoise']:.4f} | align {mean['align']:.4f} (cos {mean['cos']:.3f}) | "
                  f"grad {mean['grad']:.3f} | {images_per_s:.1f} img/s"
                  + (f" | MFU {100 * mfu:.1f}%" if mfu else "")
                  + f" | ETA {(self.total_steps - step) * seconds / 60:.1f} min")
        for value in self.sums.values():
            value.zero_()
        self.step = step
        self.timer = time.perf_counter()


# ==== Training ====================================================================================

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


def resume(args, run_dir, parts):
    """Load the checkpoint that --resume names (auto: the run folder's newest, if any) into the
    parts -> (its path, its contents), or (None, None). weights_only: no code in it can run;
    mmap: the ranks of a node share its pages instead of holding a copy each."""
    if run_dir is None:  # the benchmark
        return None, None
    saved = sorted(Path(run_dir, "checkpoints").glob("[0-9]*.pt"))  # (never a *.tmp)
    if saved and not args.resume:  # a run folder that holds a run is never written into
        raise UserError(f"{run_dir} has a run: continue with --resume auto, or another --exp-name")
    path = args.resume
    if args.resume == "auto":
        path = saved[-1] if saved else None
    if not path:
        return None, None
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # official ones hold args
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        for key, part in parts.items():
            part.load_state_dict(ckpt[key])
    except Exception as e:  # PyTorch's lines name the keys and shapes that do not fit
        raise UserError(f"cannot resume from {path}: {' '.join(str(e).split())[:300]}") from None
    return str(path), ckpt


def run_length(args, steps_per_epoch):
    """The optimizer steps of a run: --max-train-steps when it is given, else --epochs epochs."""
    return args.epochs * steps_per_epoch if args.max_train_steps is None else args.max_train_steps


def speed_up(model, ema, args, ddp, device, log):
    """DDP, then torch.compile of the student and of the teacher's partial forward. A machine that
    cannot compile trains eagerly, says so, and turns args.compile off (the bench reports it)."""
    if ddp:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:  # after DDP, so that DDP's bucketed all-reduce overlaps the compiled backward
        try:
            torch.compile(torch.sin)(torch.zeros(1, device=device))  # can this machine compile?
            torch._dynamo.config.suppress_errors = True  # a graph that still fails runs eagerly
            model = torch.compile(model)
            ema.forward_features = torch.compile(ema.forward_features)
        except Exception as e:
            log(f"torch.compile failed ({error_line(e)}): training without it")
            args.compile = False
    return model


def save_checkpoint(path, parts, generator, args, step):
    """Rank 0 writes the parts (model, EMA, AdamW, loss scaler), the step and every rank's random
    stream, atomically. A write that fails (a full disk) ends the run in one line, the last good
    checkpoint intact; under torchrun the other ranks go with it (torchrun stops them)."""
    streams = [generator.get_state()]
    if dist.is_initialized():
        streams = [None] * dist.get_world_size()
        dist.all_gather_object(streams, generator.get_state())
    if not dist.is_initialized() or dist.get_rank() == 0:
        state = {key: part.state_dict() for key, part in parts.items()}
        state.update(args=vars(args), step=step, rng=streams)
        with atomic_write(path, "checkpoint") as f:
            torch.save(state, f)


def main(args):
    """Train a DiT/SiT with SRA (vanilla with --no-sra); return the logged records. With --bench
    the same loop runs on synthetic batches and writes nothing."""
    ddp, rank, world_size, device = setup_distributed()
    torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
    torch.backends.cudnn.allow_tf32 = args.allow_tf32
    run_dir = None if args.bench else os.path.abspath(os.path.join(args.output_dir, args.exp_name))
    dataset = build_dataset(args)
    model, ema, opt, scaler = build(args, device)
    parts = {"model": model, "ema": ema, "opt": opt, "scaler": scaler}  # what checkpoints hold
    last_ckpt, ckpt = resume(args, run_dir, parts)
    step = ckpt["step"] if ckpt else 0

    # ---- Random streams. Training randomness (label dropout, noise, times, flips, latents) comes
    # from one generator per rank, seeded seed * world_size + rank, and checkpoints hold every
    # rank's state: a resumed run draws the very numbers the interrupted one would have drawn.
    # (Resumed with another process count, the streams start again from the seed.)
    generator = torch.Generator(device).manual_seed(args.seed * world_size + rank)
    if ckpt and len(ckpt["rng"]) == world_size:
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

    # ---- Logging; speed: DDP and torch.compile, autocast, DiT's tables on the device; the stop
    # vote's CPU group (as quick to give up on a hung peer as the main group)
    batch = args.batch_size * accum * world_size  # the global batch of one optimizer step
    progress = Progress(run_dir, rank != 0 or args.bench, device, step, total_steps, batch,
                        train_flops(model, args))
    if ckpt:
        progress.info(f"resumed from {last_ckpt} at step {step}, with the run's settings"
                      + "".join(f"; {change}" for change in args.changes))
    raw_model = model  # the plain module, for the EMA and clipping, whatever wraps `model`
    model = speed_up(model, ema, args, ddp, device, progress.info)
    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    diffusion = GaussianDiffusion.linear(device=device) if args.family == "DiT" else None
    ema_params = list(ema.parameters())
    model_params = [raw_model.get_parameter(name) for name, _ in ema.named_parameters()]
    signal.signal(signal.SIGTERM, on_sigterm)
    stop_group = dist.new_group(backend="gloo") if ddp else None
    progress.info(f"{args.model} ({sum(p.numel() for p in ema.parameters()) / 1e6:.2f}M "
                  f"parameters) on {args.in_channels}x{args.input_size}x{args.input_size} inputs, "
                  f"{world_size} process(es) on {device}, global batch {batch}, steps {step} -> "
                  f"{total_steps}; every setting is in args.json")

    # ---- The training loop: one optimizer step per iteration, then logging and checkpoints
    # The first step's data. From here on, the next step's data is fetched and the ranks agree
    # whether to stop at the end of each iteration, between two steps.
    micro_batches = next_micro_batches(batches, accum) if step < total_steps else None
    stopping = agree_to_stop(stop_group) or step >= total_steps
    while not stopping:
        weight = align_weight(step, args.align_weight, args.align_decay_start,
                              args.align_decay_steps)
        for micro, (x, y) in enumerate(micro_batches):
            # 1. The batch, on the device: latents drawn from their posterior, images flipped
            x = prepare_batch(x.to(device, non_blocking=True), args.dataset, generator)
            y = y.to(device, non_blocking=True)
            # DDP all-reduces gradients in backward: no_sync skips it on all but the last one
            with model.no_sync() if ddp and micro < accum - 1 else contextlib.nullcontext():
                # 2. The SRA loss: L = L_denoise + lambda * L_align (student vs EMA teacher)
                with autocast:
                    denoise, align, cos = training_losses(model, ema, x, y, args, diffusion,
                                                          generator)
                    loss = (denoise + weight * align) / accum
                # 3. Backward; fp16 scales the loss so that small gradients do not underflow
                scaler.scale(loss).backward()
            progress.add(denoise=denoise / accum, align=align / accum, cos=cos / accum)
        # 4. Unscale and clip. A non-finite norm is an fp16 overflow: the scaler skips this step
        #    and lowers its scale (in bf16/fp32 the next log line stops the run)
        scaler.unscale_(opt)
        grad_norm = nn.utils.clip_grad_norm_(raw_model.parameters(), args.max_grad_norm)
        finite = torch.isfinite(grad_norm)
        progress.add(grad=torch.where(finite, grad_norm, 0.0), nonfinite=(~finite).float())
        # 5. The optimizer step (a plain opt.step() when the scaler is off)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        # 6. The EMA teacher follows the student
        update_ema(ema_params, model_params, args.ema_decay)
        step += 1
        # 7. Between two steps: the next step's data, then every rank agrees whether to stop
        micro_batches = next_micro_batches(batches, accum) if step < total_steps else None
        stopping = agree_to_stop(stop_group) or step == total_steps
        save_now = step % args.checkpoint_steps == 0 or stopping
        # 8. Log; at a checkpoint too, so that nothing non-finite is saved
        if step % args.log_every == 0 or save_now:
            progress.log(step, weight, scaler.is_enabled(), last_ckpt)
        # 9. Checkpoint: the state after `step` optimizer steps (the benchmark saves nothing)
        if save_now and run_dir:
            last_ckpt = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
            save_checkpoint(last_ckpt, parts, generator, args, step)
            progress.info(f"saved checkpoint {last_ckpt}")
    if step < total_steps:
        progress.info(f"SIGTERM: stopped at step {step}; continue with --resume auto")
    progress.info(f"done: {step} steps, last checkpoint {last_ckpt}")
    return progress.records


BENCH_WARMUP = 2  # untimed steps first: the first step allocates (and compiles, with --compile)


def bench(args):
    """--bench: main()'s training loop on synthetic batches, vanilla then SRA, logging (and so
    timing) every step; one JSON line each. Under torchrun it measures the DDP step."""
    ddp, rank, world_size, device = setup_distributed()
    cuda = device.type == "cuda"
    lines = []
    for no_sra in (True, False):
        run = argparse.Namespace(**{**vars(args), "no_sra": no_sra})
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)  # this run's peak, not the one before
        records = main(run)  # (it fills in the data's settings, and turns a failed compile off)
        seconds = statistics.median(record["step_s"] for record in records[BENCH_WARMUP:])
        with torch.device("meta"):  # the model without memory, for its FLOPs
            model = MODELS[run.model](input_size=run.input_size, in_channels=run.in_channels,
                                      learn_sigma=run.learn_sigma)
        flops = train_flops(model, run)
        batch = args.batch_size * args.gradient_accumulation_steps * world_size
        peak = peak_flops(device)
        lines.append(dict(
            model=run.model, sra=not no_sra, batch=args.batch_size, shape=args.bench_shape,
            dtype=run.mixed_precision.replace("no", "fp32"), world_size=world_size,
            device=torch.cuda.get_device_name(device) if cuda else "cpu", compile=run.compile,
            grad_checkpointing=run.grad_checkpointing, step_s_median=seconds,
            img_per_s=batch / seconds, flops_per_img=flops, tflops=flops * batch / seconds / 1e12,
            peak_mem_gb=torch.cuda.max_memory_allocated(device) / 2 ** 30 if cuda else None,
            mfu=flops * batch / seconds / world_size / peak if peak else None))
    lines[1]["sra_overhead_ratio"] = lines[1]["step_s_median"] / lines[0]["step_s_median"]
    lines[1]["flop_ratio"] = lines[1]["flops_per_img"] / lines[0]["flops_per_img"]
    if rank == 0:
        print(*map(json.dumps, lines), sep="\n", flush=True)
    return lines


# ==== Command line: the flags of the official train.py work unchanged =============================

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help prints each default once; a flag without a plain default describes it in words."""

    def _get_help_string(self, action):
        quiet = str(action.default) in ("None", "False")  # (0 == False, so not `in (None, False)`)
        return action.help if quiet else super()._get_help_string(action)


# What makes a run what it is: a resumed run may not change it (the model, the data's shape, the
# objective, the random streams)
FIXED_SETTINGS = {"model", "learn_sigma", "num_classes", "cfg_prob", "dataset", "resolution",
                  "path_type", "prediction", "weighting", "no_sra", "block_out_s", "block_out_t",
                  "t_max", "loss_type", "mixed_precision", "seed", "batch_size",
                  "gradient_accumulation_steps"}


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
    add("--align-decay-steps", type=int, help="steps per tenfold decay (default: 5004000 for "
        "sml1, 0 = constant for cos)")
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
    add = parser.add_argument_group("benchmark").add_argument
    add("--bench", action="store_true", help="time the loop on synthetic batches, print JSON")
    add("--bench-shape", type=int, nargs=3, default=[4, 32, 32], metavar=("C", "H", "W"),
        help="input shape (latents of 256 px images)")
    add("--bench-steps", type=int, help="timed steps (default: 20 on a GPU, 3 on a CPU)")
    args = parser.parse_args(argv)
    if args.exp_name is None:
        args.exp_name = args.model.replace("/", "-") + ("-vanilla" if args.no_sra else "-sra")

    # A resumed run takes its settings from its args.json and the flags given now (parsed onto
    # those settings: argparse fills in defaults only where the namespace has no value). It goes
    # on in its folder, wherever that is now: a checkpoint's is <run>/checkpoints/NNNNNNN.pt.
    saved = {}
    run_dir = Path(args.output_dir, args.exp_name)
    if args.resume and args.resume != "auto":
        run_dir = Path(args.resume).absolute().parent.parent
    if args.resume and (run_dir / "args.json").exists() and not args.bench:
        saved = json.loads((run_dir / "args.json").read_text())
        saved.update(output_dir=str(run_dir.parent), exp_name=run_dir.name)
        args = parser.parse_args(argv, argparse.Namespace(**saved))
    changed = sorted(key for key, old in saved.items() if getattr(args, key) != old)
    for key in set(changed) & FIXED_SETTINGS:
        raise UserError(f"--{key.replace('_', '-')} cannot change in a resumed run (it was "
                        f"{saved[key]}): drop it, or start a new run with another --exp-name")
    args.changes = [f"--{k.replace('_', '-')} {getattr(args, k)} (was {saved[k]})"
                    for k in changed if k != "resume"]

    if args.model not in MODELS:
        raise UserError(f"unknown model {args.model!r}: SiT|DiT-{{T,S,B,L,XL}}/{{2,4,8}}")
    args.family, size = args.model.split("/")[0].split("-")
    args.learn_sigma = args.family == "DiT" if args.learn_sigma is None else args.learn_sigma
    student, teacher = BLOCK_PAIRS.get(args.model.split("/")[0], (1, 4))  # (1, 4): T
    args.block_out_s = student if args.block_out_s is None else args.block_out_s
    args.block_out_t = teacher if args.block_out_t is None else args.block_out_t
    for block in (args.block_out_s, args.block_out_t):
        if not 1 <= block <= SIZES[size][0]:
            raise UserError(f"block {block} is out of range: {args.model} has blocks "
                            f"1..{SIZES[size][0]}")
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
    if min(args.batch_size, args.gradient_accumulation_steps, args.log_every,
           args.checkpoint_steps) < 1:
        raise UserError("--batch-size, --gradient-accumulation-steps, --log-every and "
                        "--checkpoint-steps must be at least 1")
    return args


def cli(argv=None):
    """The command line -> exit status: bad input (and a missing file, an offline download) is
    one line on stderr and status 2."""
    try:
        args = parse_args(argv)
        if args.encode:
            encode_latents(args)
        elif args.bench:
            bench(args)
        else:
            main(args)
    except (UserError, OSError) as error:
        print(f"error: {error_line(error)}", file=sys.stderr)
        return 2
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
