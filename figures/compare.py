"""Does the SRA term help on the built-in data? Train, sample, score and plot, in one command.

The README's demo recipe run on to 2,000 steps three ways, each with seeds 0, 1 and 2: sra (as it
is: block 1, through the projector, pulled towards the EMA's block 4), vanilla (--no-sra) and self
(--block-out-t 1: towards the EMA's block 1, one of the paper's ablations). At every checkpoint
sample.py draws 500 samples from the EMA (SDE, 50 steps, no guidance, global seed 0: the same
noise and labels at every checkpoint) and figures/shapes.py's classifier scores them: the share of
the right shape, and the Frechet distance of its 96 features to those of 500 real images (FID's
formula, not Inception's features: no FID compares with it; two real sets give the floor).

    python figures/compare.py                  # about 3 hours on 2 cores; run again, it resumes
    python figures/compare.py --plot           # redraw the figure from its results file
    python figures/compare.py --quick --out D  # the pipeline in miniature (a test)

It writes figures/compare-results.json (mean and standard deviation over the seeds) and draws
figures/sra-vs-vanilla.png from it. Training resumes (sra.py --resume auto) and the samples are
kept in the run folders, so a second call only scores again.
"""
import argparse
import glob
import json
import os
import statistics
import subprocess
import sys

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)  # the repository: sra.py, sample.py
sys.path.insert(0, HERE)
import shapes  # noqa: E402

# The README's demo command (a test compares them), run on to 2,000 steps; --quick: 4 steps
DEMO = ["--model", "SiT-T/4", "--batch-size", "32", "--learning-rate", "2e-3", "--ema-decay",
        "0.99", "--max-train-steps", "1500", "--checkpoint-steps", "500"]
QUICK = {"--max-train-steps": "4", "--checkpoint-steps": "2", "--batch-size": "4"}
VARIANTS = {"sra": [], "vanilla": ["--no-sra"], "self": ["--block-out-t", "1"]}
LABELS = {"sra": "SRA", "vanilla": "vanilla (--no-sra)", "self": "self-alignment (block 1 to 1)"}
RESULTS = os.path.join(HERE, "compare-results.json")


def pyplot():
    """matplotlib's pyplot on a file backend, or one line that says how to get it."""
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: figures/ plots with matplotlib: pip install matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def recipe(quick):
    """The demo's flags with the comparison's length: 2,000 steps; quick: 4 steps of 4 images."""
    changes = QUICK if quick else {"--max-train-steps": "2000"}
    flags = list(DEMO)
    for flag, value in changes.items():
        flags[flags.index(flag) + 1] = value
    return flags


def last_step(flags):
    """The step at which a run of these flags stops: its last checkpoint's."""
    return int(flags[flags.index("--max-train-steps") + 1])


def train(flags, variant, seed, out):
    """Train one run with sra.py (resuming it if it was stopped) unless it is finished."""
    name = f"{variant}-seed{seed}"
    if os.path.exists(os.path.join(out, name, "checkpoints", f"{last_step(flags):07d}.pt")):
        return
    print(f"[train] {name}: sra.py, output in {out}/{name}.out", flush=True)
    command = [sys.executable, os.path.join(ROOT, "sra.py"), *flags, "--seed", str(seed),
               *VARIANTS[variant], "--output-dir", out, "--exp-name", name, "--resume", "auto"]
    with open(os.path.join(out, f"{name}.out"), "a") as log:
        if subprocess.call(command, stdout=log, stderr=subprocess.STDOUT) != 0:
            sys.exit(f"error: sra.py failed on {name}: see {out}/{name}.out")


def samples(run_dir, step, n, num_steps):
    """n samples of a checkpoint's EMA, by sample.py, into the run's folder (drawn once, kept)."""
    folder = os.path.join(run_dir, f"samples-{step:07d}")
    if not glob.glob(os.path.join(folder, "*.npz")):
        checkpoint = os.path.join(run_dir, "checkpoints", f"{step:07d}.pt")
        command = [sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", checkpoint,
                   "--num-fid-samples", str(n), "--mode", "sde", "--num-steps", str(num_steps),
                   "--cfg-scale", "1", "--per-proc-batch-size", "100", "--sample-dir", folder]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    with np.load(glob.glob(os.path.join(folder, "*.npz"))[0]) as data:
        images = torch.from_numpy(data["arr_0"]).permute(0, 3, 1, 2)  # (n, 3, H, W) uint8
        return images.float() / 127.5 - 1, torch.from_numpy(data["arr_1"])


def statistics_of(features):
    """Mean (d,) and covariance (d, d) of features (n, d), in float64."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """FID's formula: |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)."""
    # tr((S1 S2)^1/2) = tr((S1^1/2 S2 S1^1/2)^1/2), and both roots are of symmetric positive
    # semi-definite matrices: eigh, no complex detour. Covariances of few samples are singular,
    # and rounding makes their zero eigenvalues slightly negative: clipped to 0.
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = root1 @ sigma2 @ root1
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def real_reference(classifier, n):
    """The features' statistics of n real images, and the floor: their distance to n others."""
    x, _ = shapes.real_shapes(2 * n)  # none a run trains on
    x = ((x + 1) * 127.5).round() / 127.5 - 1  # quantised to uint8 levels, as the samples are
    first = statistics_of(shapes.features(classifier, x[:n]))
    second = statistics_of(shapes.features(classifier, x[n:]))
    return first, frechet_distance(*first, *second)


