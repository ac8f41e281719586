"""
A tiny offline world of shapes, standing in for ImageNet (no downloads needed).

Every image shows ONE filled shape on a flat background and is fully described by
    shape       10 kinds, the class label: CLASS_NAMES[label]
    colour      8 palette colours
    size        small / medium / large = 4%, 8%, 16% of the image's area
    position    a cell of a 3x3 grid: "top left", "top", ..., "center", ..., "bottom right"
    background  4 flat colours, never the same colour as the shape
plus a small seeded jitter of position, size and rotation inside each bin (stored in
attrs["jitter"]), so no two images are identical.

Like MVP, each image comes with three levels of text:
    class label  3
    sentence     "a photo of a diamond"
    caption      "a small red diamond in the top left corner on a black background"
Only the caption carries colour, size, position and background.

Splits: "train" and "test" sample the same attribute distribution (nothing is held
out combinatorially); they are independent seeded random streams, so "held-out" means
fresh images with fresh jitter that were never seen in training. Item i of a split
depends only on (split, seed, i), and labels cycle through the classes (balanced).

read_attributes() reads colour/size/position/background back from any image, rendered
or generated, with simple pixel statistics, so a generated image can be scored
against the caption it was conditioned on. The shape kind needs a learned classifier.

A second domain, style "upside_down", is the backbone's never-seen target for cross-domain transfer (MVP's Table 8:
ImageNet -> SUN397, Food101, RESISC45): the same world with every shape turned 180 degrees (triangles point down,
stars and pentagons stand on a point, crescents open the other way; circles, rings, squares, crosses, diamonds and
hexagons look as before). Its images are made of what the VQVAE knows (a flat background, one shape of the
palette), so the tokenizer reconstructs them as well as its own world's, and only the VAR meets something new, as
the paper's target domains are for its general-purpose tokenizer. (New colours or textured backgrounds, tried
first, come back from this 12-colour world's VQVAE at 11-13 dB: the tokenizer, not the VAR, would be what fails.)
Export it as an image folder that train.py reads like any other:
    python shapes.py export data/shapes_upside_down --style upside_down
"""

import json
import math
import multiprocessing
import os
import re
import shutil
from collections import Counter
from functools import partial

import numpy as np
import torch
from PIL import Image, ImageDraw

# alphabetical, so label = index in sorted folder order (as in ImageNet training)
CLASS_NAMES = ["circle", "crescent", "cross", "diamond", "hexagon",
               "pentagon", "ring", "square", "star", "triangle"]
NUM_CLASSES = len(CLASS_NAMES)
COLOURS = {  # shape colours, RGB
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 170, 60),
    "cyan": (30, 200, 220),
    "blue": (40, 70, 220),
    "purple": (140, 50, 190),
    "white": (240, 240, 240),
}
BACKGROUNDS = {  # background colours, RGB; >= 100 away from every shape colour of another name
    "black": (15, 15, 15),
    "gray": (120, 120, 120),
    "white": (240, 240, 240),
    "dark blue": (20, 30, 80),
}
# shape area / image area. ImageNet's objects fill much of the frame; shapes of 1.5-8% (version 1) covered one or
# two latent tokens, too few for any tokenizer to keep a pentagon apart from a hexagon
SIZES = {"small": 0.04, "medium": 0.08, "large": 0.16}
POSITIONS = ["top left", "top", "top right",  # row-major over the 3x3 grid
             "left", "center", "right",
             "bottom left", "bottom", "bottom right"]
POSITION_PHRASES = {
    "top left": "in the top left corner", "top": "at the top", "top right": "in the top right corner",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "in the bottom left corner", "bottom": "at the bottom",
    "bottom right": "in the bottom right corner",
}
STYLES = ("flat", "upside_down")  # the backbone's world, and the cross-domain target (every shape turned 180 degrees)
ATTRIBUTES = ("shape", "colour", "size", "position", "background")
IMAGE_SIZE = 48  # the backbone's images: 12x12 latents at 4x downsampling (pretrain.py)
SPLITS = ("train", "test")

