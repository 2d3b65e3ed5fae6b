"""The README's first two figures, from the README's own two commands: the demo's grid, with the
shape classifier's score of it for the caption, and the demo's curves from its metrics.jsonl.

    python sra.py --model SiT-T/4 ... --exp-name demo       # the README's demo command
    python sample.py --ckpt exps/demo/checkpoints/0001500.pt --grid
    python figures/demo.py                             # -> figures/demo-grid.png, demo-loss.png

It reads the run folder (--run, default exps/demo) and the newest grid that sample.py wrote of its
last checkpoint (--grid, default the newest samples/*-<step>-*-grid.png), copies the grid into
figures/ (twice the size, each pixel a 2 x 2 block, so that a 32 px sample can be seen, in 128
colours, which look the same and take under half the bytes), draws
the curves with compare.py's PIL plotting (no plotting library needed), and prints the caption's
figures: the classifier's accuracy on the grid's filled shapes (columns 0-4) and outlines (5-9).
"""
import argparse
import glob
import json
import os
import sys

from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import compare  # noqa: E402  (the plotting; it also puts the repository on the path)
import shapes  # noqa: E402


def read_run(run):
    """The run's metrics.jsonl (the last record of each step) and its last checkpoint's step."""
    records = compare.read_metrics(os.path.join(run, "metrics.jsonl"))
    with open(os.path.join(run, "args.json")) as f:
        last = json.load(f)["max_train_steps"]
    return records, last


def newest_grid(step):
    """The newest grid PNG that sample.py wrote of a checkpoint of this step, in samples/."""
    found = glob.glob(os.path.join(ROOT, "samples", f"*-{step:07d}-*-grid.png"))
    if not found:
        sys.exit(f"no samples/*-{step:07d}-*-grid.png: run the README's sample.py --grid first")
    return max(found, key=os.path.getmtime)


def draw_curves(path, records):
    """Two panels: the denoising loss and the student-teacher cosine against the step."""
    steps = sorted(records)
    loss = {"sra": {s: (records[s]["gen_loss"],) * 3 + (None,) for s in steps}}
    cos = {"sra": {s: (records[s]["align_cos"],) * 3 + (None,) for s in steps}}
    width, height = 1000, 400
    canvas = Image.new("RGBA", (compare.px(width), compare.px(height)), "white")
    boxes = [(i * width / 2 + 84, 48, (i + 1) * width / 2 - 24, height - 76) for i in range(2)]
    compare.panel(canvas, boxes[0], "Denoising loss (mean of 100 steps)", "velocity MSE",
                  loss, steps[-1])
    compare.panel(canvas, boxes[1], "Student-teacher cosine (SRA term)", "cosine", cos,
                  steps[-1], top_value=1.0)
    compare.save_figure(canvas, path, (width, height))


def main(argv=None):
    """Copy the grid, draw the curves, print the caption's figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--run", default=os.path.join(ROOT, "exps", "demo"), help="the demo's run folder")
    add("--grid", help="sample.py's grid PNG (default: the newest of the run's last checkpoint in "
        "samples/)")
    add("--out", default=HERE, help="where demo-grid.png and demo-loss.png go (default: figures/)")
    add("--classifier", default=shapes.WEIGHTS, help="the shape classifier's weights (trained "
        "there first if missing, as figures/shapes.py train does)")
    args = parser.parse_args(argv)
    records, last = read_run(args.run)
    grid_path = args.grid or newest_grid(last)
    grid = Image.open(grid_path).convert("RGB")
    # 128 colours (no difference to see, under half the bytes), each pixel a 2 x 2 block
    palette = grid.quantize(128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    palette.resize((2 * grid.width, 2 * grid.height), Image.NEAREST).save(
        os.path.join(args.out, "demo-grid.png"), optimize=True)
    draw_curves(os.path.join(args.out, "demo-loss.png"), records)
    if not os.path.exists(args.classifier):  # the caption's classifier (seeded: always the same)
        shapes.train(path=args.classifier)
    filled, outlines, _ = shapes.score(grid_path, shapes.load(args.classifier))
    first, final = records[min(records)], records[last]
    print(f"demo-grid.png from {grid_path}: the classifier names {filled:.1%} of the filled "
          f"shapes and {outlines:.1%} of the outlines\ndemo-loss.png: denoising "
          f"loss {first['gen_loss']:.3f} at step {min(records)}, {final['gen_loss']:.3f} at step "
          f"{last}; cosine {first['align_cos']:.3f} -> {final['align_cos']:.3f}")


if __name__ == "__main__":
    main()
