"""Shape-only classifier for the built-in data of sra.py, and a scorer for sample.py --grid PNGs:
the measurement behind the README's demo figure and figures/compare.py (the weights go to exps/).

The class of a ShapesDataset image is also its hue, so the classifier is trained on the same
geometry (filled disc, square, diamond, cross, bar; then their outlines) drawn with RANDOM colours
(hue, brightness, background independent of the class), wide size/jitter/ring ranges, noise and
random down-then-up sampling, and each image is standardised per image. Neither hue nor luminance
level can identify the class; only the shape can.

    python figures/shapes.py train                  # -> exps/shape-score.pt (4 min on a core)
    python figures/shapes.py check                  # its accuracy on real ShapesDataset images
    python figures/shapes.py score GRID.png [...]   # columns 0-4 (filled) and 5-9 (outlines)

As a module (figures/ is no package: import it by path, as figures/compare.py does): load() the
weights, predict() classes, features() the 96-dim penultimate features, train(steps, path) anew.
"""
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
WEIGHTS = os.path.join(ROOT, "exps", "shape-score.pt")
R = 32


def draw(n, rng):
    """n random-colour images (n, 3, R, R) in [-1, 1] and their labels (n,)."""
    # the geometry of ShapesDataset over wider ranges, rendered at 2R and box-downsampled half
    # the time (antialiased edges)
    labels = rng.integers(0, 10, n)
    images = np.empty((n, 3, R, R), np.float32)
    for i, label in enumerate(labels):
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
        color = rng.uniform(0, 1, 3)
        color = color / color.max() * rng.uniform(0.35, 1.0)
        bg = rng.uniform(0, 0.45) + rng.uniform(-0.15, 0.15) * (xx - 0.5) \
            + rng.uniform(-0.15, 0.15) * (yy - 0.5)
        bgc = np.clip(bg[..., None] * (1 + rng.uniform(-0.3, 0.3, 3)), 0, 1)
        img = np.where(inside[..., None], color, bgc)
        if S != R:
            img = img.reshape(R, 2, R, 2, 3).mean((1, 3))
        images[i] = img.transpose(2, 0, 1) * 2 - 1
    x = torch.from_numpy(images)
    # degradations: down-up sampling (blur / blocky), Gaussian noise, random contrast
    out = []
    for img in x:
        r = rng.random()
        if r < 0.25:
            size = int(rng.integers(12, 28))
            img = F.interpolate(img[None], size=size, mode="area")
            img = F.interpolate(img, size=R, mode="bilinear", align_corners=False)[0]
        elif r < 0.4:
            k = int(rng.choice([2, 4]))
            img = F.avg_pool2d(img[None], k).repeat_interleave(k, 2).repeat_interleave(k, 3)[0]
        img = img + torch.randn_like(img) * float(rng.uniform(0, 0.15))
        out.append(img * float(rng.uniform(0.6, 1.2)))
    return torch.stack(out), torch.from_numpy(labels)


def standardise(x):
    """Per image: zero mean, unit std over all pixels and channels (no brightness level left)."""
    x = x - x.mean((1, 2, 3), keepdim=True)
    return x / (x.std((1, 2, 3), keepdim=True) + 1e-3)


def net():
    """The classifier: three conv blocks (24, 48, 96 channels), global average pool, Linear."""
    def block(i, o):
        """Two 3x3 conv + BatchNorm + ReLU layers, i -> o channels."""
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())
    return nn.Sequential(block(3, 24), nn.MaxPool2d(2), block(24, 48), nn.MaxPool2d(2),
                         block(48, 96), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10))


def real_shapes(n, resolution=R, start=10_000_000):
    """Fresh ShapesDataset images (indices far beyond those a demo run trains on)."""
    if ROOT not in sys.path:  # (sra.py lives in the repository root)
        sys.path.insert(0, ROOT)
    import sra
    ds = sra.ShapesDataset(resolution)
    xs, ys = zip(*(ds[start + i] for i in range(n)))
    return torch.stack(xs), torch.tensor(ys)


