"""
The shapes world: a miniature of ImageNet-for-VAR, rendered offline, where MVP's premise holds by construction, so
that the miniature can test the method rather than the world.

ImageNet's order, which MVP's two semantic levels assume: the class is the coarse gist (a large, centred object
with typical colours, recognisable at scale kappa), and a caption adds detail the class leaves free, some of which
only the fine scales resolve. Here, at 32 px (8x8 latents, scales 1, 2, 3, 4, 6, 8, K = 6, kappa = floor(0.6 K) = 3,
whose 3x3 map covers 12 px views, 3/8 of the last side as VAR-d16's 6/16):
    class       one of 10 large silhouettes (a quarter to two fifths of the image), centred with a small jitter
    colour      the class's typical colour 60% of the time, else another of the palette (a red apple, a green one)
    texture     plain, striped or pinstriped: two shades whose mean is the colour, in 1-pixel lines across or down,
                so a view at kappa's resolution averages every texture to the same flat colour (the fine attribute)
    background  4 flat colours, never the shape's
    caption     "a {texture} {colour} {class} on a {background} background", in one of three phrasings

world/pretrain.py builds the world's backbone and measures its gates; the judge here is the miniature's Inception.
A second domain, every shape turned upside down, is the cross-domain target of Table 8's twin:

    python -m world.shapes export OUT --style upside_down     # an ImageNet-style folder: train.py --data OUT
"""
import argparse
import json
import math
import multiprocessing
import os
import re
import shutil

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw


# -----------------------------------------------------------------------------
# geometry: each shape is a list of (polygon (k, 2), fill) drawn in order, fill 1 adds and fill 0 cuts a hole; y points
# down. Normalised to unit area, centroid at the origin.


def _regular(k, radius=1.0, phase=-math.pi / 2):
    t = phase + 2 * math.pi * np.arange(k) / k
    return radius * np.stack([np.cos(t), np.sin(t)], 1)  # (k, 2)


def _star(points=5, inner=0.45):
    radii = np.tile([1.0, inner], points)  # (2 * points,)
    return radii[:, None] * _regular(2 * points)


def _cross(w=0.3):
    return np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
                     (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)], dtype=float)


def _crescent(r=0.85, d=0.5, n=48):
    # the unit circle less a circle of radius r centred at (d, 0): the outer arc round the left, then the inner arc
    # back between the two intersection points
    x = (1 - r * r + d * d) / (2 * d)
    y = math.sqrt(1 - x * x)
    phi0, psi0 = math.atan2(y, x), math.atan2(y, x - d)
    phi = np.linspace(phi0, 2 * math.pi - phi0, n)
    psi = np.linspace(-psi0, psi0 - 2 * math.pi, n)
    outer = np.stack([np.cos(phi), np.sin(phi)], 1)
    inner = np.stack([d + r * np.cos(psi), r * np.sin(psi)], 1)
    return np.concatenate([outer, inner])  # (2n, 2)


def _moments(poly):
    # area and centroid of a simple polygon (the shoelace formula)
    x, y = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    a = cross.sum() / 2
    c = np.array([((x + x1) * cross).sum(), ((y + y1) * cross).sum()]) / (6 * a)
    return abs(a), c


def _normalise(ops):
    # holes lie wholly inside their outline, so their moments simply subtract
    moments = [(_moments(p), 1 if fill else -1) for p, fill in ops]
    area = sum(sign * a for (a, _), sign in moments)
    centroid = sum(sign * a * c for (a, c), sign in moments) / area
    return [((p - centroid) / math.sqrt(area), fill) for p, fill in ops]


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
TEXTURES = ("plain", "striped", "pinstriped")
# + - + - - +: a period-2 pattern that slips every 6 pixels. 6 is no multiple of the VQVAE's 4-pixel token, so
# neighbouring tokens hold different parts of it: a field of equal tokens would decode flat (docs/shapes_world.md)
TEXTURE_ROW = np.array([1.0, -1.0, 1.0, -1.0, -1.0, 1.0])
SHADE = 48.0  # a texture's two shades: the colour +- SHADE per channel (less near 0 or 255), so their mean is the colour
AREA = (0.26, 0.40)  # the silhouette's share of the image
MAX_SHIFT = 0.06  # centre jitter, fraction of the side
MAX_ANGLE = 10.0
SUPERSAMPLE = 4
PHRASINGS = ("a {texture} {colour} {shape} on a {background} background",
             "a photo of a {texture} {colour} {shape} against a {background} background",
             "a {colour} {shape} with a {texture} surface on a {background} background")
