"""
The shapes world, version 3 (in progress, issue 34): a miniature of ImageNet-for-VAR where MVP's premise holds by
construction, so that the miniature can test the method rather than the world.

ImageNet's order, which MVP's two semantic levels assume: the class is the coarse gist (a large, centred object
with typical colours, recognisable at scale kappa), and a caption adds detail the class leaves free, some of which
only the fine scales resolve. Here, at 32 px (8x8 latents, scales 1, 2, 3, 4, 6, 8, K = 6, kappa = floor(0.6 K) = 3,
whose 3x3 map covers 12 px views, 3/8 of the last side as VAR-d16's 6/16):
    class       one of 10 large silhouettes (a quarter to two fifths of the image), centred with a small jitter
    colour      the class's typical colour 60% of the time, else another of the palette (a red apple, a green one)
    texture     plain, striped or dotted: two shades whose mean is the colour, in 1-pixel lines or dots, so a view
                at kappa's resolution averages every texture to the same flat colour (the fine-scale attribute)
    background  4 flat colours, never the shape's
    caption     "a {texture} {colour} {class} on a {background} background", in one of three phrasings

    python world3.py gate0            # G0: what the renders hold at kappa's resolution and at full resolution
"""
import argparse
import json
import math
import re
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

from shapes import _cross, _crescent, _normalise, _regular, _star, to_input

IMAGE_SIZE = 32
KAPPA_SIDE = 12  # pixels that scale kappa's 3x3 map covers: 3 tokens x the VQVAE's 4x downsampling
CLASS_SHAPES = {name: _normalise(ops) for name, ops in {
    "circle": [(_regular(64), 1)],
    "crescent": [(_crescent(r=0.8, d=0.55), 1)],
    "cross": [(_cross(0.34), 1)],
    "diamond": [(np.array([(0, -1.3), (0.8, 0), (0, 1.3), (-0.8, 0)]), 1)],
    "heart": [(np.array([(0, 1.0), (-1.0, -0.05), (-0.95, -0.55), (-0.55, -0.85), (0, -0.5), (0.55, -0.85),
                         (0.95, -0.55), (1.0, -0.05)]), 1)],
    "hourglass": [(np.array([(-0.8, -1), (0.8, -1), (0.12, 0), (0.8, 1), (-0.8, 1), (-0.12, 0)]), 1)],
    "ring": [(_regular(64), 1), (_regular(64, radius=0.6), 0)],
    "square": [(np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float), 1)],
    "star": [(_star(inner=0.4), 1)],
    "triangle": [(_regular(3), 1)],
}.items()}
CLASS_NAMES = sorted(CLASS_SHAPES)
NUM_CLASSES = len(CLASS_NAMES)
COLOURS = {"red": (205, 40, 40), "orange": (230, 135, 30), "yellow": (225, 205, 45), "green": (45, 160, 65),
           "cyan": (40, 180, 200), "blue": (50, 80, 210), "purple": (140, 60, 180), "pink": (230, 120, 170)}
TYPICAL_COLOUR = dict(zip(CLASS_NAMES, ["yellow", "cyan", "red", "blue", "pink", "orange", "purple", "green",
                                        "yellow", "orange"]))
TYPICAL_SHARE = 0.6
BACKGROUNDS = {"black": (18, 18, 18), "white": (238, 238, 238), "gray": (125, 125, 125), "navy": (25, 35, 85)}
TEXTURES = ("plain", "striped", "dotted")
SHADE = 48.0  # a texture's two shades: the colour +- SHADE per channel (less near 0 or 255), so their mean is the colour
AREA = (0.26, 0.40)  # the silhouette's share of the image
MAX_SHIFT = 0.06  # centre jitter, fraction of the side
MAX_ANGLE = 10.0
SUPERSAMPLE = 4
PHRASINGS = ("a {texture} {colour} {shape} on a {background} background",
             "a photo of a {texture} {colour} {shape} against a {background} background",
             "a {colour} {shape} with a {texture} surface on a {background} background")
ATTRIBUTES = ("shape", "colour", "texture", "background")
SPLITS = ("train", "test")


