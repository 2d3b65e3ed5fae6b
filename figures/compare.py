"""Does the SRA term help on the built-in data? Train, sample, score and draw, in one command.

What it measures. The README's demo recipe (SiT-T/4 on the built-in shapes, batch 32, lr 2e-3,
EMA 0.99), run on from its 1,500 steps to 2,000, is trained three ways, each with seeds 0, 1, 2:
    sra      the recipe as it is: block 1, through the projector, pulled towards the EMA's block 4
    vanilla  --no-sra: no teacher, no projector, the denoising loss alone
    self     --block-out-t 1: block 1 pulled towards the EMA's block 1 (only the noise differs)
At every checkpoint (steps 500, 1000, 1500, 2000) the EMA draws 500 samples (SDE, 50 steps, no
guidance, the same noise and labels for every checkpoint), and figures/shapes.py's classifier
scores them: the share of samples whose shape is the one their label asks for (filled shapes,
classes 0-4, and outlines, 5-9), and a Fréchet distance between the classifier's 96-dim features
of the samples and of 500 real images. The student-teacher cosine and the denoising loss come from
each run's metrics.jsonl. Out come figures/sra-vs-vanilla.png (Fréchet distance, accuracy and
cosine against the step; mean over the seeds, shaded from the lowest to the highest seed) and
exps/compare/results.md (the same numbers as tables, also printed at the end).

    python figures/compare.py                     # about 3 h on 2 cores, see below
    python figures/compare.py --quick --out DIR   # the pipeline in miniature: ~20 s (a test)

Running time on 2 CPU cores, about 3 hours: 9 runs of 2,000 steps (the README's demo, 1,500 of
them, took 566 s on the 2 cores of its timing; vanilla runs are a quarter faster), the classifier
once (4 minutes, if exps/shape-score.pt is missing), and 36 sample sets of 113 s each (500
samples x 50 network calls); runs already trained, by hand or by an earlier call, are not
trained again.

Everything resumes: a finished run (its last checkpoint exists) is not trained again, a run killed
half-way goes on from its newest checkpoint (sra.py --resume auto), and every score is kept in
<out>/scores.json, so that a second call computes only what is missing.

The Fréchet distance is FID's formula, |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2),
on other features: those of a small shape classifier trained on the built-in geometry drawn in
random colours, not Inception's on ImageNet. Its numbers are not comparable with any FID. With 500
samples in 96 dimensions the estimate is biased upward (the covariances are noisy), which the
printed floor shows: the distance between two disjoint sets of 500 real images, where the true
distance is 0. And it is blind to colour (each image is standardised, and the classifier never
saw colour carry meaning), which in this data is also the class's hue: a sample of the right shape
in the wrong hue scores as a good one.
"""
import argparse
import hashlib
import json
import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the repository: sra.py, sample.py
for folder in (HERE, ROOT):  # shapes.py; sample.py (which imports sra.py)
    if folder not in sys.path:
        sys.path.insert(0, folder)
import sample  # noqa: E402
import shapes  # noqa: E402

# The README's demo recipe, flag by flag (a test compares it with the README's command). The
# comparison runs it on to 2,000 steps: with a constant learning rate nothing depends on the
# length, so the demo's 1,500 steps are the first 1,500 of these runs, bit for bit.
DEMO = ["--model", "SiT-T/4", "--batch-size", "32", "--learning-rate", "2e-3", "--ema-decay",
        "0.99", "--max-train-steps", "1500", "--checkpoint-steps", "500"]