ATTRIBUTES = ("shape", "colour", "texture", "background")
VALUES = {"shape": CLASS_NAMES, "colour": list(COLOURS), "texture": list(TEXTURES), "background": list(BACKGROUNDS)}
FINE_ATTRIBUTES = ("texture",)  # what only the fine scales resolve
SPLITS = ("train", "test")
STYLES = ("upright", "upside_down")  # the backbone's world, and Table 8's cross-domain target (every shape turned 180)


def make_split(split: str, n: int, seed: int = 0, style: str = 'upright'):
    """n attribute dicts; labels cycle through the classes; item i depends only on (split, seed, style, i)."""
    if split not in SPLITS:
        raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
    if style not in STYLES:
        raise ValueError(f'style must be one of {STYLES}, got {style!r}')
    items = []
    for i in range(n):
        stream = [seed, SPLITS.index(split), i, 3] + ([STYLES.index(style)] if style != 'upright' else [])
        rng = np.random.default_rng(stream)
        shape = CLASS_NAMES[i % NUM_CLASSES]
        colour = TYPICAL_COLOUR[shape] if rng.random() < TYPICAL_SHARE else \
            str(rng.choice([c for c in COLOURS if c != TYPICAL_COLOUR[shape]]))
        item = dict(label=i % NUM_CLASSES, shape=shape, colour=colour, texture=str(rng.choice(TEXTURES)),
                    background=str(rng.choice(list(BACKGROUNDS))), phrasing=int(rng.integers(len(PHRASINGS))),
                    jitter=(float(rng.uniform(-MAX_SHIFT, MAX_SHIFT)), float(rng.uniform(-MAX_SHIFT, MAX_SHIFT)),
                            float(rng.uniform(*AREA)), float(rng.uniform(-MAX_ANGLE, MAX_ANGLE))))
        if style != 'upright':
            item['style'] = style
        items.append(item)
    return items


def caption(item) -> str:
    return re.sub(r'\ba (?=[aeiou])', 'an ', PHRASINGS[item['phrasing']].format(**item))


def sentence(label: int) -> str:
    return f'a photo of a {CLASS_NAMES[label]}'


def attributes_named(text: str) -> dict:
    """{attribute: value} for each attribute a caption names (the first value it names), read word by word: what a
    sample of that caption is scored against."""
    named = {}
    for word in re.findall(r'[a-z]+', text.lower()):
        for attribute, values in VALUES.items():
            if word in values:
                named.setdefault(attribute, word)
    return named


def world_words() -> list:
    """Every word the world's texts use: what the tiny CLIP's vocabulary must tokenise as open_clip's full one does."""
    texts = [p for p in PHRASINGS] + [' '.join(v) for v in VALUES.values()] + ['a an photo of']
    return sorted({w for t in texts for w in re.sub(r'{\w+}', ' ', t).split()})


def texture_shades(item, size: int) -> np.ndarray:
    """(H, W, 3) float: the shape's colour with its texture: light and dark 1-pixel lines in turn, across (striped)
    or down (pinstriped), the pattern slipping a pixel every len(TEXTURE_ROW) pixels. Every 2x2 block holds one light
    and one dark pair, so the shades average to the colour in every block."""
    colour = np.array(COLOURS[item['colour']], dtype=np.float32)
    yy, xx = np.mgrid[:size, :size]
    pair = lambda v: TEXTURE_ROW[v % len(TEXTURE_ROW)]
    if item['texture'] == 'plain':
        sign = np.zeros((size, size))
    elif item['texture'] == 'striped':
        sign = pair(yy)
    else:
        sign = pair(xx)
    amplitude = np.minimum(SHADE, np.minimum(colour, 255 - colour))  # symmetric: no clipping moves the mean
    return colour + amplitude * sign[..., None]


