"""One-line slips in sra.py and sample.py that the test suite must catch (not part of CI).

Each mutant is one small edit of the kind a reader who forks the tutorial makes by accident: a
sign, a constant, an index, a swapped argument, a flag that no longer reaches what it controls.
It names the definition it lives in ("Block", "DiT.forward"; "main|bench": either) and its text
there, matched ignoring whitespace and comments (a rewrapped line still matches) and exactly once;
one that this code does not hold is reported "not in this code" and not counted. Each mutant goes
into a copy of the repository (never the working tree), where the fast tests run (every test_*.py
at its top, -m "not slow", -x); a mutant that survives is a behaviour no test guards. The copy
without a mutant must pass first; a run that hangs past --timeout counts as caught.

    python .ci/mutants.py                 # every mutant against the fast tests (~40 min on 2 cores)
    python .ci/mutants.py --list          # the mutants that apply to this code, not run
    python .ci/mutants.py --slow          # survivors get the whole suite too
    python .ci/mutants.py -k DDPM -k EMA  # only mutants whose description names one of these
    python .ci/mutants.py --tests OLD.py --code f4722ad  # an older suite on that release's code
    python .ci/mutants.py --shard 0/2 & python .ci/mutants.py --shard 1/2  # on two cores (~20 min)
"""
import argparse
import ast
import functools
import glob
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (the definition it lives in, its text there, the replacement, what the slip is)
SRA_MUTANTS = [
    # ---- the transformer
    ("modulate", "1 + scale", "scale", "adaLN scale without 1 +"),
    ("TimestepEmbedder", "[torch.cos(args), torch.sin(args)]",
     "[torch.sin(args), torch.cos(args)]", "timestep embedding sin first"),
    ("TimestepEmbedder", "/ half", "/ dim", "timestep frequencies over dim"),
    ("get_2d_sincos_pos_embed", "(cols, rows)", "(rows, cols)", "rows and columns swapped"),
    ("Attention", "3, self.num_heads, -1).permute(2, 0, 3, 1, 4)",
     "self.num_heads, 3, -1).permute(3, 0, 2, 1, 4)", "attention qkv layout"),
    ("Block", "scale_mlp, gate_mlp", "gate_mlp, scale_mlp", "adaLN chunk order (released weights)"),
    ("Block", 'approximate="tanh"', 'approximate="none"', "exact GELU instead of tanh"),
    ("Block", "norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)",
     "norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False)", "LayerNorm eps 1e-5"),
    ("Block", "gate_msa.unsqueeze(1) *", "", "attention branch without its gate"),
    ("FinalLayer", "shift, scale =", "scale, shift =", "final layer shift/scale swapped"),
    ("DiT", '"nhwpqc->nchpwq"', '"nhwpqc->ncwphq"', "unpatchify transposed"),
    ("DiT", "xavier_uniform_(module", "xavier_normal_(module", "init: Xavier normal, not uniform"),
    ("DiT", "normal_(weight, std=0.02)", "normal_(weight, std=0.2)", "init: embedding std 0.2"),
    ("DiT", "tokens + self.pos_embed", "tokens", "positions not added"),
    ("DiT", "self.t_embedder(t) + self.y_embedder(y)", "self.t_embedder(t)", "labels ignored"),
    ("DiT.forward", "i == block_out_s", "i == block_out_s + 1", "student one block late"),
    ("DiT.forward_features", "[:depth]", "[:depth - 1]", "teacher one block early"),
    ("BLOCK_PAIRS", '"SiT-B": (3, 8)', '"SiT-B": (3, 7)', "SiT-B block pair"),
    ("BLOCK_PAIRS", '"DiT-L": (6, 14)', '"DiT-L": (6, 16)', "DiT-L block pair"),
    ("parse_args", "(1, 4)", "(1, 3)", "T block pair"),
    # ---- objectives
    ("interpolant", "-a * torch.sin(a * t), a * torch.cos", "-torch.sin(a * t), torch.cos",
     "cosine path derivatives without pi/2"),
    ("sample_time", '"uniform"', '"lognormal"', "time sampling branches swapped"),
    ("sample_time", "s / (1 + s)", "s / (2 + s)", "lognormal time map"),
    ("approx_standard_normal_cdf", "0.044715", "0.04715", "normal CDF constant"),
    ("discretized_gaussian_log_likelihood", "+ 1 / 255", "+ 2 / 255", "likelihood bin width"),
    ("discretized_gaussian_log_likelihood", "-0.999, log_cdf_plus", "-0.999, log_one_minus_cdf_min",
     "likelihood lowest bin"),
    ("GaussianDiffusion", "variance[1:]]", "variance[:-1]]", "clipped log variance shifted"),
    ("GaussianDiffusion", "ac_prev.sqrt()", "ac.sqrt()", "posterior mean coefficient"),
    ("GaussianDiffusion", "scale * 0.02", "0.02", "beta schedule not rescaled"),
    ("GaussianDiffusion.q_sample", "(1 - ac).sqrt()", "(1 - ac)", "q_sample noise coefficient"),
    ("GaussianDiffusion", "(model_output[:, C:] + 1) / 2", "model_output[:, C:]",
     "learned range not mapped to [0, 1]"),
    ("GaussianDiffusion", "betas[t].log()", "betas[t]", "learned range: beta without log"),
    ("GaussianDiffusion", "(1 / ac - 1).sqrt()", "(1 - ac).sqrt()", "x0 from eps"),
    ("GaussianDiffusion", "log_var))) / math.log(2.0)", "log_var)))", "variational bound in nats"),
    ("GaussianDiffusion", "t == 0, nll, kl", "t == 1, nll, kl", "bound: decoder term at t = 1"),
    ("GaussianDiffusion", "log_likelihood) / math.log(2.0)", "log_likelihood)",
     "decoder term in nats"),
    ("GaussianDiffusion", "[:, :C].detach()", "[:, :C]", "bound trains eps too"),
    ("GaussianDiffusion", "-1 + log_var - true_log_var", "-1 + true_log_var - log_var", "KL sign"),
    # ---- the SRA term
    ("update_ema", "alpha=1 - decay", "alpha=decay", "EMA weights swapped"),
    ("align_loss", "beta=0.05", "beta=1.0", "smooth-L1 beta"),
    ("align_loss", "teacher, dim=-1)", "teacher, dim=1)", "cosine over tokens (official)"),
    ("align_loss", "student.float(), teacher.float()", "student, teacher", "alignment in fp16"),
    ("align_loss", "(1 - cos).mean()", "(1 - cos).sum()", "cos loss summed"),
    ("align_weight", "0.1 **", "0.5 **", "lambda halves instead of tenfold"),
    ("training_losses", "< args.cfg_prob", "> args.cfg_prob", "label dropout at rate 1 - p"),
    ("training_losses", "ema.num_classes,", "ema.num_classes - 1,", "null label = last class"),
    ("training_losses", "< args.cfg_prob", "< 0.1", "label dropout hard-coded"),
    ("training_losses", "args.weighting", '"uniform"', "--weighting ignored"),
    ("main", "seed=args.seed", "seed=0", "data order ignores --seed"),
    ("training_losses", "args.t_max * torch.rand(", "0.2 * torch.rand(", "t_max hard-coded"),
    ("training_losses", ".clamp(0, 1)", ".clamp(-1, 1)", "teacher time not clamped at 0"),
    ("training_losses", "t - args.t_max", "t + args.t_max", "teacher noisier than the student"),
    ("training_losses", "interpolant(t_teacher.view(-1, 1, 1, 1), args.path_type)",
     "interpolant(t_teacher.view(-1, 1, 1, 1))", "teacher on the linear path"),
    ("training_losses", "x_teacher = alpha * x + sigma * noise",
     "x_teacher = alpha * x + sigma * torch.randn_like(noise)", "teacher gets other noise"),
    ("training_losses", "randint(0, T,", "randint(1, T,", "DiT never trains t = 0"),
    ("training_losses", "args.t_max * T", "0.2 * T", "DiT teacher offset hard-coded"),
    ("training_losses", ".clamp(1, T - 1)", ".clamp(0, T - 1)", "DiT teacher clamped at step 0"),
    ("training_losses", "(x_teacher, t_teacher,", "(x_teacher, t,", "teacher at student t"),
    ("training_losses", "torch.no_grad()", "contextlib.nullcontext()", "teacher under autograd"),
    ("training_losses", "d_alpha * x + d_sigma * noise", "d_alpha * noise + d_sigma * x",
     "velocity target swapped"),
    ("training_losses", "args.block_out_s", "args.block_out_t", "student at teacher block"),
    # ---- data
    ("prepare_batch", "std * noise) * 0.18215", "std * noise)", "latents not scaled"),
    ("prepare_batch", "mean, std =", "std, mean =", "posterior mean and std swapped"),
    ("prepare_batch", "x.flip(-1)", "x.flip(-2)", "vertical flips"),
    ("prepare_batch", "< 0.5", "< 0.1", "flip probability"),
    ("center_crop_arr", ">= 2 * resolution", "> 2 * resolution", "ADM crop box-downsampling bound"),
    ("to_tensor", "/ 127.5 - 1", "/ 128 - 1", "pixel scale"),
    ("ShapesDataset", "index % 10", "index % 9", "built-in labels"),
    # ---- the loop
    ("epochs_of", "sampler.skip = 0", "pass", "resume skip kept past the epoch"),
    ("main", "divmod(step * accum,", "divmod(step,", "resume position ignores accumulation"),
    ("main", "skip * args.batch_size", "skip", "resume skip in batches, not samples"),
    ("main", "len(loader) // accum)", "len(loader))", "epochs counted in micro-batches"),
    ("run_length", "args.max_train_steps is None", "True", "--max-train-steps ignored"),
    ("load_vae", ", low_cpu_mem_usage=False", "", "diffusers' advice to install accelerate"),
    ("main", "world_size + rank", "world_size", "every rank the same stream"),
    ("main", 'generator.set_state(ckpt["rng"][rank])', "pass", "resume redraws the stream"),
    ("main", "+ weight * align) / accum", "+ align) / accum", "loss without lambda"),
    ("main", "align) / accum", "align)", "accumulated loss not divided"),
    ("main", "args.ema_decay", "1 - args.ema_decay", "loop passes 1 - EMA decay"),
    ("main", "args.max_grad_norm", "1.0", "--max-grad-norm ignored"),
    ("build", "lr=args.learning_rate", "lr=1e-4", "--learning-rate ignored"),
    ("build", "(args.adam_beta1, args.adam_beta2)", "(0.9, 0.999)", "--adam-beta1/2 ignored"),
    ("build", "eps=args.adam_epsilon", "eps=1e-8", "--adam-epsilon ignored"),
    ("build", "weight_decay=args.adam_weight_decay", "weight_decay=0.01",
     "--adam-weight-decay ignored"),
    ("main", "align_weight(step,", "align_weight(step + 1,", "lambda of the next step"),
    ("main", "denoise=denoise / accum", "denoise=denoise", "logged loss x accum"),
    ("Progress.log", "if not fp16 and (", "if (", "an fp16 overflow stops the run"),
    ("build", "{k: v for", "{k: 0 * v for", "EMA not a copy at step 0"),
    ("main", "[raw_model.get_parameter(name) for name, _ in ema.named_parameters()]",
     "[p for n, p in raw_model.named_parameters() if n != 'pos_embed']", "EMA pairs by position"),
    # ---- the paper's defaults
    ("parse_args", '"--cfg-prob", type=float, default=0.1',
     '"--cfg-prob", type=float, default=0.2', "default label dropout"),
    ("parse_args", '"--t-max", type=float, default=0.2', '"--t-max", type=float, default=0.1',
     "default t_max"),
    ("parse_args", '"--ema-decay", type=float, default=0.9999',
     '"--ema-decay", type=float, default=0.999', "default EMA decay"),
    ("parse_args", '"--learning-rate", type=float, default=1e-4',
     '"--learning-rate", type=float, default=1e-3', "default learning rate"),
    ("parse_args", '"--max-grad-norm", type=float, default=1.0',
     '"--max-grad-norm", type=float, default=10.0', "default clipping"),
    ("parse_args", '"SiT" else 0.04', '"SiT" else 0.4', "default DiT lambda"),
    # ---- FLOPs and the benchmark
    ("forward_flops", "4 * T * T * D", "2 * T * T * D", "attention FLOPs halved"),
    ("train_flops", "model, args.block_out_t)", "model)", "teacher FLOPs of a full forward"),
    ("main|bench", "[BENCH_WARMUP:]", "[0:]", "bench times its warm-up"),
    ("main|bench", "img_per_s=batch", "img_per_s=args.batch_size", "bench img/s per micro-batch"),
    ("bench", '["step_s_median"] /', '["step_s_median"] ** -1 *', "overhead ratio inverted"),
]
SAMPLE_MUTANTS = [
    ("sample_ddpm", "diffusion.timestep_map[i]", "i", "DDPM feeds the respaced index"),
    ("sample_ddpm", "if i > 0 else", "if i >= 0 else", "DDPM noise on the last step"),
    ("sample_ddpm", "torch.ones_like(out)", "-torch.ones_like(out)", "DDPM fixed small, not large"),
    ("respace", "1 - ac / ac_prev", "1 - ac", "respaced betas"),
    ("sample_sde", "linspace(1, 0.04,", "linspace(1, 0.0,", "SDE grid to 0"),
    ("sample_sde", "w = 2 * t[i]", "w = t[i]", "SDE diffusion w = t"),
    ("sample_sde", "dt.abs().sqrt() *", "dt.abs() *", "SDE noise scale"),
    ("sample_sde", "/ (sigma ** 2 - ratio * d_sigma * sigma)", "/ sigma ** 2", "SDE score formula"),
    ("sample_sde", "(v - 0.5 * w * score)", "(v - w * score)", "SDE drift without 1/2"),
    ("sample_sde", "if i < num_steps - 1:", "if i < num_steps:", "SDE noise on the last step"),
    ("sample_ode", "dt * 0.5 * (d_cur + d_next)", "dt * d_next", "Heun without the trapezoid"),
    ("sample_ode", "if heun and i < num_steps - 1:", "if heun:", "Heun corrects the last step"),
    ("sample_ode", "linspace(1, 0,", "linspace(1, 0.001,", "ODE stops short of 0"),
    ("model_fn", "guided = uncond[:, :C] +", "guided = cond[:, :C] +", "CFG formula"),
    ("model_fn", "t_cfg <= guidance_high", "t_cfg < guidance_high", "CFG interval open"),
    ("model_fn", "y, model.num_classes)", "y, 1000)", "null label hard-coded 1000"),
    ("model_fn", "t if t_start is None else t_start", "t", "CFG decided per evaluation"),
    ("model_fn", "guided, cond[:, C:]", "guided, uncond[:, C:]", "variance from the uncond pass"),
    ("ReversedSiT|model_fn", "1 - t", "t", "SiT-repo time not reversed"),
    ("to_images", "/ 0.18215", "", "latents decoded unscaled"),
    ("to_images", ".round().clamp(0, 255)", ".clamp(0, 255)", "uint8 truncates"),
    ("save_image_grid", "row, col =", "col, row =", "grid transposed"),
    ("sample_inputs", "randint(num_classes,", "randint(num_classes - 1,", "last class never drawn"),
    ("write_grid|main", "arange(k).repeat(8)", "arange(k).repeat_interleave(8)",
     "grid classes in rows"),
    ("stream_seed", "(key >> 32 | 1) * index", "index", "streams of seeds only shifted"),
    ("load_model", "or rows - 1", "or rows", "released weights: null row a class"),
    ("generate", "num_steps, path_type,", 'num_steps, "linear",', "SDE score on the linear path"),
    ("sampler_settings", "args.grid else 250", "args.grid else 100", "default sampling steps"),
    ("sampler_settings", 'else "sde"', 'else "ode"', "default SiT sampler"),
    ("time_convention|load_model", "path_type not in", "False and path_type not in",
     "unknown path type not refused"),
    ("write_samples", 'log(f"wrote {N} PNGs', 'str(f"wrote {N} PNGs', "PNG folder not said"),
]
MUTANTS = ([("sra.py", *mutant) for mutant in SRA_MUTANTS]
           + [("sample.py", *mutant) for mutant in SAMPLE_MUTANTS])


