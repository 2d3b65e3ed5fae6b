"""The README's demo figures, from its demo run and its grid, and the numbers of their captions.

    python sra.py --model SiT-T/4 ... --exp-name demo     # the README's two demo commands
    python sample.py --ckpt exps/demo/checkpoints/0001500.pt --grid
    python figures/demo.py        # -> figures/demo-grid.png, figures/demo-loss.png

demo-grid.png is sample.py's grid at twice its size (each pixel a 2 x 2 block, so that a 32-pixel
sample can be seen) in 128 colours (the same look in half the bytes); demo-loss.png plots the
denoising loss and the student-teacher cosine of the run's metrics.jsonl. It prints the shape
classifier's accuracy on the grid (figures/shapes.py) and the curves' first and last values.
"""
import argparse
import glob
import json
import os

from PIL import Image

import compare
import shapes


def main(argv=None):
    """Copy the grid, plot the curves, print the captions' numbers."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=os.path.join(compare.ROOT, "exps", "demo"),
                        help="the demo's run folder (default: exps/demo)")
    parser.add_argument("--grid", help="sample.py's grid (default: the newest in samples/)")
    parser.add_argument("--out", default=compare.HERE, help="the figures' folder")
    parser.add_argument("--classifier", default=shapes.WEIGHTS, help="the shape classifier "
                        "(trained there first if missing)")
    args = parser.parse_args(argv)
    plt = compare.pyplot()
    grids = glob.glob(os.path.join(compare.ROOT, "samples", "**", "*grid*.png"), recursive=True)
    grid_path = args.grid or max(grids, key=os.path.getmtime)
    grid = Image.open(grid_path).convert("RGB")
    grid = grid.quantize(128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    grid = grid.resize((2 * grid.width, 2 * grid.height), Image.NEAREST)
    grid.save(os.path.join(args.out, "demo-grid.png"), optimize=True)

    with open(os.path.join(args.run, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    steps = [r["step"] for r in records]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    panels = [("gen_loss", "denoising loss (velocity MSE)"),
              ("align_cos", "student-teacher cosine (the SRA term)")]
    for ax, (key, title) in zip(axes, panels):
        ax.plot(steps, [r[key] for r in records], marker="o", markersize=3)
        ax.set(title=title, xlabel="training step")
        ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(os.path.join(args.out, "demo-loss.png"))
    plt.close(figure)

    filled, outlines = shapes.score(grid_path, shapes.load(args.classifier))
    first, last = records[0], records[-1]
    print(f"demo-grid.png from {grid_path}: the classifier names {filled:.1%} of the filled "
          f"shapes and {outlines:.1%} of the outlines\ndemo-loss.png: denoising loss "
          f"{first['gen_loss']:.3f} at step {first['step']}, {last['gen_loss']:.3f} at step "
          f"{last['step']}; cosine {first['align_cos']:.3f} -> {last['align_cos']:.3f}")


if __name__ == "__main__":
    main()