def make_split(split: str, n: int, seed: int = 0):
    """n attribute dicts; labels cycle through the classes; item i depends only on (split, seed, i)."""
    items = []
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS.index(split), i, 3])
        shape = CLASS_NAMES[i % NUM_CLASSES]
        colour = TYPICAL_COLOUR[shape] if rng.random() < TYPICAL_SHARE else \
            str(rng.choice([c for c in COLOURS if c != TYPICAL_COLOUR[shape]]))
        items.append(dict(label=i % NUM_CLASSES, shape=shape, colour=colour, texture=str(rng.choice(TEXTURES)),
                          background=str(rng.choice(list(BACKGROUNDS))), phrasing=int(rng.integers(len(PHRASINGS))),
                          jitter=(float(rng.uniform(-MAX_SHIFT, MAX_SHIFT)), float(rng.uniform(-MAX_SHIFT, MAX_SHIFT)),
                                  float(rng.uniform(*AREA)), float(rng.uniform(-MAX_ANGLE, MAX_ANGLE)))))
    return items


def caption(item) -> str:
    return re.sub(r'\ba (?=[aeiou])', 'an ', PHRASINGS[item['phrasing']].format(**item))


def sentence(label: int) -> str:
    return f'a photo of a {CLASS_NAMES[label]}'


def texture_shades(item, size: int) -> np.ndarray:
    """(H, W, 3) float: the shape's colour with its texture, two shades of mean equal to the colour."""
    colour = np.array(COLOURS[item['colour']], dtype=np.float32)
    yy, xx = np.mgrid[:size, :size]
    if item['texture'] == 'plain':
        sign = np.zeros((size, size))
    elif item['texture'] == 'striped':
        sign = np.where(yy % 2 == 0, 1.0, -1.0)  # 1-pixel horizontal lines
    else:
        sign = np.where((yy + xx) % 2 == 0, 1.0, -1.0)  # a 1-pixel checker of dots
    amplitude = np.minimum(SHADE, np.minimum(colour, 255 - colour))  # symmetric: no clipping moves the mean
    return colour + amplitude * sign[..., None]


def render(item, size: int = IMAGE_SIZE) -> np.ndarray:
    """The image of an item, uint8 (H, W, 3)."""
    dx, dy, area, angle = item['jitter']
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    rot = np.array([[c, -s], [s, c]])
    side = math.sqrt(area) * size
    centre = (np.array([0.5 + dx, 0.5 + dy]) * size)
    mask = Image.new('L', (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(mask)
    for poly, fill in CLASS_SHAPES[item['shape']]:
        draw.polygon([tuple(p) for p in (poly @ rot.T * side + centre) * SUPERSAMPLE], fill=255 * fill)
    alpha = np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float32)[..., None] / 255
    background = np.array(BACKGROUNDS[item['background']], dtype=np.float32)
    return np.round(background + alpha * (texture_shades(item, size) - background)).astype(np.uint8)


def area_downsample(images_uint8: np.ndarray, side: int = KAPPA_SIDE) -> np.ndarray:
    """What a view at kappa's resolution holds: each image low-passed to side x side (uint8 in, float out). A 2x2
    mean first, then area resampling: 32 -> 12 px alone would average 1-pixel lines over windows of 2 and 3 pixels,
    and leave them half visible, which no low-pass view at 12 px would."""
    x = F.avg_pool2d(torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float(), 2)
    return F.adaptive_avg_pool2d(x, side).permute(0, 2, 3, 1).numpy()


# -----------------------------------------------------------------------------
# the judge's architecture: a small residual CNN (unlike the CLIP's ViT), trained on renders, used by no loss


class Judge(nn.Module):
    """Images in [-1, 1] of any size (resized to 32) -> logits; .pooled gives the features FD_judge compares."""

    def __init__(self, num_outputs: int = NUM_CLASSES, width: int = 32):
        super().__init__()
        layers, channels = [nn.Conv2d(3, width, 3, padding=1)], width
        for out, stride in ((width, 1), (2 * width, 2), (2 * width, 1), (4 * width, 2)):
            layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, out, 3, stride=stride, padding=1)]
            channels = out
        self.features = nn.Sequential(*layers, nn.BatchNorm2d(channels), nn.ReLU())
        self.head = nn.Linear(channels, num_outputs)

    def pooled(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        if img_B3HW.shape[-1] != IMAGE_SIZE:
            img_B3HW = F.interpolate(img_B3HW, size=(IMAGE_SIZE, IMAGE_SIZE), mode='bilinear', align_corners=False)
        return self.features(img_B3HW).mean(dim=(2, 3))

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(img_B3HW))


