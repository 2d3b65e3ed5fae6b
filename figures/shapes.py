"""A shape-only classifier for sra.py's built-in data: the measure behind the README's figures.

In the built-in data a class is both a shape and a hue. This classifier learns the ten shapes
(filled disc, square, diamond, cross, bar; then their outlines) drawn in random colours, sizes and
places, blurred and noised, each image standardised: only the shape can tell the class. It scores
the demo's grid (figures/demo.py) and the comparison's samples (figures/compare.py), and is
trained the first time one of them needs it (exps/shape-score.pt, about 4 minutes on one core).

    python figures/shapes.py GRID.png   # the accuracy on a grid's filled shapes and outlines
"""
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
WEIGHTS = os.path.join(ROOT, "exps", "shape-score.pt")
R = 32  # the classifier's resolution
sys.path.insert(0, ROOT)
import sra  # noqa: E402  (the built-in data)


def draw(n, rng):
    """n random-colour shapes (n, 3, R, R) in [-1, 1] and their labels (n,)."""
    labels = rng.integers(0, 10, n)
    images = np.empty((n, 3, R, R), np.float32)
    for i, label in enumerate(labels):
        # the geometry of sra.ShapesDataset over wider ranges; drawn at 2R half the time and
        # averaged down (antialiased edges)
        S = 2 * R if rng.random() < 0.5 else R
        yy, xx = (np.mgrid[0:S, 0:S] + 0.5) / S
        dx = abs(xx - 0.5 - rng.uniform(-0.17, 0.17))
        dy = abs(yy - 0.5 - rng.uniform(-0.17, 0.17))
        bar = rng.uniform(1.4, 2.2)
        arm = rng.uniform(2.5, 3.5)
        distance = [np.hypot(dx, dy), np.maximum(dx, dy), dx + dy,
                    np.minimum(np.maximum(dx, arm * dy), np.maximum(arm * dx, dy)),
                    np.maximum(bar * dx, dy)][label % 5]
        s = rng.uniform(0.15, 0.42)
        ring = rng.uniform(0.3, 0.75)
        inside = (distance < s) & (distance > (ring * s if label >= 5 else -1))
        # any colour for the shape, a dim tilted background: no hue or brightness means a class
        color = rng.uniform(0, 1, 3)
        color = color / color.max() * rng.uniform(0.35, 1.0)
        bg = rng.uniform(0, 0.45) + rng.uniform(-0.15, 0.15) * (xx - 0.5)
        bg = bg + rng.uniform(-0.15, 0.15) * (yy - 0.5)
        bg = np.clip(bg[..., None] * (1 + rng.uniform(-0.3, 0.3, 3)), 0, 1)
        image = np.where(inside[..., None], color, bg)
        if S != R:
            image = image.reshape(R, 2, R, 2, 3).mean((1, 3))
        images[i] = image.transpose(2, 0, 1) * 2 - 1
    out = []
    for image in torch.from_numpy(images):
        # degradations: blurred (down and up again) or blocky, Gaussian noise, contrast
        r = rng.random()
        if r < 0.25:
            size = int(rng.integers(12, 28))
            image = F.interpolate(image[None], size=size, mode="area")
            image = F.interpolate(image, size=R, mode="bilinear", align_corners=False)[0]
        elif r < 0.4:
            k = int(rng.choice([2, 4]))
            image = F.avg_pool2d(image[None], k)
            image = image.repeat_interleave(k, 2).repeat_interleave(k, 3)[0]
        image = image + torch.randn_like(image) * float(rng.uniform(0, 0.15))
        out.append(image * float(rng.uniform(0.6, 1.2)))
    return torch.stack(out), torch.from_numpy(labels)


def conv_block(i, o):
    """Two 3x3 convolutions with BatchNorm and ReLU, i -> o channels."""
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                         nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())


def net():
    """The classifier: three conv blocks (24, 48, 96 channels), average pool, Linear(96, 10)."""
    return nn.Sequential(conv_block(3, 24), nn.MaxPool2d(2), conv_block(24, 48), nn.MaxPool2d(2),
                         conv_block(48, 96), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(96, 10))


def prepare(x):
    """Images (n, 3, H, W) in [-1, 1] -> the classifier's input: R x R, standardised per image."""
    if x.shape[-1] != R:
        x = F.interpolate(x, size=R, mode="bilinear", align_corners=False)
    x = x - x.mean((1, 2, 3), keepdim=True)
    return x / (x.std((1, 2, 3), keepdim=True) + 1e-3)


@torch.no_grad()
def predict(model, x):
    """The predicted classes (n,) of images (n, 3, H, W) in [-1, 1]."""
    return model(prepare(x)).argmax(1)


@torch.no_grad()
def features(model, x):
    """The 96 features before the last Linear (n, 96): what FID takes from Inception's pool."""
    return model[:-1](prepare(x))


def real_shapes(n, resolution=R, start=10_000_000):
    """n built-in images and labels, from an index far past those a demo run trains on."""
    dataset = sra.ShapesDataset(resolution)
    x, y = zip(*(dataset[start + i] for i in range(n)))
    return torch.stack(x), torch.tensor(y)


def train(steps=2000, path=WEIGHTS, batch=64):
    """Train the classifier (seeded, one thread: the same weights every time) and save it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = net()
    opt = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    for step in range(steps):
        x, y = draw(batch, rng)
        loss = F.cross_entropy(model(prepare(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    torch.set_num_threads(threads)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(model.state_dict(), path)


def load(path=WEIGHTS, steps=2000, batch=64):
    """The classifier saved at path (trained there first if the file is missing), in eval mode."""
    if not os.path.exists(path):
        print(f"training the shape classifier, {steps} steps, into {path}", flush=True)
        train(steps, path, batch)
    model = net()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def score(path, model):
    """A sample.py --grid PNG (10 columns, one per class) -> accuracy on columns 0-4 and 5-9."""
    grid = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1
    T = grid.shape[1] // 10  # the tile: one sample
    tiles = torch.from_numpy(grid).permute(2, 0, 1).unfold(1, T, T).unfold(2, T, T)
    x = tiles.permute(1, 2, 0, 3, 4).reshape(-1, 3, T, T)  # (rows * 10, 3, T, T), row by row
    y = torch.arange(10).repeat(len(x) // 10)
    right = (predict(model, x) == y).float()
    return right[y < 5].mean().item(), right[y >= 5].mean().item()


if __name__ == "__main__":
    for grid_path in sys.argv[1:]:
        filled, outlines = score(grid_path, load())
        print(f"{grid_path}: filled shapes {filled:.1%}, outlines {outlines:.1%}")