LONGER = {"--max-train-steps": "2000"}
QUICK = {"--max-train-steps": "4", "--checkpoint-steps": "2", "--batch-size": "4"}  # --quick
# The paper's directions at this scale; SiT-T's student block is 1, its teacher block 4
VARIANTS = {"sra": [], "vanilla": ["--no-sra"], "self": ["--block-out-t", "1"]}
LABELS = {"sra": "SRA", "vanilla": "vanilla (--no-sra)", "self": "self-alignment (block 1 to 1)"}
SHORT = {"sra": "SRA", "vanilla": "vanilla", "self": "self 1-1"}  # table headers
COLOURS = {"sra": (31, 119, 180), "vanilla": (230, 115, 0), "self": (44, 150, 44)}
# sample.py's SDE without guidance: the model as trained, no CFG to hide a weak one
SAMPLER = dict(mode="sde", num_steps=50, path_type="linear", cfg_scale=1.0, guidance_low=0.0,
               guidance_high=1.0, heun=False)
REAL_START = 10_000_000  # real images from this ShapesDataset index on: none a run trains on


# ==================================================================================================
# Training: one sra.py subprocess per run, resumable
# ==================================================================================================

def recipe(quick):
    """The demo's flags, run on to 2,000 steps; with quick, a 4-step run at batch 4 with
    checkpoints at steps 2 and 4."""
    flags = list(DEMO)
    for flag, value in (QUICK if quick else LONGER).items():
        flags[flags.index(flag) + 1] = value
    return flags


def flag_value(flags, flag):
    """The integer value of `flag` in a list of command-line flags."""
    return int(flags[flags.index(flag) + 1])


def run_name(variant, seed):
    """The run's folder name under the output folder, e.g. sra-seed0."""
    return f"{variant}-seed{seed}"


def train_command(flags, seed, variant, out):
    """The sra.py command of one run (the very command the background runs were started with)."""
    return [sys.executable, os.path.join(ROOT, "sra.py"), *flags, "--seed", str(seed),
            *VARIANTS[variant], "--output-dir", out, "--exp-name", run_name(variant, seed),
            "--resume", "auto"]


def checkpoint_path(out, name, step):
    """The path of a run's checkpoint at `step`, as sra.py names it."""
    return os.path.join(out, name, "checkpoints", f"{step:07d}.pt")


def checkpoint_steps(flags):
    """The steps at which sra.py saves a checkpoint: every --checkpoint-steps, and the last."""
    total, every = flag_value(flags, "--max-train-steps"), flag_value(flags, "--checkpoint-steps")
    return sorted(set(range(every, total + 1, every)) | {total})


def newest_step(out, name):
    """The step of a run's newest checkpoint, or None (where --resume auto would start)."""
    folder = os.path.join(out, name, "checkpoints")
    files = os.listdir(folder) if os.path.isdir(folder) else []
    return max((int(f[:-3]) for f in files if f.endswith(".pt") and f[:-3].isdigit()),
               default=None)


def train(flags, seed, variant, out, out_arg):
    """Train one run unless it is finished; -> True if a trainer was started."""
    name = run_name(variant, seed)
    final = checkpoint_path(out, name, flag_value(flags, "--max-train-steps"))
    if os.path.exists(final):
        print(f"[train] {name}: finished ({os.path.relpath(final, out)}), not started again",
              flush=True)
        return False
    log = os.path.join(out, f"{name}.out")
    step = newest_step(out, name)
    where = "from scratch" if step is None else f"resuming from step {step}"
    print(f"[train] {name}: started, {where}; output in {log}", flush=True)
    start = time.time()
    os.makedirs(out, exist_ok=True)
    with open(log, "a") as f:  # appended: a resumed run keeps the output of its earlier part
        # cwd: the repository, so that the default output folder reads exps/compare, as in the
        # command the background runs were started with
        code = subprocess.call(train_command(flags, seed, variant, out_arg), cwd=ROOT, stdout=f,
                               stderr=subprocess.STDOUT)
    if code != 0 or not os.path.exists(final):
        with open(log) as f:
            tail = "".join(f.readlines()[-5:])
        sys.exit(f"[train] {name}: sra.py failed (exit status {code}); the end of {log}:\n{tail}")
    print(f"[train] {name}: done in {time.time() - start:.0f} s", flush=True)
    return True


# ==================================================================================================
# Scoring: shape accuracy and a Fréchet distance in the classifier's feature space
# ==================================================================================================