CELL_CENTRES = (0.25, 0.5, 0.75)  # where a shape's centroid is placed, fraction of the image side
MAX_SHIFT = 0.04      # position jitter, fraction of the image side
MAX_SCALE = 0.08      # size jitter, relative to the side length of the shape
MAX_ANGLE = 12.0      # rotation jitter, degrees
MARGIN = 0.02         # shapes are pushed inside the image by at least this fraction
SUPERSAMPLE = 4       # anti-aliasing: draw at 4x, box-filter down
MIN_CONTRAST = 40.0   # an image whose pixels are all this close to the background is empty


# -----------------------------------------------------------------------------
# geometry: each shape is a list of (polygon (k, 2), fill) drawn in order, fill 1 adds
# and fill 0 cuts a hole; y points down. Normalised to unit area, centroid at the origin.


def _regular(k, radius=1.0, phase=-math.pi / 2):
    t = phase + 2 * math.pi * np.arange(k) / k
    return radius * np.stack([np.cos(t), np.sin(t)], 1)  # (k, 2)


def _star(points=5, inner=0.45):
    radii = np.tile([1.0, inner], points)  # (2*points,)
    return radii[:, None] * _regular(2 * points)


def _cross(w=0.3):
    return np.array([(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
                     (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)], dtype=float)


def _crescent(r=0.85, d=0.5, n=48):
    # unit circle minus a circle of radius r centred at (d, 0): outer arc round the
    # left, then the inner arc back between the two intersection points
    x = (1 - r * r + d * d) / (2 * d)
    y = math.sqrt(1 - x * x)
    phi0, psi0 = math.atan2(y, x), math.atan2(y, x - d)
    phi = np.linspace(phi0, 2 * math.pi - phi0, n)
    psi = np.linspace(-psi0, psi0 - 2 * math.pi, n)
    outer = np.stack([np.cos(phi), np.sin(phi)], 1)
    inner = np.stack([d + r * np.cos(psi), r * np.sin(psi)], 1)
    return np.concatenate([outer, inner])  # (2n, 2)


def _moments(poly):
    # area and centroid of a simple polygon (shoelace formula)
    x, y = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    a = cross.sum() / 2
    c = np.array([((x + x1) * cross).sum(), ((y + y1) * cross).sum()]) / (6 * a)
    return abs(a), c


def _normalise(ops):
    # holes lie fully inside their outline, so their moments simply subtract
    moments = [(_moments(p), 1 if fill else -1) for p, fill in ops]
    area = sum(sign * a for (a, _), sign in moments)
    centroid = sum(sign * a * c for (a, c), sign in moments) / area
    return [((p - centroid) / math.sqrt(area), fill) for p, fill in ops]

_SHAPES = {name: _normalise(ops) for name, ops in {
    "circle": [(_regular(64), 1)],
    "cross": [(_cross(), 1)],
    "crescent": [(_crescent(), 1)],
    "diamond": [(np.array([(0, -1.4), (0.85, 0), (0, 1.4), (-0.85, 0)]), 1)],
    "hexagon": [(_regular(6, phase=0.0), 1)],
    "pentagon": [(_regular(5), 1)],
    "ring": [(_regular(64), 1), (_regular(64, radius=0.55), 0)],
    "square": [(np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float), 1)],
    "star": [(_star(), 1)],
    "triangle": [(_regular(3), 1)],
}.items()}


# -----------------------------------------------------------------------------
# rendering