def prepare(x):
    """Images (n, 3, H, W) in [-1, 1] -> the classifier's input: resized to R, standardised."""
    if x.shape[-1] != R:
        x = F.interpolate(x, size=R, mode="bilinear", align_corners=False)
    return standardise(x)


def predict(model, x):
    """The predicted classes (n,) of images (n, 3, H, W) in [-1, 1]."""
    with torch.no_grad():
        return model(prepare(x)).argmax(1)


def features(model, x):
    """The penultimate features (n, 96) of images (n, 3, H, W) in [-1, 1]."""
    # after the average pool and Flatten, before the last Linear: the classifier's Inception pool
    with torch.no_grad():
        return model[:-1](prepare(x))


def train(steps=2000, path=WEIGHTS, batch=64, report=True):
    """Train the seeded classifier (the same one every time) for `steps` steps, save it to path."""
    # report: print its accuracy on held-out random-colour shapes and on real ShapesDataset images
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same floating-point sums on any machine
    try:
        model = train_seeded(steps, batch)
    finally:
        torch.set_num_threads(threads)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(model.state_dict(), path)
    if report:
        x, y = draw(2000, np.random.default_rng(1))
        print("held-out random-colour accuracy", (predict(model, x) == y).float().mean().item())
        check(model)
    return model


def train_seeded(steps, batch):
    """The training loop of train(): seeded draws and initial weights, AdamW, one-cycle lr."""
    rng = np.random.default_rng(0)
    torch.manual_seed(0)  # (the network's initial weights: the same classifier every time)
    model = net()
    opt = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    t0 = time.time()
    for step in range(steps):
        x, y = draw(batch, rng)
        loss = F.cross_entropy(model(standardise(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0:
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    return model.eval()


def check(model):
    """Print the accuracy on 1000 real ShapesDataset images at 32 px and at 16 px."""
    for res in (32, 16):
        x, y = real_shapes(1000, res)
        acc = (predict(model, x) == y).float()
        print(f"real ShapesDataset {res}px: accuracy {acc.mean():.3f} "
              f"(filled {acc[y < 5].mean():.3f}, outlines {acc[y >= 5].mean():.3f})")


def load(path=WEIGHTS):
    """The trained classifier saved at `path`, in eval mode."""
    model = net()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def score(path, model):
    """A --grid PNG -> accuracy on columns 0-4 (filled), on 5-9 (outlines); the predictions."""
    from PIL import Image
    grid = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1
    H, W, _ = grid.shape
    T = W // 10  # tile size = the resolution; 10 columns
    tiles = torch.from_numpy(grid).permute(2, 0, 1).unfold(1, T, T).unfold(2, T, T)  # 3,r,c,T,T
    rows = tiles.shape[1]
    x = tiles.permute(1, 2, 0, 3, 4).reshape(-1, 3, T, T)
    y = torch.arange(10).repeat(rows)
    pred = predict(model, x)
    ok = (pred == y).float()
    filled, outl = ok[y < 5].mean().item(), ok[y >= 5].mean().item()
    confusion = pred.view(rows, 10).T.tolist()  # per column, the predicted classes
    return filled, outl, confusion


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("train", "check", "score"):
        sys.exit(__doc__.split("\n\n")[2])  # the usage lines, exit status 1
    torch.set_num_threads(1)
    if sys.argv[1] == "train":
        train()
    elif sys.argv[1] == "check":
        check(load())
    else:
        model = load()
        results = []
        for path in sys.argv[2:]:
            filled, outl, conf = score(path, model)
            results.append((filled, outl))
            print(f"{path}\n  filled (cols 0-4) {filled:.1%}  outlines (cols 5-9) {outl:.1%}")
            for c, preds in enumerate(conf):
                print(f"    col {c}: predicted {preds}")
        if len(results) > 1:
            f, o = np.mean(results, 0)
            print(f"mean over {len(results)} grids: filled {f:.1%}  outlines {o:.1%}")