def frechet_distance(mu1, sigma1, mu2, sigma2):
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64, with numpy only."""
    mu1, mu2, sigma1, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, mu2, sigma1, sigma2))
    # tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2): the matrix inside is symmetric positive
    # semi-definite, so both roots come from symmetric eigendecompositions (eigh), without the
    # complex detour of a general matrix square root. Covariances of few samples are singular
    # (--quick: 16 samples in 96 dims, rank 15), and rounding makes tiny eigenvalues negative: 0.
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T  # S1^1/2
    inner = root1 @ sigma2 @ root1
    inner = (inner + inner.T) / 2  # symmetric up to rounding: make it exactly so for eigh
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def statistics_of(features):
    """Mean (d,) and covariance (d, d) of features (n, d), in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def to_model_range(images):
    """uint8 images (n, H, W, 3) -> float (n, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def accuracies(classifier, x, labels):
    """The classifier's accuracy on images x against labels: overall, filled (0-4), outlines."""
    labels = torch.as_tensor(np.asarray(labels))
    right = (shapes.predict(classifier, x) == labels).double()
    return dict(accuracy=right.mean().item(), filled=right[labels < 5].mean().item(),
                outlines=right[labels >= 5].mean().item())


def real_reference(classifier, n):
    """-> (mean, covariance) of n real images' features, and the floor and the real accuracy."""
    # 2n real images: the first n are the reference of every sample set; the distance between
    # them and the other n is the floor, what a perfect model would score with n samples
    x, y = shapes.real_shapes(2 * n, shapes.R, REAL_START)
    # the uint8 round trip of sample.py's to_images, so that both sides are quantised alike
    x = ((x + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1
    first, second = (statistics_of(shapes.features(classifier, half)) for half in x.split(n))
    real = dict(floor=frechet_distance(*first, *second), **accuracies(classifier, x[:n], y[:n]))
    return first, real


def score(path, classifier, reference, n, settings):
    """Sample n images from a checkpoint's EMA and score them -> a dict of figures."""
    start = time.time()
    model, _ = sample.load_model(path)
    # global seed 0 for every checkpoint: the same noise and labels everywhere, so that two
    # checkpoints differ by their weights alone (paired, which lowers the comparison's noise)
    images, labels = sample.make_images(model, None, settings, 0, range(n))
    x = to_model_range(images)
    mu, sigma = statistics_of(shapes.features(classifier, x))
    figures = dict(fd=frechet_distance(mu, sigma, *reference), **accuracies(classifier, x, labels))
    return dict(figures, seconds=round(time.time() - start, 1))


def file_hash(path):
    """The first 16 hex digits of a file's SHA-256."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def load_scores(path, settings):
    """scores.json's content if it was made with these settings, else a fresh one."""
    if os.path.exists(path):
        with open(path) as f:
            scores = json.load(f)
        if scores.get("settings") == settings:
            return scores
        print(f"[score] {path} holds scores made with other settings ({scores.get('settings')}):"
              f" scoring anew", flush=True)
    return dict(settings=settings, real=None, runs={})


def save_scores(path, scores):
    """Write scores.json atomically (a crash leaves the old file or the new one)."""
    with open(f"{path}.tmp", "w") as f:
        json.dump(scores, f, indent=1, sort_keys=True)
    os.replace(f"{path}.tmp", path)


def score_all(runs, steps, out, classifier, scores, scores_path, n, settings):
    """Score every checkpoint that has no score yet -> how many were computed."""
    reference = None  # computed only when a checkpoint needs it
    if scores["real"] is None:
        reference, scores["real"] = real_reference(classifier, n)
        save_scores(scores_path, scores)
    real = scores["real"]
    print(f"[score] floor: Fréchet distance {real['floor']:.3f} between two sets of {n} real "
          f"images (the classifier names {real['accuracy']:.1%} of them)", flush=True)
    computed = 0
    for name in runs:
        for step in steps:
            path = checkpoint_path(out, name, step)
            if str(step) in scores["runs"].get(name, {}) or not os.path.exists(path):
                continue
            if reference is None:
                reference, _ = real_reference(classifier, n)
            figures = score(path, classifier, reference, n, settings)
            scores["runs"].setdefault(name, {})[str(step)] = figures
            save_scores(scores_path, scores)  # after every checkpoint: a kill loses one at most
            computed += 1
            print(f"[score] {name} step {step}: Fréchet {figures['fd']:.3f}, accuracy "
                  f"{figures['accuracy']:.1%} (filled {figures['filled']:.1%}, outlines "
                  f"{figures['outlines']:.1%}), {figures['seconds']:.0f} s", flush=True)
    return computed


# ==================================================================================================
# Collecting: per variant and step, the mean and spread over the seeds
# ==================================================================================================

def read_metrics(path):
    """A run's metrics.jsonl -> {step: record}."""
    # a resumed run logs the steps since its checkpoint twice: the last record wins (the one of
    # the run that went on)
    records = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    record = json.loads(line)
                    records[record["step"]] = record
    return records


def summarise(values):
    """Values over the seeds -> (mean, min, max, std); std is None for fewer than two."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return statistics.fmean(values), min(values), max(values), std


def collect(variants, seeds, scores, out):
    """-> {variant: {quantity: {step: (mean, min, max, std) over the seeds}}}."""
    # quantities: fd, accuracy, filled, outlines at the checkpoints (scores.json); cos and loss
    # at every logged step (metrics.jsonl)
    table = {}
    for variant in variants:
        per_step = {}  # (quantity, step) -> values over the seeds
        for seed in seeds:
            name = run_name(variant, seed)
            for step, figures in scores["runs"].get(name, {}).items():
                for quantity in ("fd", "accuracy", "filled", "outlines"):
                    per_step.setdefault((quantity, int(step)), []).append(figures[quantity])
            for step, record in read_metrics(os.path.join(out, name, "metrics.jsonl")).items():
                per_step.setdefault(("loss", step), []).append(record["gen_loss"])
                if variant != "vanilla":  # (vanilla logs a cosine of 0: it has no teacher)
                    per_step.setdefault(("cos", step), []).append(record["align_cos"])
        table[variant] = {}
        for (quantity, step), values in sorted(per_step.items()):
            table[variant].setdefault(quantity, {})[step] = summarise(values)
    return table


# ==================================================================================================
# Tables: results.md
# ==================================================================================================

def cell(summary, percent=False):
    """'mean ± std' (or the mean alone for one seed), '-' where there is no value."""
    if summary is None:
        return "-"
    mean, _, _, std = summary
    scale, unit, digits = (100, "%", 1) if percent else (1, "", 3)
    text = f"{mean * scale:.{digits}f}{unit}"
    return text if std is None else f"{text} ± {std * scale:.{digits}f}{unit}"


def markdown_table(header, rows):
    """A markdown table: a header row, right-aligned columns but the first."""
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def results_markdown(table, variants, seeds, steps, real, n, flags, settings):
    """results.md: the sample scores per step and variant, the floor, the training metrics."""
    seeds_text = (f"mean ± std over {len(seeds)} seeds ({', '.join(map(str, seeds))})"
                  if len(seeds) > 1 else f"one seed ({seeds[0]})")
    header = ["step"] + [f"Fréchet {SHORT[v]}" for v in variants] + [
        f"accuracy {SHORT[v]}" for v in variants]
    rows = [[str(step)] + [cell(table[v].get("fd", {}).get(step)) for v in variants]
            + [cell(table[v].get("accuracy", {}).get(step), percent=True) for v in variants]
            for step in steps]
    lines = [
        "# SRA vs vanilla on the built-in data", "",
        f"`python sra.py {' '.join(flags)}` with `--seed S`, as SRA, with `--no-sra` (vanilla) and "
        f"with `--block-out-t 1` (self: block 1 aligned to the EMA's block 1); {seeds_text}. "
        f"At each checkpoint the EMA draws {n} samples (SDE, {settings['num_steps']} steps, no "
        f"guidance); figures/shapes.py's classifier names their "
        f"shapes (accuracy) and gives the features of the Fréchet distance to {n} real images "
        f"(lower is better).", "",
        *markdown_table(header, rows), "",
        f"Floor: the Fréchet distance between two disjoint sets of {n} real images is "
        f"{real['floor']:.3f} (what a perfect model would score at this sample size); the "
        f"classifier names {real['accuracy']:.1%} of real images (filled {real['filled']:.1%}, "
        f"outlines {real['outlines']:.1%}).", "",
        "Training (metrics.jsonl, the mean over the 100 steps before each step; vanilla has no "
        "alignment term): the denoising loss and the student-teacher cosine.", ""]
    aligned = [v for v in variants if v != "vanilla"]
    header = ["step"] + [f"loss {SHORT[v]}" for v in variants] + [
        f"cosine {SHORT[v]}" for v in aligned]
    rows = [[str(step)] + [cell(table[v].get("loss", {}).get(step)) for v in variants]
            + [cell(table[v].get("cos", {}).get(step)) for v in aligned] for step in steps]
    return "\n".join(lines + markdown_table(header, rows)) + "\n"


# ==================================================================================================
# The figure, with PIL alone: drawn at 2x, then downsampled (smooth lines)
# ==================================================================================================

SCALE = 2  # drawn at twice the size, downsampled with LANCZOS
WIDTH, HEIGHT = 1500, 480  # the figure's size in pixels
GREY, DARK, GRID = (110, 110, 110), (40, 40, 40), (232, 232, 232)


def px(value):
    """A length in figure pixels -> canvas pixels (the canvas is SCALE times larger)."""
    return round(value * SCALE)


def font(size):
    """Pillow's scalable default font at `size` figure pixels."""
    return ImageFont.load_default(size=px(size))


def text_width(string, face):
    """The width of a string in canvas pixels."""
    return face.getlength(string)


def text(draw, xy, string, face, fill=DARK, anchor="l"):
    """Draw a string at xy (canvas pixels), y its vertical middle, x its left, middle or right
    (anchor l, m, r). (Pillow's default font has no accents: the figure says Frechet.)"""
    draw.text(xy, string, font=face, fill=fill, anchor=anchor + "m")


def vertical_text(canvas, xy, string, face, fill=DARK):
    """Draw a string turned 90 degrees anticlockwise, centred on xy (canvas pixels)."""
    width, height = int(text_width(string, face)) + 4, int(face.size * 1.6)
    layer = Image.new("L", (width, height), 0)
    text(ImageDraw.Draw(layer), (2, height / 2), string, face, fill=255)
    layer = layer.rotate(90, expand=True)
    x, y = round(xy[0] - layer.width / 2), round(xy[1] - layer.height / 2)
    canvas.paste(Image.new("RGB", layer.size, fill), (x, y), layer)


def nice_ticks(low, high, count=5):
    """About `count` round tick values covering [low, high] -> (ticks, step)."""
    span = max(abs(low), abs(high)) * 0.02 or 0.1  # at least 2% of the values' size
    if high - low < span:  # one value, or nearly: a small range around it
        middle = (low + high) / 2
        low, high = middle - span / 2, middle + span / 2
    raw = (high - low) / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw * 0.999)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [i * step for i in range(first, last + 1)], step


def tick_label(value, step, percent=False):
    """A tick's number with as many decimals as the tick step needs."""
    value, step = (value * 100, step * 100) if percent else (value, step)
    digits = max(0, -math.floor(math.log10(step) + 1e-9))
    digits += 1 if round(step / 10 ** math.floor(math.log10(step) + 1e-9), 3) == 2.5 else 0
    return f"{value:.{digits}f}" + ("%" if percent else "")


def light(colour, amount=0.25):
    """A colour mixed with white: `amount` of the colour."""
    return tuple(round(255 - amount * (255 - c)) for c in colour)


def panel(canvas, box, title, ylabel, series, xmax, references=(), percent=False, top_value=None,
          note=None):
    """One plot in box (figure pixels): a line with markers per series, over its min-max band."""
    # series: {variant: {step: (mean, min, max, std)}}; box: (left, top, right, bottom);
    # references: dashed horizontal lines (value, label); top_value: no tick above it (100%, a
    # cosine of 1)
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = (px(v) for v in box)
    values = [v for s in series.values() for m in s.values() for v in m[:3]]
    values += [value for value, _ in references]
    low, high = (min(values), max(values)) if values else (0.0, 1.0)
    if not percent and low >= 0 and low < 0.5 * high:  # distances: from 0 when it is near
        low = 0.0
    yticks, ystep = nice_ticks(low, high)
    if top_value is not None:
        yticks = [t for t in yticks if t <= top_value + 1e-9] or yticks
    xticks, _ = nice_ticks(0, xmax, 4)
    y0, y1 = yticks[0], max(yticks[-1], high)  # (data above the last tick: the top is theirs)

    def to_canvas(step, value):
        """Data -> canvas coordinates."""
        return (left + (right - left) * step / xmax,
                bottom - (bottom - top) * (value - y0) / ((y1 - y0) or 1))

    small, label_face = font(15), font(16.5)
    numbers = [tick_label(tick, ystep, percent) for tick in yticks]
    for tick, number in zip(yticks, numbers):  # horizontal grid lines and the y numbers
        y = to_canvas(0, tick)[1]
        draw.line([(left, y), (right, y)], fill=GRID, width=px(1))
        draw.line([(left - px(5), y), (left, y)], fill=GREY, width=px(1))
        text(draw, (left - px(8), y), number, small, GREY, "r")
    for tick in xticks:  # ticks and numbers under the x axis
        x = to_canvas(tick, y0)[0]
        draw.line([(x, bottom), (x, bottom + px(5))], fill=GREY, width=px(1))
        text(draw, (x, bottom + px(17)), f"{tick:g}", small, GREY, "m")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=GREY, width=px(1.2))
    text(draw, ((left + right) / 2, bottom + px(41)), "training step", label_face, DARK, "m")
    widest = max(text_width(number, small) for number in numbers)  # the label left of them
    vertical_text(canvas, (left - px(22) - widest, (top + bottom) / 2), ylabel, label_face)
    text(draw, ((left + right) / 2, top - px(22)), title, font(19.5), DARK, "m")
    for value, label in references:  # dashed lines: the floor, the real images' accuracy
        y = to_canvas(0, value)[1]
        dash = px(7)
        for x in range(left, right, 2 * dash):
            draw.line([(x, y), (min(x + dash, right), y)], fill=GREY, width=px(1.5))
        text(draw, (right - px(4), y - px(11)), label, small, GREY, "r")
    # the bands first, translucent, so that overlapping spreads stay visible; then the lines
    bands = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    band_draw = ImageDraw.Draw(bands)
    for variant, summaries in series.items():
        steps = sorted(summaries)
        upper = [to_canvas(s, summaries[s][2]) for s in steps]
        lower = [to_canvas(s, summaries[s][1]) for s in reversed(steps)]
        if len(steps) > 1:
            band_draw.polygon(upper + lower, fill=COLOURS[variant] + (56,))
    canvas.alpha_composite(bands)
    draw = ImageDraw.Draw(canvas)
    for variant, summaries in series.items():
        steps = sorted(summaries)
        points = [to_canvas(s, summaries[s][0]) for s in steps]
        colour = COLOURS[variant]
        if len(points) > 1:
            draw.line(points, fill=colour, width=px(2.4), joint="curve")
        radius = px(3.6 if len(points) <= 10 else 2.2)  # every 100 steps: smaller dots
        for x, y in points:
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour,
                         outline="white", width=px(0.8))
        for s in steps:  # a single seed's spread, or one step: the min-max as an error bar
            if len(steps) == 1:
                x, ylo = to_canvas(s, summaries[s][1])
                draw.line([(x, ylo), (x, to_canvas(s, summaries[s][2])[1])], fill=colour,
                          width=px(1.2))
    if note:
        text(draw, (right - px(4), bottom - px(13)), note, small, GREY, "r")