def definitions(node, prefix=""):
    """(qualified name, node) of each class and function under `node` ("Block.forward"), and of
    each name that the module itself assigns ("BLOCK_PAIRS")."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield prefix + child.name, child
            yield from definitions(child, f"{prefix}{child.name}.")
            continue
        if isinstance(child, ast.Assign) and isinstance(node, ast.Module):
            yield from ((target.id, child) for target in child.targets
                        if isinstance(target, ast.Name))
        yield from definitions(child, prefix)


@functools.lru_cache
def outline(source):
    """The definitions of `source` as {qualified name: [(start, end) offsets]}, and the source
    with its comments and docstrings blanked out (offsets kept): prose that quotes a formula
    must not match a mutant's text."""
    tree = ast.parse(source)
    lines = io.StringIO(source).readlines()
    starts = [0]  # the offset of each line
    for line in lines:
        starts.append(starts[-1] + len(line))
    spans = {}
    for name, node in definitions(tree):
        spans.setdefault(name, []).append((starts[node.lineno - 1], starts[node.end_lineno]))
        if not isinstance(node, ast.Assign) and ast.get_docstring(node, clean=False) is not None:
            for row in range(node.body[0].lineno - 1, node.body[0].end_lineno):
                lines[row] = re.sub(r"\S", " ", lines[row])  # a docstring has its lines alone
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            (row, start), (_, end) = token.start, token.end
            lines[row - 1] = lines[row - 1][:start] + " " * (end - start) + lines[row - 1][end:]
    return spans, "".join(lines)