def render(attrs, image_size=IMAGE_SIZE):
    """Draw the image described by attrs -> uint8 array (H, W, 3). Missing jitter = none."""
    S = image_size
    dx, dy, scale, angle = attrs.get("jitter", (0.0, 0.0, 1.0, 0.0))
    angle += 180.0 if attrs.get("style") == "upside_down" else 0.0
    row, col = divmod(POSITIONS.index(attrs["position"]), 3)
    side = math.sqrt(SIZES[attrs["size"]]) * scale * S  # pixels per unit length of the unit-area shape
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    rot = np.array([[c, -s], [s, c]])
    ops = [(poly @ rot.T * side, fill) for poly, fill in _SHAPES[attrs["shape"]]]
    # centroid in pixels; if the jitter pushed the shape over the edge, push it back in
    centre = np.array([CELL_CENTRES[col] + dx, CELL_CENTRES[row] + dy]) * S  # (2,) as (x, y)
    points = np.concatenate([p for p, _ in ops])
    lo, hi = points.min(0) + centre, points.max(0) + centre
    centre += np.maximum(MARGIN * S - lo, 0) - np.maximum(hi - (1 - MARGIN) * S, 0)
    mask = Image.new("L", (S * SUPERSAMPLE, S * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(mask)
    for poly, fill in ops:
        draw.polygon([tuple(p) for p in (poly + centre) * SUPERSAMPLE], fill=255 * fill)
    alpha = np.asarray(mask.resize((S, S), Image.BOX), dtype=np.float32)[..., None] / 255  # (H, W, 1) coverage
    fg = np.array(COLOURS[attrs["colour"]], dtype=np.float32)
    bg = np.array(BACKGROUNDS[attrs["background"]], dtype=np.float32)
    return np.round(bg + alpha * (fg - bg)).astype(np.uint8)


def to_tensor(image):
    """uint8 (H, W, 3) -> float tensor (3, H, W) in [-1, 1], VAR's convention."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 127.5 - 1


# -----------------------------------------------------------------------------
# texts

def sentence(label):
    return f"a photo of a {CLASS_NAMES[label]}"


def caption(attrs):
    return (f"a {attrs['size']} {attrs['colour']} {attrs['shape']} "
            f"{POSITION_PHRASES[attrs['position']]} on a {attrs['background']} background")


_SHAPE_WORDS = {**{n: n for n in CLASS_NAMES}, **{n + "s": n for n in CLASS_NAMES},
                "rhombus": "diamond", "plus": "cross", "moon": "crescent", "donut": "ring"}
_COLOUR_WORDS = {**{n: n for n in COLOURS}, "violet": "purple", "turquoise": "cyan"}
_BACKGROUND_WORDS = {**{n: n for n in BACKGROUNDS}, "grey": "gray", "navy": "dark blue",
                     "navy blue": "dark blue"}
_SIZE_WORDS = {"small": "small", "tiny": "small", "little": "small", "medium": "medium",
               "large": "large", "big": "large", "huge": "large"}


def world_words():
    """Every word the world's texts use (labels, sentences, captions) and the synonyms parse_caption reads: the
    words the tiny CLIP's vocabulary must tokenise exactly as open_clip's full one does (pretrain.py)."""
    texts = [sentence(label) for label in range(NUM_CLASSES)] + list(POSITION_PHRASES.values()) + \
        [f"on a {b} background" for b in BACKGROUNDS] + [" ".join(v) for v in (SIZES, COLOURS)] + \
        [" ".join(v) for v in (_SHAPE_WORDS, _COLOUR_WORDS, _BACKGROUND_WORDS, _SIZE_WORDS)]
    return sorted({w for t in texts for w in t.split()})


def parse_caption(text):
    """Free text -> dict with whichever of ATTRIBUTES it mentions (others absent)."""
    text = " " + " ".join(re.findall(r"[a-z]+", text.lower())) + " "
    attrs = {}
    # the background first, so that its colour is not taken for the shape's colour
    for word in sorted(_BACKGROUND_WORDS, key=len, reverse=True):
        if f" {word} background " in text:
            attrs["background"] = _BACKGROUND_WORDS[word]
            text = text.replace(f" {word} background ", " ")
            break
    words = text.split()
    for key, vocab in (("shape", _SHAPE_WORDS), ("colour", _COLOUR_WORDS), ("size", _SIZE_WORDS)):
        found = [vocab[w] for w in words if w in vocab]
        if found:
            attrs[key] = found[0]
    vertical = [v for w, v in (("top", "top"), ("upper", "top"), ("bottom", "bottom"), ("lower", "bottom"))
                if w in words]
    horizontal = [w for w in ("left", "right") if w in words]
    if vertical or horizontal:
        attrs["position"] = " ".join(vertical[:1] + horizontal[:1])
    elif {"center", "centre", "middle"} & set(words):
        attrs["position"] = "center"
    return attrs


# -----------------------------------------------------------------------------
# splits and datasets

def make_split(split, n, seed=0, style="flat"):
    """n attribute dicts of a split; labels cycle through the classes, item i depends only on (split, seed, style, i)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    items = []
    for i in range(n):
        rng = np.random.default_rng([seed, SPLITS.index(split), i] + ([] if style == "flat" else [STYLES.index(style)]))
        label = i % NUM_CLASSES
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        backgrounds = [b for b in BACKGROUNDS if b != colour]
        jitter = (float(rng.uniform(-MAX_SHIFT, MAX_SHIFT)), float(rng.uniform(-MAX_SHIFT, MAX_SHIFT)),
                  float(rng.uniform(1 - MAX_SCALE, 1 + MAX_SCALE)), float(rng.uniform(-MAX_ANGLE, MAX_ANGLE)))
        item = dict(
            label=label,
            shape=CLASS_NAMES[label],
            colour=colour,
            size=list(SIZES)[rng.integers(len(SIZES))],
            position=POSITIONS[rng.integers(len(POSITIONS))],
            background=backgrounds[rng.integers(len(backgrounds))],
            jitter=jitter,  # (dx, dy, scale, angle in degrees)
        )
        if style != "flat":
            item["style"] = style
        items.append(item)
    return items


class ShapesDataset(torch.utils.data.Dataset):
    """(image (3, H, W) in [-1, 1], label, sentence, caption); images are rendered on the fly."""

    def __init__(self, split, n, image_size=IMAGE_SIZE, seed=0, style="flat"):
        self.items = make_split(split, n, seed, style)
        self.image_size = image_size
        self.class_names = list(CLASS_NAMES)

    def __len__(self):
        return len(self.items)

    def caption_and_label(self, i):  # without rendering the image
        return caption(self.items[i]), self.items[i]["label"]

    def __getitem__(self, i):
        attrs = self.items[i]
        return to_tensor(render(attrs, self.image_size)), attrs["label"], sentence(attrs["label"]), caption(attrs)


def export_image_folder(root, split, n_per_class, seed=0, image_size=IMAGE_SIZE, style="flat"):
    """Write root/<split>/<class>/<idx>.png, root/class_names.txt and root/captions.jsonl.
    captions.jsonl keeps the entries of other splits already exported to root. Returns this split's entries."""
    records = []
    for i, attrs in enumerate(make_split(split, n_per_class * NUM_CLASSES, seed, style)):
        path = f"{split}/{attrs['shape']}/{i:05d}.png"
        os.makedirs(os.path.join(root, split, attrs["shape"]), exist_ok=True)
        Image.fromarray(render(attrs, image_size)).save(os.path.join(root, path))
        records.append({"path": path, "caption": caption(attrs)})
    with open(os.path.join(root, "class_names.txt"), "w") as f:
        f.write("\n".join(CLASS_NAMES) + "\n")
    captions_path = os.path.join(root, "captions.jsonl")
    others = []
    if os.path.exists(captions_path):
        with open(captions_path) as f:
            others = [r for r in map(json.loads, f) if not r["path"].startswith(split + "/")]
    with open(captions_path, "w") as f:
        for r in others + records:
            f.write(json.dumps(r) + "\n")
    return records


# -----------------------------------------------------------------------------
# reading attributes back from pixels

def _as_array(image):
    # uint8 (H, W, 3) array, PIL image, or tensor (3, H, W) in [-1, 1] -> float32 (H, W, 3) in [0, 255]
    if isinstance(image, torch.Tensor):
        x = image.detach().float().cpu()
        x = x.squeeze(0) if x.dim() == 4 else x
        return ((x.clamp(-1, 1) + 1) * 127.5).permute(1, 2, 0).numpy()
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    x = np.asarray(image, dtype=np.float32)
    assert x.ndim == 3 and x.shape[2] == 3, f"expected (H, W, 3), got {x.shape}"
    return x


def _nearest(palette, rgb):
    return min(palette, key=lambda name: np.sum((np.array(palette[name]) - rgb) ** 2))


def read_attributes(image):
    """-> dict(colour, size, position, background) from pixel statistics; only background if no shape is found."""
    img = _as_array(image)  # (H, W, 3)
    H, W, _ = img.shape
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])  # (2H+2W, 3)
    bg = np.median(border, 0)
    out = {"background": _nearest(BACKGROUNDS, bg)}
    diff = img - bg  # (H, W, 3)
    dist = np.linalg.norm(diff, axis=-1)  # (H, W)
    if dist.max() < MIN_CONTRAST:
        return out
    fg = np.median(diff[dist >= 0.7 * dist.max()], 0)  # (3,) clearly-foreground colour minus background
    # blur and anti-aliasing mix the shape colour c with the background: fg ~ t * (c - bg), 0.5 <= t <= 1
    axes = {name: np.array(rgb) - bg for name, rgb in COLOURS.items()
            if np.linalg.norm(np.array(rgb) - bg) >= MIN_CONTRAST}  # the background's own colour can't be the shape's
    t = {name: np.clip(fg @ a / (a @ a), 0.5, 1) for name, a in axes.items()}
    out["colour"] = min(axes, key=lambda name: np.sum((fg - t[name] * axes[name]) ** 2))
    axis = axes[out["colour"]]
    alpha = diff @ axis / (axis @ axis)  # (H, W) 0 = background, 1 = shape colour
    if alpha.max() <= 0:  # nothing points towards any palette colour
        return out
    # (H, W) the shape: at least half way to its colour (or near the peak of a faint shape),
    # which ignores noise, halos and blur tails
    mask = (alpha >= min(0.5, 0.75 * alpha.max())).astype(np.float32)
    area = mask.mean()
    small_medium, medium_large = (math.sqrt(SIZES["small"] * SIZES["medium"]),
                                  math.sqrt(SIZES["medium"] * SIZES["large"]))
    out["size"] = "small" if area < small_medium else "medium" if area < medium_large else "large"
    ys = (np.arange(H) + 0.5) / H
    xs = (np.arange(W) + 0.5) / W
    cy = (mask.sum(1) * ys).sum() / mask.sum()
    cx = (mask.sum(0) * xs).sum() / mask.sum()
    # the nearest cell centre, not the nearest third: a large shape in a corner cell is pushed inwards by the margin
    # (its centroid can pass 1/3 of the side), never past half way to the next cell's centre
    centres = np.array(CELL_CENTRES)
    row, col = int(np.abs(centres - cy).argmin()), int(np.abs(centres - cx).argmin())
    out["position"] = POSITIONS[3 * row + col]
    return out