def legend(canvas, y, variants, seeds):
    """The legend under the panels: a line and marker per variant, then what the shading is."""
    draw = ImageDraw.Draw(canvas)
    face = font(16.5)
    seeds_text = (f"lines: mean of {len(seeds)} seeds ({', '.join(map(str, seeds))}), shaded: "
                  f"lowest to highest seed" if len(seeds) > 1 else f"one seed ({seeds[0]})")
    entries = [(LABELS[v], COLOURS[v]) for v in variants]
    widths = [px(34) + text_width(label, face) + px(28) for label, _ in entries]
    total = sum(widths) + text_width(seeds_text, face)
    x = (canvas.width - total) / 2
    for (label, colour), width in zip(entries, widths):
        draw.line([(x, y), (x + px(26), y)], fill=colour, width=px(2.4))
        radius = px(3.6)
        cx = x + px(13)
        draw.ellipse([cx - radius, y - radius, cx + radius, y + radius], fill=colour,
                     outline="white", width=px(0.8))
        text(draw, (x + px(34), y), label, face, DARK)
        x += width
    text(draw, (x, y), seeds_text, face, GREY)


def draw_figure(path, table, variants, seeds, real, xmax, n):
    """The three-panel figure: Fréchet distance, shape accuracy, student-teacher cosine."""
    canvas = Image.new("RGBA", (px(WIDTH), px(HEIGHT)), "white")
    width = WIDTH / 3
    boxes = [(i * width + 84, 48, (i + 1) * width - 24, HEIGHT - 104) for i in range(3)]
    fd = {v: table[v].get("fd", {}) for v in variants}
    accuracy = {v: table[v].get("accuracy", {}) for v in variants}
    cos = {v: table[v].get("cos", {}) for v in variants if v != "vanilla"}
    panel(canvas, boxes[0], f"Frechet distance to real images (n = {n})",
          "Frechet distance (lower is better)", fd, xmax,
          references=[(real["floor"], "floor: real vs real")])
    panel(canvas, boxes[1], "Samples of the right shape", "shape accuracy (higher is better)",
          accuracy, xmax, references=[(real["accuracy"], "real images")], percent=True,
          top_value=1.0)
    panel(canvas, boxes[2], "Student-teacher alignment", "cosine, student vs teacher", cos, xmax,
          top_value=1.0, note="vanilla: no alignment term")
    legend(canvas, px(HEIGHT - 25), variants, seeds)
    save_figure(canvas, path, (WIDTH, HEIGHT))


