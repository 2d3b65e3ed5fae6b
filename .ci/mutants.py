"""One-line slips in sra.py and sample.py that the test suite must catch (not part of CI).

Each mutant is one small edit of the kind a reader who forks the tutorial makes by accident: a
sign, a constant, an index, a swapped argument, a flag that no longer reaches what it controls.
This script applies each one to a copy of the repository (never to the working tree), runs the
fast tests there (-m "not slow", stopping at the first failure) and reports which mutants the
suite let through. A mutant that survives is a behaviour no test guards.

    python .ci/mutants.py                 # every mutant against the fast tests (~1 h on 2 cores)
    python .ci/mutants.py --slow          # survivors get the whole suite too
    python .ci/mutants.py -k DDPM -k EMA  # only mutants whose description names one of these
    python .ci/mutants.py --tests OLD.py --code f4722ad  # an older suite on that release's code
    python .ci/mutants.py --shard 0/2 & python .ci/mutants.py --shard 1/2  # on two cores

A mutant whose text the code does not hold (written for another release) is reported as such and
not counted. The copy without a mutant must pass the tests first (else every mutant would look
caught). A test run that hangs (a mutant can turn a 3-step run into 801 epochs) counts as a
failure after --timeout seconds.
"""
import argparse
import ast
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (file, the exact text to replace (it must occur once), its replacement, what the slip is)
MUTANTS = [
    # ---- the transformer
    ("sra.py", "return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)",
     "return x * scale.unsqueeze(1) + shift.unsqueeze(1)", "adaLN scale without 1 +"),
    ("sra.py", "return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)",
     "return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)",
     "timestep embedding sin first"),
    ("sra.py", "torch.arange(half, device=t.device) / half)",
     "torch.arange(half, device=t.device) / dim)", "timestep frequencies over dim"),
    ("sra.py", "for position in (cols, rows)]", "for position in (rows, cols)]",
     "positions: rows and columns swapped"),
    ("sra.py", "view(N, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)",
     "view(N, T, self.num_heads, 3, -1).permute(3, 0, 2, 1, 4)", "attention qkv layout"),
    ("sra.py", "shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation",
     "shift_msa, scale_msa, gate_msa, shift_mlp, gate_mlp, scale_mlp = modulation",
     "adaLN chunk order (released weights)"),
    ("sra.py", 'gelu = nn.GELU(approximate="tanh")', "gelu = nn.GELU()",
     "exact GELU instead of tanh"),
    ("sra.py", "self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)",
     "self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False)", "LayerNorm eps 1e-5"),
    ("sra.py", "x = x + gate_msa.unsqueeze(1) * self.attn(",
     "x = x + self.attn(", "attention branch without its gate"),
    ("sra.py", "shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)",
     "scale, shift = self.adaLN_modulation(c).chunk(2, dim=1)", "final layer shift/scale swapped"),
    ("sra.py", '"nhwpqc->nchpwq"', '"nhwpqc->ncwphq"', "unpatchify transposed"),
    ("sra.py", "nn.init.xavier_uniform_(module.weight)", "nn.init.xavier_normal_(module.weight)",
     "init: Xavier normal instead of uniform"),
    ("sra.py", "nn.init.normal_(weight, std=0.02)", "nn.init.normal_(weight, std=0.2)",
     "init: embedding std 0.2"),
    ("sra.py", "return tokens + self.pos_embed, self.t_embedder(t) + self.y_embedder(y)",
     "return tokens, self.t_embedder(t) + self.y_embedder(y)", "positions not added"),
    ("sra.py", "return tokens + self.pos_embed, self.t_embedder(t) + self.y_embedder(y)",
     "return tokens + self.pos_embed, self.t_embedder(t)", "labels ignored"),
    ("sra.py", "if i == block_out_s:", "if i == block_out_s + 1:", "student one block late"),
    ("sra.py", "for block in self.blocks[:depth]:", "for block in self.blocks[:depth - 1]:",
     "teacher one block early"),
    ('sra.py', '"SiT-B": (3, 8)', '"SiT-B": (3, 7)', "SiT-B block pair"),
    ('sra.py', '"DiT-L": (6, 14)', '"DiT-L": (6, 16)', "DiT-L block pair"),
    ("sra.py", 'BLOCK_PAIRS.get(args.model.split("/")[0], (1, 4))',
     'BLOCK_PAIRS.get(args.model.split("/")[0], (1, 3))', "T block pair"),
    # ---- objectives
    ("sra.py", "return torch.cos(a * t), torch.sin(a * t), -a * torch.sin(a * t), a * torch.cos",
     "return torch.cos(a * t), torch.sin(a * t), -torch.sin(a * t), torch.cos",
     "cosine path derivatives without pi/2"),
    ("sra.py", 'if weighting == "uniform":', 'if weighting == "lognormal":',
     "time sampling branches swapped"),
    ("sra.py", "return s / (1 + s) if path_type", "return s / (2 + s) if path_type",
     "lognormal time map"),
    ("sra.py", "(x + 0.044715 * x ** 3)", "(x + 0.04715 * x ** 3)", "normal CDF constant"),
    ("sra.py", "(x - means + 1 / 255))", "(x - means + 2 / 255))", "likelihood bin width"),
    ("sra.py", "torch.where(x < -0.999, log_cdf_plus, inner)",
     "torch.where(x < -0.999, log_one_minus_cdf_min, inner)", "likelihood lowest bin"),
    ("sra.py", "torch.log(torch.cat([variance[1:2], variance[1:]]))",
     "torch.log(torch.cat([variance[1:2], variance[:-1]]))", "clipped log variance shifted"),
    ("sra.py", "self.posterior_mean_coef1 = betas * ac_prev.sqrt() / (1 - ac)",
     "self.posterior_mean_coef1 = betas * ac.sqrt() / (1 - ac)", "posterior mean coefficient"),
    ("sra.py", "scale * 0.02, num_timesteps", "0.02, num_timesteps", "beta schedule not rescaled"),
    ("sra.py", "self._per_sample((1 - ac).sqrt(), x0) * noise",
     "self._per_sample(1 - ac, x0) * noise", "q_sample noise coefficient"),
    ("sra.py", "frac = (model_output[:, C:] + 1) / 2", "frac = model_output[:, C:]",
     "learned range not mapped to [0, 1]"),
    ("sra.py", "frac * self._per_sample(self.betas[t].log(), xt)",
     "frac * self._per_sample(self.betas[t], xt)", "learned range: beta without log"),
    ("sra.py", "self._per_sample((1 / ac - 1).sqrt(), xt) * model_output[:, :C])",
     "self._per_sample((1 - ac).sqrt(), xt) * model_output[:, :C])", "x0 from eps"),
    ("sra.py", "* torch.exp(-log_var))) / math.log(2.0)", "* torch.exp(-log_var)))",
     "variational bound in nats"),
    ("sra.py", "return mse + torch.where(t == 0, nll, kl)",
     "return mse + torch.where(t == 1, nll, kl)", "bound: decoder term at t = 1"),
    ("sra.py", "nll = -mean_flat(log_likelihood) / math.log(2.0)",
     "nll = -mean_flat(log_likelihood)", "decoder term in nats"),
    ("sra.py", "frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)",
     "frozen = model_output", "bound trains eps too"),
    ("sra.py", "0.5 * (-1 + log_var - true_log_var + torch.exp(true_log_var - log_var)",
     "0.5 * (-1 + true_log_var - log_var + torch.exp(true_log_var - log_var)", "KL sign"),
    # ---- the SRA term
    ("sra.py", "torch._foreach_add_(ema_params, model_params, alpha=1 - decay)",
     "torch._foreach_add_(ema_params, model_params, alpha=decay)", "EMA weights swapped"),
    ("sra.py", "beta=0.05)", "beta=1.0)", "smooth-L1 beta"),
    ("sra.py", "cos = F.cosine_similarity(student, teacher, dim=-1)",
     "cos = F.cosine_similarity(student, teacher, dim=1)", "cosine over tokens (official)"),
    ("sra.py", "student, teacher = student.float(), teacher.float()", "pass",
     "alignment normalised in fp16"),
    ("sra.py", "return (1 - cos).mean(), cos.detach().mean()",
     "return (1 - cos).sum(), cos.detach().mean()", "cos loss summed"),
    ("sra.py", "return weight * 0.1 ** (max(0, step - decay_start)",
     "return weight * 0.5 ** (max(0, step - decay_start)", "lambda halves instead of tenfold"),
    ("sra.py", "< args.cfg_prob", "> args.cfg_prob", "label dropout at rate 1 - p"),
    ("sra.py", "y = torch.where(drop, ema.num_classes, y)",
     "y = torch.where(drop, ema.num_classes - 1, y)", "null label = last class"),
    ("sra.py", "< args.cfg_prob", "< 0.1", "label dropout hard-coded"),
    ("sra.py", "t = sample_time(N, args.weighting, args.path_type, device, generator)",
     "t = sample_time(N, \"uniform\", args.path_type, device, generator)", "--weighting ignored"),
    ("sra.py", "seed=args.seed, drop_last=True)", "seed=0, drop_last=True)",
     "data order ignores --seed"),
    ("sra.py", "(t - args.t_max * torch.rand(N, device=device, generator=generator))",
     "(t - 0.2 * torch.rand(N, device=device, generator=generator))", "t_max hard-coded"),
    ("sra.py", "generator=generator)).clamp(0, 1)", "generator=generator)).clamp(-1, 1)",
     "teacher time not clamped at 0"),
    ("sra.py", "(t - args.t_max * torch.rand(", "(t + args.t_max * torch.rand(",
     "teacher noisier than the student"),
    ("sra.py", "alpha, sigma, _, _ = interpolant(t_teacher.view(-1, 1, 1, 1), args.path_type)",
     "alpha, sigma, _, _ = interpolant(t_teacher.view(-1, 1, 1, 1))", "teacher on the linear path"),
    ("sra.py", "x_teacher = alpha * x + sigma * noise",
     "x_teacher = alpha * x + sigma * torch.randn_like(noise)", "teacher gets other noise"),
    ("sra.py", "t = torch.randint(0, T, (N,), device=device, generator=generator)",
     "t = torch.randint(1, T, (N,), device=device, generator=generator)", "DiT never trains t = 0"),
    ("sra.py", "torch.randint(0, max(1, round(args.t_max * T)), (N,)",
     "torch.randint(0, 200, (N,)", "DiT teacher offset hard-coded"),
    ("sra.py", "t_teacher = (t - offset).clamp(1, T - 1)",
     "t_teacher = (t - offset).clamp(0, T - 1)", "DiT teacher clamped at step 0"),
    ("sra.py", "teacher = ema.forward_features(x_teacher, t_teacher, y, args.block_out_t)",
     "teacher = ema.forward_features(x_teacher, t, y, args.block_out_t)", "teacher at student t"),
    ("sra.py", "with torch.no_grad():  # stop-gradient", "with contextlib.nullcontext():  #",
     "teacher under autograd"),
    ("sra.py", "target = d_alpha * x + d_sigma * noise", "target = d_alpha * noise + d_sigma * x",
     "velocity target swapped"),
    ("sra.py", "output, student = model(x_t, t, y, block_out_s=args.block_out_s)",
     "output, student = model(x_t, t, y, block_out_s=args.block_out_t)",
     "student at teacher block"),
    # ---- data
    ("sra.py", "return (mean + std * noise) * 0.18215", "return mean + std * noise",
     "latents not scaled"),
    ("sra.py", "mean, std = x.float().chunk(2, dim=1)", "std, mean = x.float().chunk(2, dim=1)",
     "posterior mean and std swapped"),
    ("sra.py", "x.flip(-1), x)", "x.flip(-2), x)", "vertical flips"),
    ("sra.py", "generator=generator) < 0.5", "generator=generator) < 0.1", "flip probability"),
    ("sra.py", "while min(*image.size) >= 2 * resolution:",
     "while min(*image.size) > 2 * resolution:", "ADM crop box-downsampling bound"),
    ("sra.py", ".float() / 127.5 - 1", ".float() / 128 - 1", "pixel scale"),
    ("sra.py", "label = index % 10", "label = index % 9", "built-in labels"),
    # ---- the loop
    ("sra.py", "        sampler.skip = 0", "        pass", "resume skip kept past the epoch"),
    ("sra.py", "epoch, skip = divmod(step * accum, len(loader))",
     "epoch, skip = divmod(step, len(loader))", "resume position ignores accumulation"),
    ("sra.py", "sampler.skip = skip * args.batch_size", "sampler.skip = skip",
     "resume skip in batches, not samples"),
    ("sra.py", "run_length(args, len(loader) // accum)", "run_length(args, len(loader))",
     "epochs counted in micro-batches"),
    ("sra.py", "args.epochs * (len(loader) // accum)", "args.epochs * len(loader)",
     "epochs counted in micro-batches (before run_length)"),
    ("sra.py", "if args.max_train_steps is None else args.max_train_steps", "",
     "--max-train-steps ignored"),
    ("sra.py", "if os.fstat(f.fileno()).st_size < f.tell():", "if False:",
     "a short write goes unnoticed"),
    ("sra.py", "from_pretrained(source, low_cpu_mem_usage=False)", "from_pretrained(source)",
     "diffusers' advice to install accelerate"),
    ("sra.py", "manual_seed(args.seed * world_size + rank + 1000003 * step)",
     "manual_seed(args.seed * world_size + 1000003 * step)", "every rank the same stream"),
    ("sra.py", "generator.set_state(ckpt[\"rng\"][rank])", "pass", "resume redraws the stream"),
    ("sra.py", "loss = (denoise + weight * align) / accum", "loss = (denoise + align) / accum",
     "loss without lambda"),
    ("sra.py", "loss = (denoise + weight * align) / accum", "loss = denoise + weight * align",
     "accumulated loss not divided"),
    ("sra.py", "update_ema(ema_params, model_params, args.ema_decay)",
     "update_ema(ema_params, model_params, 1 - args.ema_decay)", "loop passes 1 - EMA decay"),
    ("sra.py", "clip_grad_norm_(raw_model.parameters(), args.max_grad_norm)",
     "clip_grad_norm_(raw_model.parameters(), 1.0)", "--max-grad-norm ignored"),
    ("sra.py", "lr=args.learning_rate,", "lr=1e-4,", "--learning-rate ignored"),
    ("sra.py", "betas=(args.adam_beta1, args.adam_beta2)", "betas=(0.9, 0.999)",
     "--adam-beta1/2 ignored"),
    ("sra.py", "eps=args.adam_epsilon,", "eps=1e-8,", "--adam-epsilon ignored"),
    ("sra.py", "weight_decay=args.adam_weight_decay, fused=True", "fused=True",
     "--adam-weight-decay ignored (AdamW's 0.01)"),
    ("sra.py", "weight = align_weight(step, args.align_weight",
     "weight = align_weight(step + 1, args.align_weight", "lambda of the next step"),
    ("sra.py", "sums[:3] += torch.stack([denoise.detach(), align.detach(), cos]) / accum",
     "sums[:3] += torch.stack([denoise.detach(), align.detach(), cos])", "logged loss x accum"),
    ("sra.py", "ema.load_state_dict({k: v for k, v in model.state_dict().items() if not k.",
     "ema.load_state_dict({k: 0 * v for k, v in model.state_dict().items() if not k.",
     "EMA not a copy at step 0"),
    ("sra.py",
     "model_params = [raw_model.get_parameter(name) for name, _ in ema.named_parameters()]",
     "model_params = [p for n, p in raw_model.named_parameters() if n != 'pos_embed']",
     "EMA pairs by position"),
    # ---- the paper's defaults
    ("sra.py", '"--cfg-prob", type=float, default=0.1', '"--cfg-prob", type=float, default=0.2',
     "default label dropout"),
    ("sra.py", '"--t-max", type=float, default=0.2', '"--t-max", type=float, default=0.1',
     "default t_max"),
    ("sra.py", '"--ema-decay", type=float, default=0.9999', '"--ema-decay", type=float, '
     'default=0.999', "default EMA decay"),
    ("sra.py", '"--learning-rate", type=float, default=1e-4', '"--learning-rate", type=float, '
     'default=1e-3', "default learning rate"),
    ("sra.py", '"--max-grad-norm", type=float, default=1.0', '"--max-grad-norm", type=float, '
     'default=10.0', "default clipping"),
    ("sra.py", '"sml1": 0.2 if args.family == "SiT" else 0.04',
     '"sml1": 0.2 if args.family == "SiT" else 0.4', "default DiT lambda"),
    # ---- FLOPs and the benchmark
    ("sra.py", "+ 4 * T * T * D + 12 * D * D)", "+ 2 * T * T * D + 12 * D * D)",
     "attention FLOPs halved"),
    ("sra.py", "+ forward_flops(model, args.block_out_t)", "+ forward_flops(model)",
     "teacher FLOPs of a full forward"),
    ("sra.py", "statistics.median(step_times[BENCH_WARMUP:]", "statistics.median(step_times[0:]",
     "bench times its warm-up"),
    ("sra.py", "img_per_s=batch / seconds", "img_per_s=args.batch_size / seconds",
     "bench img/s of one micro-batch"),
    ("sra.py", 'with_sra["step_s_median"] / vanilla["step_s_median"]',
     'vanilla["step_s_median"] / with_sra["step_s_median"]', "overhead ratio inverted"),
    # ---- samplers
    ("sample.py", "out = eps_model(x, int(diffusion.timestep_map[i]))", "out = eps_model(x, i)",
     "DDPM feeds the respaced index"),
    ("sample.py", "randn_like(x, generator) if i > 0 else mean",
     "randn_like(x, generator) if i >= 0 else mean", "DDPM noise on the last step"),
    ("sample.py", "out = torch.cat([out, torch.ones_like(out)], dim=1)",
     "out = torch.cat([out, -torch.ones_like(out)], dim=1)", "DDPM fixed small, not large"),
    ("sample.py", "respaced = sra.GaussianDiffusion(1 - ac / ac_prev)",
     "respaced = sra.GaussianDiffusion(1 - ac)", "respaced betas"),
    ("sample.py", "t = torch.linspace(1, 0.04, num_steps, dtype=torch.float64)",
     "t = torch.linspace(1, 0.0, num_steps, dtype=torch.float64)", "SDE grid to 0"),
    ("sample.py", "w = 2 * t[i]", "w = t[i]", "SDE diffusion w = t"),
    ("sample.py", "x = x + w.sqrt() * dt.abs().sqrt() * randn_like(x, generator)",
     "x = x + w.sqrt() * dt.abs() * randn_like(x, generator)", "SDE noise scale"),
    ("sample.py", "score = (ratio * v - x) / (sigma ** 2 - ratio * d_sigma * sigma)",
     "score = (ratio * v - x) / sigma ** 2", "SDE score formula"),
    ("sample.py", "x = x + (v - 0.5 * w * score) * dt", "x = x + (v - w * score) * dt",
     "SDE drift without 1/2"),
    ("sample.py", "if i < num_steps - 1:\n            x = x + w.sqrt()",
     "if i < num_steps:\n            x = x + w.sqrt()", "SDE noise on the last step"),
    ("sample.py", "x_next = x + dt * 0.5 * (d_cur + d_next)", "x_next = x + dt * d_next",
     "Heun without the trapezoid"),
    ("sample.py", "if heun and i < num_steps - 1:", "if heun:", "Heun corrects the last step"),
    ("sample.py", "t = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()",
     "t = torch.linspace(1, 0.001, num_steps + 1, dtype=torch.float64).tolist()",
     "ODE stops short of 0"),
    ("sample.py", "guided = uncond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C])",
     "guided = cond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C])", "CFG formula"),
    ("sample.py", "if cfg_scale == 1 or not guidance_low <= t_cfg <= guidance_high:",
     "if cfg_scale == 1 or not guidance_low <= t_cfg < guidance_high:", "CFG interval open"),
    ("sample.py", "y_null = torch.full_like(y, model.num_classes)",
     "y_null = torch.full_like(y, 1000)", "null label hard-coded 1000"),
    ("sample.py", "t_cfg = (t if t_start is None else t_start)", "t_cfg = (t if True else t_start)",
     "CFG decided per evaluation"),
    ("sample.py", "out = torch.cat([guided, cond[:, C:]], dim=1)",
     "out = torch.cat([guided, uncond[:, C:]], dim=1)", "variance from the unconditional pass"),
    ("sample.py", "return -self.net(x, 1 - t, y)[:, :self.in_channels]",
     "return -self.net(x, t, y)[:, :self.in_channels]", "SiT-repo time not reversed"),
    ("sample.py", "x = vae.decode(x.float() / 0.18215).sample", "x = vae.decode(x.float()).sample",
     "latents decoded unscaled"),
    ("sample.py", "x = ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)",
     "x = ((x.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)", "uint8 truncates"),
    ("sample.py", "row, col = divmod(i, nrow)", "col, row = divmod(i, nrow)", "grid transposed"),
    ("sample.py", "y = torch.stack([torch.randint(num_classes, (), generator=g)",
     "y = torch.stack([torch.randint(num_classes - 1, (), generator=g)", "last class never drawn"),
    ("sample.py", "labels = torch.arange(k).repeat(8)",
     "labels = torch.arange(k).repeat_interleave(8)", "grid classes in rows"),
    ("sample.py", "return ((key >> 32 | 1) * index + key) & 0xFFFFFFFF",
     "return (index + key) & 0xFFFFFFFF", "streams of seeds only shifted"),
    ("sample.py", "num_classes = int(args.get(\"num_classes\") or rows - 1)",
     "num_classes = int(args.get(\"num_classes\") or rows)", "released weights: null row a class"),
    ("sample.py", "x = sample_sde(f, z, num_steps, path_type, generator)",
     "x = sample_sde(f, z, num_steps, \"linear\", generator)", "SDE score on the linear path"),
    ("sample.py", "num_steps=args.num_steps or (50 if args.grid else 250)",
     "num_steps=args.num_steps or (50 if args.grid else 100)", "default sampling steps"),
    ("sample.py", 'mode = args.mode or ("ddpm" if family == "DiT" else "sde")',
     'mode = args.mode or ("ddpm" if family == "DiT" else "ode")', "default SiT sampler"),
    ("sample.py", 'if path_type not in ("Linear", "GVP", "VP"):\n        raise',
     'if False:\n        raise', "unknown path type read as cosine"),
    ("sample.py", "        log(f\"wrote {N} PNGs to {os.path.join(run_dir, 'png')}\")",
     "        pass", "PNG folder not said"),
]