def attribute_matches(image, attrs, keys=ATTRIBUTES, shape_classifier=None):
    """{attribute: whether the image shows it} for the attributes in attrs (restricted to keys), reading the image
    once. "shape" counts only if shape_classifier(image) -> class index or name is given."""
    keys = [k for k in keys if k in attrs and (k != "shape" or shape_classifier is not None)]
    if not keys:
        raise ValueError("no attribute to score")
    seen = read_attributes(image)
    if "shape" in keys:
        pred = shape_classifier(image)
        seen["shape"] = pred if isinstance(pred, str) else CLASS_NAMES[int(pred)]
    return {k: seen.get(k) == attrs[k] for k in keys}


def attribute_accuracy(image, attrs, keys=ATTRIBUTES, shape_classifier=None):
    """Fraction of the attributes in attrs (restricted to keys) that the image shows."""
    matches = attribute_matches(image, attrs, keys, shape_classifier)
    return sum(matches.values()) / len(matches)


def rendered(split, n, seed=0, image_size=IMAGE_SIZE):
    """(images uint8 (N, H, W, 3), the attribute dicts) of a split, rendered once (on every core)."""
    items = make_split(split, n, seed)
    if n < 2000:
        return np.stack([render(a, image_size) for a in items]), items
    with multiprocessing.get_context("spawn").Pool() as pool:
        return np.stack(pool.map(partial(render, image_size=image_size), items, chunksize=500)), items