def locate(source, scope, old):
    """(start, end) of `old` in the definitions `scope` ("a|b": either) of `source`, or why it is
    not there once. Any run of whitespace, or none, may stand between two of its characters."""
    spans, code = outline(source)
    spans = [span for name in scope.split("|") for span in spans.get(name, [])]
    text = "".join(old.split())
    pattern = r"\s*".join(re.escape(char) for char in text)
    # a name or a number at either end is a whole one in the code: "index" is not "index2"
    before = r"(?<!\w)" if re.match(r"\w", text) else ""
    after = r"(?!\w)" if re.match(r"\w", text[-1]) else ""
    pattern = re.compile(before + pattern + after)
    hits = {match.span() for start, end in spans for match in pattern.finditer(code, start, end)}
    if len(hits) == 1:
        return hits.pop()
    if len(hits) > 1:
        return f"{len(hits)} matches in {scope}, not one"
    return "not in this code" if spans else f"not in this code (no {scope})"


def slow_tests(path):
    """The tests that start processes in a suite from before the slow marker: those that mention
    a subprocess or take a fixture that runs sra.py in one."""
    source = open(path).read()
    spawning = ("subprocess.", "torchrun(tmp_path", "train(tmp_path", "start(tmp_path")
    return [node.name for node in ast.parse(source).body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")
            and (any(word in ast.get_source_segment(source, node) for word in spawning)
                 or {"reference", "accumulated"} & {arg.arg for arg in node.args.args})]