def slow_tests(path):
    """Names of the tests in a test file that start processes (run only with --slow): those
    that carry the slow marker, or, in a file from before the marker, mention a subprocess."""
    source = open(path).read()
    tree = ast.parse(source)
    spawning = ("subprocess.", "torchrun(tmp_path", "train(tmp_path", "start(tmp_path")
    names = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            text = ast.get_source_segment(source, node)
            fixtures = {a.arg for a in node.args.args}  # these run sra.py in a subprocess
            spawns = (any(word in text for word in spawning)
                      or {"reference", "accumulated"} & fixtures)
            if "mark.slow" in text or ("mark.slow" not in source and spawns):
                names.append(node.name)
    return names


def run_tests(folder, tests, fast, timeout):
    """pytest in `folder`: True when it fails or hangs (the mutant is caught)."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", tests]
    if fast:
        command += ["-m", "not slow"]
        if "mark.slow" not in open(os.path.join(folder, tests)).read():  # an older test file
            command += [f"--deselect={tests}::{name}"
                        for name in slow_tests(os.path.join(folder, tests))]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return True
    return proc.returncode != 0


def main():
    """Apply each mutant to a copy of the repository and run the tests there."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", action="append", default=[],
                        help="only mutants whose description has this (any of several)")
    parser.add_argument("--slow", action="store_true", help="survivors: the whole suite")
    parser.add_argument("--tests", default=os.path.join(ROOT, "test_sra.py"), help="test file")
    parser.add_argument("--code", help="the repository at this git revision (else the working "
                        "tree)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds a test run may take")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--shard", default="0/1", help="K/N: every N-th mutant from the K-th "
                        "(run N such calls at once on N cores)")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.k or any(word in m[3] for word in args.k)]
    survivors, absent = [], []
    with tempfile.TemporaryDirectory() as folder:
        if args.code:  # that release's whole tree: its code, its README, its figures
            archive = subprocess.run(["git", "archive", args.code], cwd=ROOT, check=True,
                                     capture_output=True).stdout
            subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
        else:  # the working tree as it is
            shutil.copytree(ROOT, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
                ".git", "exps", "samples", "data", "__pycache__", "gpu-check"))
        shutil.copy(args.tests, os.path.join(folder, "test_sra.py"))
        for file, old, new, what in chosen:
            count = open(os.path.join(folder, file)).read().count(old)
            if count > 1:
                sys.exit(f"mutant {what!r}: its text occurs {count} times in {file}, not once")
            if count == 0:
                absent.append(f"{file}: {what}")
        chosen = [m for m in chosen if f"{m[0]}: {m[3]}" not in absent]
        k, n = map(int, args.shard.split("/"))
        chosen = chosen[k::n]
        if args.list:
            print("\n".join(f"{file}: {what}" for file, _, _, what in chosen))
            return
        # A suite that fails without any mutant would "catch" every one of them
        if run_tests(folder, "test_sra.py", True, args.timeout):
            sys.exit("the tests fail on the code without a mutant: make them pass first")
        for n, (file, old, new, what) in enumerate(chosen, 1):
            path = os.path.join(folder, file)
            original = open(path).read()
            open(path, "w").write(original.replace(old, new))
            start = time.time()
            try:
                caught = run_tests(folder, "test_sra.py", True, args.timeout)
                if not caught and args.slow:
                    caught = run_tests(folder, "test_sra.py", False, args.timeout)
            finally:
                open(path, "w").write(original)
            print(f"[{n}/{len(chosen)}] {'caught  ' if caught else 'SURVIVED'} {file}: {what} "
                  f"({time.time() - start:.0f} s)", flush=True)
            if not caught:
                survivors.append(f"{file}: {what}")
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutants caught")
    for line in absent:
        print(f"  not in this code: {line}")
    for line in survivors:
        print(f"  survived: {line}")


if __name__ == "__main__":
    main()