def render(item, size: int = IMAGE_SIZE) -> np.ndarray:
    """The image of an item, uint8 (H, W, 3)."""
    dx, dy, area, angle = item['jitter']
    angle += 180.0 if item.get('style') == 'upside_down' else 0.0
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    rot = np.array([[c, -s], [s, c]])
    side = math.sqrt(area) * size
    centre = (np.array([0.5 + dx, 0.5 + dy]) * size)
    mask = Image.new('L', (size * SUPERSAMPLE, size * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(mask)
    for poly, fill in CLASS_SHAPES[item['shape']]:
        draw.polygon([tuple(p) for p in (poly @ rot.T * side + centre) * SUPERSAMPLE], fill=255 * fill)
    alpha = np.asarray(mask.resize((size, size), Image.BOX), dtype=np.float32)[..., None] / 255
    colour = np.array(COLOURS[item['colour']], dtype=np.float32)
    # the texture only in 2x2 blocks the shape covers whole: a block's two shades then average to the colour, and at
    # the edge a texture under partial coverage would leave a trace in any coarser view (a flat rim instead)
    whole = alpha.reshape(size // 2, 2, size // 2, 2).min(axis=(1, 3)) > 0.999
    whole = whole.repeat(2, axis=0).repeat(2, axis=1)[..., None]
    shape = np.where(whole, texture_shades(item, size), colour)
    background = np.array(BACKGROUNDS[item['background']], dtype=np.float32)
    return np.round(background + alpha * (shape - background)).astype(np.uint8)


def low_pass(x_B3HW: torch.Tensor, side: int) -> torch.Tensor:
    """Images area-downsampled to side x side. At half the side or less a 2x2 mean first: 32 -> 12 px alone would
    average 1-pixel lines over windows of 2 and 3 pixels and leave them half visible, which no low-pass view would."""
    if side * 2 <= x_B3HW.shape[-1]:
        x_B3HW = F.avg_pool2d(x_B3HW, 2)
    return F.adaptive_avg_pool2d(x_B3HW, side)


def area_downsample(images_uint8: np.ndarray, side: int = KAPPA_SIDE) -> np.ndarray:
    """What a view at kappa's resolution holds: (N, H, W, 3) uint8 -> (N, side, side, 3) float, low_pass."""
    return low_pass(torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float(), side).permute(0, 2, 3, 1).numpy()


def to_input(images_uint8, device=None) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1]; an array goes to `device` (the CPU if None), a tensor stays put."""
    x = images_uint8 if isinstance(images_uint8, torch.Tensor) else torch.as_tensor(images_uint8, device=device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


def rendered(split: str, n: int, seed: int = 0):
    """(images uint8 (N, H, W, 3), the attribute dicts) of a split, rendered once (on every core)."""
    items = make_split(split, n, seed)
    if n < 2000:
        return np.stack([render(a) for a in items]), items
    with multiprocessing.get_context("spawn").Pool() as pool:
        return np.stack(pool.map(render, items, chunksize=500)), items


class Dataset(torch.utils.data.Dataset):
    """(image (3, H, W) in [-1, 1], label, sentence, caption), rendered on the fly: train.py --data shapes."""

    def __init__(self, split: str, n: int, seed: int = 0):
        self.items = make_split(split, n, seed)
        self.class_names = list(CLASS_NAMES)

    def __len__(self):
        return len(self.items)

    def caption_and_label(self, i):  # without rendering the image
        return caption(self.items[i]), self.items[i]['label']

    def __getitem__(self, i):
        item = self.items[i]
        return to_input(render(item)[None])[0], item['label'], sentence(item['label']), caption(item)


def targets(items) -> torch.Tensor:
    """(N, len(ATTRIBUTES)) long: each item's value index per attribute, the judge's targets."""
    return torch.tensor([[VALUES[a].index(item[a]) for a in ATTRIBUTES] for item in items])


# -----------------------------------------------------------------------------
# the judge: a small CNN (unlike the CLIP's ViT), trained on renders, used by no loss: the miniature's Inception


class Judge(nn.Module):
    """Images in [-1, 1] of any size (resized to 32) -> logits of every attribute, one head each (logits_of splits
    them); .pooled gives the features FD_judge compares. Reading colour, texture and background as well as the class
    makes its feature space see what a caption asks for, as Inception's sees more than ImageNet's labels."""

    def __init__(self, width: int = 32):
        super().__init__()
        layers, channels = [nn.Conv2d(3, width, 3, padding=1)], width
        for out, stride in ((width, 1), (2 * width, 2), (2 * width, 1), (4 * width, 2)):
            layers += [nn.BatchNorm2d(channels), nn.ReLU(), nn.Conv2d(channels, out, 3, stride=stride, padding=1)]
            channels = out
        self.features = nn.Sequential(*layers, nn.BatchNorm2d(channels), nn.ReLU())
        self.head = nn.Linear(channels, sum(len(v) for v in VALUES.values()))

    def pooled(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        if img_B3HW.shape[-1] != IMAGE_SIZE:
            img_B3HW = F.interpolate(img_B3HW, size=(IMAGE_SIZE, IMAGE_SIZE), mode='bilinear', align_corners=False)
        return self.features(img_B3HW).mean(dim=(2, 3))

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(img_B3HW))


def logits_of(logits_BN: torch.Tensor) -> dict:
    """The judge's logits split per attribute: {attribute: (B, number of its values)}."""
    return dict(zip(ATTRIBUTES, logits_BN.split([len(v) for v in VALUES.values()], dim=1)))


def train_judge(images: np.ndarray, items, epochs: int = 15, seed: int = 0, log=None) -> Judge:
    """A Judge trained on (N, H, W, 3) uint8 images (any side) to read every attribute of their items: the sum of
    the heads' cross-entropies, AdamW with a one-cycle schedule, batches of 128."""
    torch.manual_seed(seed)
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=0.01)
    x, y_NA = to_input(images), targets(items)
    steps = epochs * math.ceil(len(x) / 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps)
    for epoch in range(epochs):
        for batch in torch.randperm(len(x)).split(128):
            heads = logits_of(judge.train()(x[batch]))
            loss = sum(F.cross_entropy(heads[a], y_NA[batch, i]) for i, a in enumerate(ATTRIBUTES))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if log:
            log(epoch + 1, epochs, loss.item())
    return judge.eval()


@torch.no_grad()
def read(judge: Judge, x_B3HW: torch.Tensor, chunk: int = 500) -> torch.Tensor:
    """(B, len(ATTRIBUTES)) long: the value index the judge reads per attribute, of images in [-1, 1]."""
    rows = []
    for i in range(0, len(x_B3HW), chunk):
        heads = logits_of(judge(x_B3HW[i:i + chunk]))
        rows.append(torch.stack([heads[a].argmax(1) for a in ATTRIBUTES], dim=1))
    return torch.cat(rows)


def accuracies(judge: Judge, x_B3HW: torch.Tensor, items) -> dict:
    """{attribute: the fraction of images whose attribute the judge reads as their item's}."""
    right = (read(judge, x_B3HW) == targets(items).to(x_B3HW.device)).float().mean(0)
    return {a: round(float(v), 4) for a, v in zip(ATTRIBUTES, right)}


@torch.no_grad()
def judged(judge: Judge, x_B3HW: torch.Tensor, chunk: int = 500):
    """The judge's pooled features (N, D), FD_judge's space, and class logits (N, 10) of images in [-1, 1], as numpy."""
    feats, logits = [], []
    for i in range(0, len(x_B3HW), chunk):
        pooled = judge.pooled(x_B3HW[i:i + chunk])
        feats.append(pooled.cpu())
        logits.append(logits_of(judge.head(pooled))['shape'].cpu())
    return torch.cat(feats).double().numpy(), torch.cat(logits).double().numpy()


def save_judge(judge: Judge, path: str):
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in judge.state_dict().items()}, path)