def save_figure(canvas, path, size):
    """The canvas, drawn at SCALE times the size, down to `size`, saved with a palette of 256
    colours: the same look at a fraction of the bytes."""
    image = canvas.convert("RGB").resize(size, Image.LANCZOS)
    image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        path, optimize=True)


# ==================================================================================================
# The command
# ==================================================================================================

def parse_args(argv=None):
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--quick", action="store_true", help="the pipeline in miniature (a test): seed 0, 4-step "
        "runs at batch 4, 16 samples of 5 SDE steps, a classifier of 30 steps; all under --out")
    add("--out", metavar="DIR", help="runs, scores.json, results.md (with --quick also the figure "
        "and the classifier) [default: exps/compare in the repository; --quick: "
        "exps/compare-quick, never the full runs' folder]")
    add("--seeds", type=int, nargs="+", metavar="S", help="training seeds [default: 0 1 2; "
        "--quick: 0]")
    add("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), metavar="V",
        help="which runs: sra, vanilla (--no-sra), self (--block-out-t 1) [default: all three]")
    add("--num-samples", type=int, metavar="N", help="samples per checkpoint, and real images per "
        "set [default: 500; --quick: 16]")
    add("--figure", metavar="PNG", help="the figure [default: figures/sra-vs-vanilla.png in the "
        "repository; --quick: <out>/sra-vs-vanilla.png]")
    args = parser.parse_args(argv)
    # defaults: relative to the repository, whatever the working folder; given paths: as given
    # (--quick's 4-step runs have the full runs' names: never in the full runs' folder)
    default_out = os.path.join(ROOT, "exps", "compare-quick" if args.quick else "compare")
    args.out = os.path.abspath(args.out or default_out)
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.num_samples = args.num_samples or (16 if args.quick else 500)
    if args.num_samples < 2:
        parser.error("--num-samples must be at least 2 (a covariance needs two samples)")
    default_figure = (os.path.join(args.out, "sra-vs-vanilla.png") if args.quick
                      else os.path.join(HERE, "sra-vs-vanilla.png"))
    args.figure = os.path.abspath(args.figure or default_figure)
    return args