def to_input(images_uint8, device=None) -> torch.Tensor:  # (B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1]
    """An array goes to `device` (the CPU if None); a tensor stays where it is."""
    x = images_uint8 if isinstance(images_uint8, torch.Tensor) else torch.as_tensor(images_uint8, device=device)
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1


READ_ATTRIBUTES = tuple(a for a in ATTRIBUTES if a != 'shape')  # what read_attributes reads; shape = class


def attribute_distributions(images: np.ndarray) -> dict:
    """{attribute: {value: fraction of images}} as read_attributes reads (N, H, W, 3) uint8 images ('none'
    where it finds no shape)."""
    reads = [read_attributes(image) for image in images]
    return {key: {value: round(count / len(images), 3) for value, count in
                  sorted(Counter(r.get(key, 'none') for r in reads).items())} for key in READ_ATTRIBUTES}


def attribute_tv(p: dict, q: dict) -> dict:
    """{attribute: total variation distance between two attribute_distributions}: 0 the same, 1 disjoint; two samples
    of one distribution still differ by a little (the reconstructions' figure in the VAR report)."""
    return {key: round(0.5 * sum(abs(p[key].get(v, 0.0) - q[key].get(v, 0.0)) for v in p[key].keys() | q[key].keys()), 3)
            for key in READ_ATTRIBUTES}