def load_judge(folder: str) -> Judge:
    """The Judge that world/pretrain.py saved in a backbone folder (judge.pth), in eval mode."""
    judge = Judge()
    state = torch.load(os.path.join(folder, 'judge.pth'), map_location='cpu', weights_only=True)
    judge.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
    return judge.eval()


def gate0(train_images: np.ndarray, train_items, test_images: np.ndarray, test_items, judge: Judge, epochs: int,
          seed: int = 0) -> dict:
    """G0, the renders: a Judge trained and tested on renders area-downsampled to kappa's resolution names the class
    (>= 90% wanted); a caption attribute there at <= chance + 15 points while the full-resolution judge reads it
    >= 95% (the fine attribute the caption level asks the fine scales for)."""
    coarse_judge = train_judge(area_downsample(train_images), train_items, epochs, seed)
    y_NA = targets(test_items)
    right_NA = read(coarse_judge, to_input(area_downsample(test_images))) == y_NA  # the views at kappa, read once
    at_kappa = {a: round(float(v), 4) for a, v in zip(ATTRIBUTES, right_NA.float().mean(0))}
    full = accuracies(judge, to_input(test_images), test_items)
    chance = {a: round(float(torch.bincount(y_NA[:, i]).max()) / len(y_NA), 4) for i, a in enumerate(ATTRIBUTES)}
    classes = right_NA[:, 0]
    per_class = {name: round(float(classes[y_NA[:, 0] == c].float().mean()), 3) for c, name in enumerate(CLASS_NAMES)}
    report = {'kappa_side': KAPPA_SIDE, 'image_size': IMAGE_SIZE, 'at_kappa': at_kappa, 'full': full, 'chance': chance,
              'class_at_kappa_per_class': per_class}
    report['G0_class_at_kappa'] = at_kappa['shape'] >= 0.90
    report['G0_fine_attributes'] = [a for a in ATTRIBUTES[1:] if at_kappa[a] <= chance[a] + 0.15 and full[a] >= 0.95]
    report['G0_met'] = report['G0_class_at_kappa'] and bool(report['G0_fine_attributes'])
    return report