def classifier_for(args):
    """The shape classifier and its path; trained first if its weights are missing."""
    # exps/shape-score.pt (2,000 steps, as figures/shapes.py train); --quick: 30 steps, in --out
    path = os.path.join(args.out, "shape-score.pt") if args.quick else shapes.WEIGHTS
    if not os.path.exists(path):
        steps = 30 if args.quick else 2000
        print(f"[classifier] {path} is missing: training one, {steps} steps", flush=True)
        start = time.time()
        if args.quick:  # batch 16 and no accuracy report: seconds
            shapes.train(steps, path, batch=16, report=False)
        else:  # as `python figures/shapes.py train` does
            shapes.train(steps, path)
        print(f"[classifier] trained in {time.time() - start:.0f} s", flush=True)
    return shapes.load(path), path


def main(argv=None):
    """Train what is missing, score what is missing, then draw the figure and write the tables."""
    args = parse_args(argv)
    flags = recipe(args.quick)
    settings = dict(SAMPLER, num_steps=5) if args.quick else dict(SAMPLER)
    os.makedirs(args.out, exist_ok=True)
    # sra.py gets the output folder as the background runs did: relative to the repository
    # (exps/compare) when it lies inside it, else the absolute path
    inside = os.path.commonpath([args.out, ROOT]) == ROOT
    out_arg = os.path.relpath(args.out, ROOT) if inside else args.out
    runs = [(v, s) for v in args.variants for s in args.seeds]
    print(f"{len(runs)} runs: {', '.join(args.variants)} x seeds "
          f"{' '.join(map(str, args.seeds))}, in {args.out}", flush=True)

    started = sum(train(flags, seed, variant, args.out, out_arg) for variant, seed in runs)

    classifier, classifier_path = classifier_for(args)
    steps = checkpoint_steps(flags)
    scores_path = os.path.join(args.out, "scores.json")
    score_settings = dict(num_samples=args.num_samples, sampler=settings, real_start=REAL_START,
                          classifier=file_hash(classifier_path))
    scores = load_scores(scores_path, score_settings)
    names = [run_name(v, s) for v, s in runs]
    computed = score_all(names, steps, args.out, classifier, scores, scores_path,
                         args.num_samples, settings)
    if started == 0 and computed == 0:
        print(f"nothing to redo: all {len(runs)} runs were finished and all their scores were in "
              f"{scores_path}", flush=True)
    else:
        print(f"trained {started} run(s), scored {computed} checkpoint(s)", flush=True)

    table = collect(args.variants, args.seeds, scores, args.out)
    os.makedirs(os.path.dirname(args.figure), exist_ok=True)
    draw_figure(args.figure, table, args.variants, args.seeds, scores["real"], steps[-1],
                args.num_samples)
    markdown = results_markdown(table, args.variants, args.seeds, steps, scores["real"],
                                args.num_samples, flags, settings)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown)
    print(f"figure: {args.figure}\ntables: {os.path.join(args.out, 'results.md')}\n")
    print(markdown)


if __name__ == "__main__":
    main()