def train_judge(images: np.ndarray, targets: np.ndarray, num_outputs: int, epochs: int = 5, seed: int = 0) -> Judge:
    """A Judge trained on (N, H, W, 3) images for targets (N,): AdamW with a one-cycle schedule."""
    torch.manual_seed(seed)
    judge = Judge(num_outputs)
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=0.01)
    x, y = to_input(images), torch.as_tensor(targets)
    steps = epochs * math.ceil(len(x) / 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    for _ in range(epochs):
        for batch in torch.randperm(len(x)).split(128):
            loss = F.cross_entropy(judge.train()(x[batch]), y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return judge.eval()


@torch.no_grad()
def accuracy(judge: Judge, images: np.ndarray, targets: np.ndarray) -> float:
    x = to_input(images)
    predictions = torch.cat([judge(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((predictions == torch.as_tensor(targets)).float().mean())


def gate0(n_train: int = 4000, n_test: int = 1000, seed: int = 0) -> dict:
    """G0, the renders: a Judge trained and tested on renders area-downsampled to kappa's resolution names the class
    (>= 90% wanted); every caption attribute read there (the fine one <= chance + 15 points wanted) and at full
    resolution (>= 95% wanted)."""
    train_items, test_items = make_split('train', n_train, seed), make_split('test', n_test, seed)
    train_full = np.stack([render(a) for a in train_items])
    test_full = np.stack([render(a) for a in test_items])
    views = {'kappa': (area_downsample(train_full), area_downsample(test_full)), 'full': (train_full, test_full)}
    values = {'shape': CLASS_NAMES, 'colour': list(COLOURS), 'texture': list(TEXTURES), 'background': list(BACKGROUNDS)}
    report = {'n_train': n_train, 'n_test': n_test, 'kappa_side': KAPPA_SIDE, 'image_size': IMAGE_SIZE}
    for attribute, names in values.items():
        y_train = np.array([names.index(a[attribute]) for a in train_items])
        y_test = np.array([names.index(a[attribute]) for a in test_items])
        for view, (x_train, x_test) in views.items():
            judge = train_judge(x_train, y_train, len(names), seed=seed)
            report[f'{attribute}_{view}'] = round(accuracy(judge, x_test, y_test), 4)
        report[f'{attribute}_chance'] = round(max(np.bincount(y_test)) / len(y_test), 4)  # the commonest answer
    report['G0_class_at_kappa'] = report['shape_kappa'] >= 0.90
    report['G0_fine_attribute'] = [a for a in values if a != 'shape' and report[f'{a}_kappa'] <=
                                   report[f'{a}_chance'] + 0.15 and report[f'{a}_full'] >= 0.95]
    report['G0_met'] = report['G0_class_at_kappa'] and bool(report['G0_fine_attribute'])
    return report


def main(argv=None):
    p = argparse.ArgumentParser(description='The shapes world, version 3 (in progress).')
    p.add_argument('command', choices=('gate0', 'grid'))
    p.add_argument('--out', default=None, help='gate0: a JSON report; grid: a PNG of renders')
    p.add_argument('--n_train', type=int, default=4000)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    if args.command == 'grid':
        items = make_split('train', 40, args.seed)
        grid = np.concatenate([np.concatenate([render(a) for a in items[r * 10:(r + 1) * 10]], 1) for r in range(4)])
        Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(args.out or 'world3.png')
        print('\n'.join(caption(a) for a in items[:10]))
        return
    report = gate0(args.n_train, seed=args.seed)
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(report, f, indent=1)


if __name__ == '__main__':
    sys.exit(main())