def picture(items) -> Image.Image:
    """Renders in rows of 10, drawn 3x larger: the world at a glance (checkpoints/shapes/renders.png)."""
    rows = [np.concatenate([render(a) for a in items[r:r + 10]], 1) for r in range(0, len(items), 10)]
    grid = np.concatenate(rows)
    return Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST)


# -----------------------------------------------------------------------------
# the world as an ImageNet-style folder: Table 8's cross-domain target, or any run of train.py --data DIR


def export_image_folder(root: str, split: str, n_per_class: int, seed: int = 0, style: str = 'upright') -> list:
    """Write root/<split>/<class>/<i>.png, root/class_names.txt and root/captions.jsonl (keeping the entries of the
    other split already exported there); returns this split's caption records."""
    records = []
    for i, item in enumerate(make_split(split, n_per_class * NUM_CLASSES, seed, style)):
        path = f"{split}/{item['shape']}/{i:05d}.png"
        os.makedirs(os.path.join(root, split, item['shape']), exist_ok=True)
        Image.fromarray(render(item)).save(os.path.join(root, path))
        records.append({'path': path, 'caption': caption(item)})
    with open(os.path.join(root, 'class_names.txt'), 'w') as f:
        f.write('\n'.join(CLASS_NAMES) + '\n')
    captions_path = os.path.join(root, 'captions.jsonl')
    others = []
    if os.path.exists(captions_path):
        with open(captions_path) as f:
            others = [r for r in map(json.loads, f) if not r['path'].startswith(split + '/')]
    with open(captions_path, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in others + records)
    return records


def main(argv=None):
    p = argparse.ArgumentParser(description='The shapes world as an ImageNet-style image folder (train.py --data).')
    sub = p.add_subparsers(dest='command', required=True)
    export = sub.add_parser('export', help='write OUT/train, OUT/test, OUT/class_names.txt and OUT/captions.jsonl')
    export.add_argument('out')
    export.add_argument('--style', choices=STYLES, default='upright')
    export.add_argument('--train_per_class', type=int, default=500)
    export.add_argument('--test_per_class', type=int, default=100)
    export.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    splits = (('train', args.train_per_class), ('test', args.test_per_class))
    for split, n in splits:
        if n < 1:
            raise SystemExit(f'error: --{split}_per_class must be at least 1, got {n}')
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise SystemExit(f'error: {args.out} exists: export writes a new folder')
    partial = os.path.normpath(args.out) + '.part'  # renamed to OUT when whole: a stopped export leaves no OUT
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for split, n in splits:
            export_image_folder(partial, split, n, args.seed, args.style)
        os.replace(partial, args.out)
    except OSError as e:
        raise SystemExit(f'error: cannot write {args.out}: {e.strerror} ({e.filename})') from None
    print(f'wrote {args.out}: {args.train_per_class * NUM_CLASSES} train and {args.test_per_class * NUM_CLASSES} test '
          f'images ({args.style}), class_names.txt, captions.jsonl (train.py --data {args.out} --captions '
          f'{os.path.join(args.out, "captions.jsonl")})')


if __name__ == '__main__':
    main()