class ShapeClassifier(torch.nn.Module):
    """A small CNN that names the shape kind of a [-1, 1] image (any size; resized to 64); trained by pretrain.py."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        layers, channels = [], 3
        for width in (32, 64, 128):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(),
                       nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(8, width), nn.SiLU(), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, NUM_CLASSES)

    def pooled(self, img_B3HW):  # (B, 3, H, W) in [-1, 1] -> the features the head reads (B, 128)
        if img_B3HW.shape[-1] != 64:
            img_B3HW = torch.nn.functional.interpolate(img_B3HW, size=(64, 64), mode="bilinear", align_corners=False)
        return self.features(img_B3HW).mean(dim=(2, 3))

    def forward(self, img_B3HW):  # (B, 3, H, W) in [-1, 1] -> logits (B, NUM_CLASSES)
        return self.head(self.pooled(img_B3HW))

    @torch.no_grad()
    def predict(self, image):
        """One image (uint8 HxWx3, PIL, or a [-1, 1] tensor) -> class index, as attribute_accuracy's shape_classifier."""
        x = torch.as_tensor(to_tensor(_as_array(image))).unsqueeze(0).to(next(self.parameters()).device)
        return int(self(x).argmax(dim=1))


def load_shape_classifier(folder):
    """The ShapeClassifier that pretrain.py saved in a backbone folder, in eval mode."""
    classifier = ShapeClassifier()
    path = os.path.join(folder, "shape_classifier.pth")
    classifier.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return classifier.eval()


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="The shapes world as an ImageNet-style image folder (train.py --data).")
    sub = p.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write OUT/train, OUT/test, OUT/class_names.txt and OUT/captions.jsonl")
    export.add_argument("out")
    export.add_argument("--style", choices=STYLES, default="flat")
    export.add_argument("--train_per_class", type=int, default=500)
    export.add_argument("--test_per_class", type=int, default=100)
    export.add_argument("--image_size", type=int, default=IMAGE_SIZE)
    export.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    splits = (("train", args.train_per_class), ("test", args.test_per_class))
    for split, n in splits:
        if n < 1:
            p.error(f"--{split}_per_class must be at least 1, got {n}")
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        p.error(f"{args.out} exists: export writes a new folder")
    partial = os.path.normpath(args.out) + ".part"  # renamed to OUT when whole: a stopped export leaves no OUT
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for split, n in splits:
            export_image_folder(partial, split, n, args.seed, args.image_size, args.style)
        os.replace(partial, args.out)
    except OSError as e:
        raise SystemExit(f"error: cannot write {args.out}: {e.strerror} ({e.filename})") from None
    print(f"wrote {args.out}: {args.train_per_class * NUM_CLASSES} train and {args.test_per_class * NUM_CLASSES} test "
          f"images ({args.style}), class_names.txt, captions.jsonl (train.py --data {args.out} --captions "
          f"{os.path.join(args.out, 'captions.jsonl')})")


if __name__ == "__main__":
    main()
