"""Shape-only classifier for the built-in data of sra.py, and a scorer for sample.py --grid PNGs:
the measurement behind the README's demo figure (not part of CI; the weights go to exps/).

The class of a ShapesDataset image is also its hue, so the classifier is trained on the same
geometry (filled disc, square, diamond, cross, bar; then their outlines) drawn with RANDOM colours
(hue, brightness, background independent of the class), wide size/jitter/ring ranges, noise and
random down-then-up sampling, and each image is standardised per image. Neither hue nor luminance
level can identify the class; only the shape can.

    python .ci/shape-score.py train                 # -> exps/shape-score.pt (4 min on a core)
    python .ci/shape-score.py check                 # its accuracy on real ShapesDataset images
    python .ci/shape-score.py score GRID.png [...]  # columns 0-4 (filled) and 5-9 (outlines)
"""
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
WEIGHTS = os.path.join(ROOT, "exps", "shape-score.pt")
R = 32


def draw(n, rng):
    """n random-colour images (n, 3, R, R) in [-1, 1] and labels, the geometry of ShapesDataset
    over wider ranges, rendered at 2R and box-downsampled half the time (antialiased edges)."""
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
    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(),
                             nn.Conv2d(o, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())
    return nn.Sequential(block(3, 24), nn.MaxPool2d(2), block(24, 48), nn.MaxPool2d(2),
                         block(48, 96), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(96, 10))


def real_shapes(n, resolution=R, start=10_000_000):
    """Fresh ShapesDataset images (indices far beyond those a demo run trains on)."""
    sys.path.insert(0, ROOT)
    import sra
    ds = sra.ShapesDataset(resolution)
    xs, ys = zip(*(ds[start + i] for i in range(n)))
    return torch.stack(xs), torch.tensor(ys)


def predict(model, x):
    if x.shape[-1] != R:
        x = F.interpolate(x, size=R, mode="bilinear", align_corners=False)
    with torch.no_grad():
        return model(standardise(x)).argmax(1)


def train(steps=2000, batch=64):
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
    model.eval()
    x, y = draw(2000, np.random.default_rng(1))
    print("held-out random-colour accuracy", (predict(model, x) == y).float().mean().item())
    os.makedirs(os.path.dirname(WEIGHTS), exist_ok=True)
    torch.save(model.state_dict(), WEIGHTS)
    check(model)


def check(model):
    for res in (32, 16):
        x, y = real_shapes(1000, res)
        acc = (predict(model, x) == y).float()
        print(f"real ShapesDataset {res}px: accuracy {acc.mean():.3f} "
              f"(filled {acc[y < 5].mean():.3f}, outlines {acc[y >= 5].mean():.3f})")


def load():
    model = net()
    model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
    return model.eval()


def score(path, model):
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