def summary(per_step, scale=1.0):
    """Values per step and seed -> their mean and standard deviation over the seeds, per step."""
    per_step = [[scale * v for v in values] for values in per_step]
    std = [statistics.stdev(values) if len(values) > 1 else 0.0 for values in per_step]
    return {"mean": [statistics.fmean(values) for values in per_step], "std": std}


def run(args):
    """Train, sample and score every run -> the results: mean and std over seeds per checkpoint."""
    flags = recipe(args.quick)
    n = 16 if args.quick else 500
    for variant in VARIANTS:
        for seed in args.seeds:
            train(flags, variant, seed, args.out)
    if args.quick:  # a 30-step classifier: seconds
        classifier = shapes.load(os.path.join(args.out, "shape-score.pt"), 30, 16)
    else:
        classifier = shapes.load()
    reference, floor = real_reference(classifier, n)
    every = int(flags[flags.index("--checkpoint-steps") + 1])
    steps = list(range(every, last_step(flags) + 1, every))
    results = dict(steps=steps, seeds=args.seeds, num_samples=n, floor=round(floor, 4),
                   fd={}, accuracy={})
    for variant in VARIANTS:
        fd = [[] for _ in steps]  # per step, per seed
        accuracy = [[] for _ in steps]
        for i, step in enumerate(steps):
            for seed in args.seeds:
                run_dir = os.path.join(args.out, f"{variant}-seed{seed}")
                x, labels = samples(run_dir, step, n, 5 if args.quick else 50)
                mu, sigma = statistics_of(shapes.features(classifier, x))
                fd[i].append(frechet_distance(mu, sigma, *reference))
                accuracy[i].append((shapes.predict(classifier, x) == labels).double().mean().item())
                print(f"[score] {variant} seed {seed} step {step}: Frechet distance "
                      f"{fd[i][-1]:.2f}, accuracy {accuracy[i][-1]:.1%}", flush=True)
        results["fd"][variant] = summary(fd)
        results["accuracy"][variant] = summary(accuracy, scale=100)
    return results


def plot(results, path):
    """Two panels, Frechet distance and shape accuracy against the step: mean, band of +- std."""
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=100)
    panels = [("fd", "Fréchet distance to real images (lower is better)"),
              ("accuracy", "samples of the right shape, % (higher is better)")]
    for ax, (key, title) in zip(axes, panels):
        for variant, label in LABELS.items():
            mean = np.array(results[key][variant]["mean"])
            std = np.array(results[key][variant]["std"])
            line = ax.plot(results["steps"], mean, marker="o", label=label)[0]
            ax.fill_between(results["steps"], mean - std, mean + std, alpha=0.2,
                            color=line.get_color(), linewidth=0)
        ax.set(title=title, xlabel="training step", xticks=results["steps"])
        ax.grid(alpha=0.3)
    axes[0].axhline(results["floor"], color="grey", linestyle="--", label="floor: real vs real")
    axes[0].set_ylim(bottom=0)
    axes[1].set_ylim(top=100)
    seeds = len(results["seeds"])
    figure.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, frameon=False,
                  title=f"lines: mean over {seeds} seeds; bands: ± one standard deviation")
    figure.tight_layout(rect=(0, 0.13, 1, 1))
    figure.savefig(path)
    plt.close(figure)


def table(results):
    """The results as the README's markdown table: mean ± standard deviation over the seeds."""
    lines = ["| step | Fréchet SRA | vanilla | self | accuracy (%) SRA | vanilla | self |",
             "|---" + "|---:" * 6 + "|"]
    for i, step in enumerate(results["steps"]):
        cells = [f"{results[key][v]['mean'][i]:.1f} ± {results[key][v]['std'][i]:.1f}"
                 for key in ("fd", "accuracy") for v in VARIANTS]
        lines.append(f"| {step:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    """Run the comparison (or with --plot only redraw it), write the results, draw the figure."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plot", action="store_true", help="only draw the figure, from the "
                        "results file")
    parser.add_argument("--quick", action="store_true", help="seed 0, 4 steps, 16 samples")
    parser.add_argument("--out", help="the runs' folder (default: exps/compare, --quick: "
                        "exps/compare-quick); with --quick also the results and the figure")
    args = parser.parse_args(argv)
    folder = "compare-quick" if args.quick else "compare"  # 4-step runs never join real ones
    args.out = os.path.abspath(args.out or os.path.join(ROOT, "exps", folder))
    args.seeds = [0] if args.quick else [0, 1, 2]
    results_path = os.path.join(args.out, "results.json") if args.quick else RESULTS
    figure_path = os.path.join(args.out if args.quick else HERE, "sra-vs-vanilla.png")
    pyplot()  # before hours of training: is matplotlib there?
    os.makedirs(args.out, exist_ok=True)
    if not args.plot:
        with open(results_path, "w") as f:
            json.dump(run(args), f, indent=1)
    with open(results_path) as f:
        results = json.load(f)
    plot(results, figure_path)
    print(f"{figure_path}, from {results_path}:\n{table(results)}\n"
          f"floor (real vs real): {results['floor']:.3f}")


if __name__ == "__main__":
    main()