def run_tests(folder, fast, timeout):
    """pytest on every test_*.py at the top of `folder`: (caught, the first failure), caught
    when the tests fail or hang."""
    files = sorted(os.path.basename(path) for path in glob.glob(os.path.join(folder, "test_*.py")))
    # a temporary folder of its own: pytest deletes all but the newest 3 of the default ones, and
    # so would break the runs of another shard
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files,
               "--basetemp", os.path.join(folder, ".pytest-tmp")]
    if fast:
        command += ["-m", "not slow"]
        if not any("mark.slow" in open(os.path.join(folder, name)).read() for name in files):
            command += [f"--deselect={name}::{test}" for name in files
                        for test in slow_tests(os.path.join(folder, name))]
    # a session of its own, so that a hung run is killed with every process it started
    proc = subprocess.Popen(command, cwd=folder, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output = proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return True, f"hung for {timeout} s"
    lines = [line for line in output.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return proc.returncode != 0, (lines or output.splitlines()[-1:] or [""])[0][:100]


def copy_repository(folder, code, tests):
    """The repository in `folder`: git revision `code`'s whole tree, or else the working tree;
    the file `tests` (if given) in place of its test_sra.py."""
    if code:
        archive = subprocess.run(["git", "archive", code], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    else:
        shutil.copytree(ROOT, folder, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".git", "exps", "samples", "data", "__pycache__", "gpu-check", ".benchmarks"))
    if tests:
        shutil.copy(tests, os.path.join(folder, "test_sra.py"))


def main():
    """Apply each mutant to a copy of the repository and run the tests there."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", action="append", default=[],
                        help="only mutants whose description has this (any of several)")
    parser.add_argument("--slow", action="store_true", help="survivors: the whole suite")
    parser.add_argument("--tests", help="a test file to run in place of test_sra.py")
    parser.add_argument("--code", help="this git revision's tree (else the working tree)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds a test run may take")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--shard", default="0/1", help="K/N: every N-th mutant from the K-th")
    args = parser.parse_args()
    k, n = map(int, args.shard.split("/"))
    chosen, absent, survivors = [], [], []
    with tempfile.TemporaryDirectory() as folder:
        copy_repository(folder, args.code, args.tests and os.path.abspath(args.tests))
        for file, scope, old, new, what in MUTANTS:
            if args.k and not any(word in what for word in args.k):
                continue
            source = open(os.path.join(folder, file)).read()
            try:
                place = locate(source, scope, old)
            except SyntaxError as e:  # (a file in the middle of an edit)
                sys.exit(f"{file} is not Python: {e}")
            if isinstance(place, str):
                absent.append(f"  {place}: {file}: {what}")
                continue
            try:  # a slip that Python cannot parse would be "caught" by any test
                ast.parse(source[:place[0]] + new + source[place[1]:])
            except SyntaxError as e:
                sys.exit(f"mutant {what!r} is not Python: {e.msg}")
            chosen.append((file, scope, what, place, new))
        applying = len(chosen)
        chosen = chosen[k::n]
        if args.list:
            print(*(f"{file}: {scope}: {what}" for file, scope, what, _, _ in chosen), sep="\n")
            print(f"{applying} of {applying + len(absent)} mutants apply to this code", *absent,
                  sep="\n")
            return
        failed, failure = run_tests(folder, True, args.timeout)
        if failed:  # else every mutant would look caught
            sys.exit(f"the tests fail without a mutant ({failure}): make them pass first")
        for i, (file, scope, what, (start, end), new) in enumerate(chosen, 1):
            began = time.time()
            path = os.path.join(folder, file)
            original = open(path).read()
            open(path, "w").write(original[:start] + new + original[end:])
            try:
                caught, failure = run_tests(folder, True, args.timeout)
                if not caught and args.slow:
                    caught, failure = run_tests(folder, False, args.timeout)
            finally:
                open(path, "w").write(original)
            verdict = f"caught by {failure}" if caught else "SURVIVED"
            print(f"[{i}/{len(chosen)}] {file}: {what}: {verdict} ({time.time() - began:.0f} s)",
                  flush=True)
            if not caught:
                survivors.append(f"  survived: {file}: {scope}: {what}")
    print(f"{len(chosen) - len(survivors)} of {len(chosen)} mutants caught", *survivors, *absent,
          sep="\n")


if __name__ == "__main__":
    main()
