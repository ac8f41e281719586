import json
import os
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import shapes  # noqa: E402
from shapes import (ATTRIBUTES, CLASS_NAMES, COLOURS, NUM_CLASSES, POSITIONS, SIZES, ShapesDataset,  # noqa: E402
                    attribute_accuracy, caption, export_image_folder, make_split, parse_caption,
                    read_attributes, render, sentence, to_tensor)

READ_KEYS = ("colour", "size", "position", "background")


def read_back_accuracy(items, image_size):
    hits = Counter()
    for attrs in items:
        seen = read_attributes(render(attrs, image_size))
        hits.update(k for k in READ_KEYS if seen.get(k) == attrs[k])
    return {k: hits[k] / len(items) for k in READ_KEYS}


def test_class_names_sorted_and_distinct():
    assert len(CLASS_NAMES) == NUM_CLASSES == 10
    assert CLASS_NAMES == sorted(CLASS_NAMES)
    assert len(set(CLASS_NAMES)) == NUM_CLASSES


@pytest.mark.parametrize("size", [32, 64, 128])
def test_render_shape_and_range(size):
    for attrs in make_split("train", 20, seed=0):
        img = render(attrs, size)
        assert img.shape == (size, size, 3) and img.dtype == np.uint8
        x = to_tensor(img)
        assert x.shape == (3, size, size) and x.dtype == torch.float32
        assert x.min() >= -1 and x.max() <= 1
        # exactly two flat colours in the interior of the shape and on the border
        assert tuple(img[0, 0]) == shapes.BACKGROUNDS[attrs["background"]]
        assert (np.abs(img.astype(int) - COLOURS[attrs["colour"]]).sum(-1) == 0).any()


def test_render_deterministic_and_seed_dependent():
    a = make_split("train", 30, seed=1)
    b = make_split("train", 30, seed=1)
    c = make_split("train", 30, seed=2)
    assert a == b
    assert all(np.array_equal(render(x), render(y)) for x, y in zip(a, b))
    assert sum(np.array_equal(render(x), render(y)) for x, y in zip(a, c)) == 0
    # item i depends only on (split, seed, i)
    assert make_split("train", 10, seed=1) == a[:10]


def test_jitter_makes_images_differ_within_a_bin():
    base = dict(shape="star", colour="red", size="medium", position="center", background="black")
    imgs = [render({**base, "jitter": j}) for j in [(0, 0, 1, 0), (0.02, -0.01, 1.05, 7.0)]]
    assert not np.array_equal(*imgs)
    assert read_attributes(imgs[0]) == read_attributes(imgs[1])


def test_splits_disjoint_and_balanced():
    train, test = make_split("train", 2000, seed=0), make_split("test", 500, seed=0)
    key = lambda a: tuple(sorted(a.items()))  # noqa: E731
    assert not {key(a) for a in train} & {key(a) for a in test}
    assert len({key(a) for a in train}) == len(train)
    for split in (train, test):
        counts = Counter(a["label"] for a in split)
        assert set(counts.values()) == {len(split) // NUM_CLASSES}
        assert all(a["shape"] == CLASS_NAMES[a["label"]] for a in split)
        assert all(a["colour"] != a["background"] for a in split)
        contrast = [np.linalg.norm(np.subtract(COLOURS[a["colour"]], shapes.BACKGROUNDS[a["background"]]))
                    for a in split]
        assert min(contrast) >= 100
    # every attribute value actually occurs
    assert {a["colour"] for a in train} == set(COLOURS)
    assert {a["size"] for a in train} == set(SIZES)
    assert {a["position"] for a in train} == set(POSITIONS)
    with pytest.raises(ValueError):
        make_split("val", 10)


def test_texts_and_parse_round_trip():
    assert sentence(3) == f"a photo of a {CLASS_NAMES[3]}"
    for attrs in make_split("test", 300, seed=0):
        text = caption(attrs)
        for k in ATTRIBUTES:
            assert attrs[k] in text, (k, text)
        parsed = parse_caption(text)
        assert parsed == {k: attrs[k] for k in ATTRIBUTES}, text
    for label in range(NUM_CLASSES):
        assert parse_caption(sentence(label)) == {"shape": CLASS_NAMES[label]}


def test_parse_free_text():
    assert parse_caption("a large green circle in the center on a white background") == dict(
        shape="circle", colour="green", size="large", position="center", background="white")
    assert parse_caption("A tiny violet star, upper-right, on a grey background.") == dict(
        shape="star", colour="purple", size="small", position="top right", background="gray")
    # shape colour blue is not confused with the dark blue background
    assert parse_caption("a blue square on a dark blue background") == dict(
        shape="square", colour="blue", background="dark blue")
    assert parse_caption("something at the bottom") == {"position": "bottom"}
    assert parse_caption("a dog") == {}


def test_read_attributes_64px():
    acc = read_back_accuracy(make_split("test", 500, seed=0), 64)
    # position 96%: a large shape in a corner cell is pushed inwards by the margin, at times past the midpoint
    assert min(acc[k] for k in ("colour", "size", "background")) >= 0.98 and acc["position"] >= 0.94, acc


def test_read_attributes_32px():
    acc = read_back_accuracy(make_split("test", 300, seed=0), 32)
    assert min(acc.values()) >= 0.90, acc


def test_read_attributes_blurry_noisy():
    # a stand-in for generated images: blurred and noisy
    rng = np.random.default_rng(0)
    items = make_split("test", 200, seed=1)
    hits = Counter()
    for attrs in items:
        img = Image.fromarray(render(attrs, 64)).filter(ImageFilter.GaussianBlur(1.5))
        noisy = np.asarray(img, np.float32) + rng.normal(0, 10, (64, 64, 3))
        seen = read_attributes(np.clip(noisy, 0, 255).astype(np.uint8))
        hits.update(k for k in READ_KEYS if seen.get(k) == attrs[k])
    acc = {k: hits[k] / len(items) for k in READ_KEYS}
    assert min(acc.values()) >= 0.9, acc


def test_read_attributes_input_types():
    attrs = make_split("test", 1, seed=3)[0]
    img = render(attrs)
    expected = read_attributes(img)
    assert expected == {k: attrs[k] for k in READ_KEYS}
    assert read_attributes(Image.fromarray(img)) == expected
    assert read_attributes(to_tensor(img)) == expected
    assert read_attributes(to_tensor(img)[None]) == expected
    empty = np.full((64, 64, 3), 15, np.uint8)
    assert read_attributes(empty) == {"background": "black"}


def test_attribute_accuracy():
    attrs = make_split("test", 1, seed=0)[0]
    img = render(attrs)
    assert attribute_accuracy(img, attrs) == 1.0
    assert attribute_accuracy(to_tensor(img), parse_caption(caption(attrs))) == 1.0
    other = next(c for c in COLOURS if c not in (attrs["colour"], attrs["background"]))
    assert attribute_accuracy(img, {**attrs, "colour": other}) == pytest.approx(3 / 4)
    assert attribute_accuracy(img, {**attrs, "colour": other}, keys=("colour",)) == 0.0
    # shape counts only with a classifier
    wrong = (attrs["label"] + 1) % NUM_CLASSES
    assert attribute_accuracy(img, attrs, shape_classifier=lambda im: attrs["label"]) == 1.0
    assert attribute_accuracy(img, attrs, shape_classifier=lambda im: CLASS_NAMES[wrong]) == pytest.approx(4 / 5)
    with pytest.raises(ValueError):
        attribute_accuracy(img, {"shape": attrs["shape"]})


def test_dataset():
    ds = ShapesDataset("train", 20, image_size=32, seed=0)
    assert len(ds) == 20
    image, label, sent, cap = ds[7]
    attrs = make_split("train", 20, seed=0)[7]
    assert image.shape == (3, 32, 32) and image.min() >= -1 and image.max() <= 1
    assert label == attrs["label"] == 7 and sent == sentence(7) and cap == caption(attrs)
    assert torch.equal(image, ds[7][0])
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 3, 32, 32) and batch[1].tolist() == [0, 1, 2, 3]


def test_render_speed():
    import time
    items = make_split("train", 500, seed=0)
    t0 = time.time()
    for attrs in items:
        render(attrs, 64)
    assert (time.time() - t0) / len(items) < 2e-3  # 10k images well under a minute, even on a busy machine


def test_export_image_folder(tmp_path):
    records = export_image_folder(tmp_path, "train", n_per_class=2, seed=0, image_size=32)
    export_image_folder(tmp_path, "test", n_per_class=1, seed=0, image_size=32)
    export_image_folder(tmp_path, "train", n_per_class=2, seed=0, image_size=32)  # re-export replaces, no duplicates
    assert len(records) == 2 * NUM_CLASSES
    assert sorted(os.listdir(tmp_path / "train")) == CLASS_NAMES
    assert (tmp_path / "class_names.txt").read_text().split("\n")[:-1] == CLASS_NAMES
    for label, name in enumerate(sorted(os.listdir(tmp_path / "train"))):
        files = sorted(os.listdir(tmp_path / "train" / name))
        assert len(files) == 2 and all(f.endswith(".png") for f in files)
        assert CLASS_NAMES[label] == name
    lines = (tmp_path / "captions.jsonl").read_text().splitlines()
    entries = [json.loads(line) for line in lines]
    assert len(entries) == 3 * NUM_CLASSES
    assert len({e["path"] for e in entries}) == len(entries)
    for e in entries:
        assert set(e) == {"path", "caption"}
        split, name, _ = e["path"].split("/")
        img = np.asarray(Image.open(tmp_path / e["path"]))
        assert img.shape == (32, 32, 3)
        attrs = parse_caption(e["caption"])
        assert attrs["shape"] == name
        assert attribute_accuracy(img, attrs, keys=("colour", "size", "background")) == 1.0


def test_upside_down_domain_is_new_and_seeded():
    """The cross-domain target: the same labels, palette and texts, every shape turned 180 degrees, its own seeded
    stream of images; the flat world's items stay what they were."""
    from shapes import render
    flat, turned = make_split("train", 200, seed=0), make_split("train", 200, seed=0, style="upside_down")
    assert turned == make_split("train", 200, seed=0, style="upside_down")
    assert all("style" not in a for a in flat) and all(a["style"] == "upside_down" for a in turned)
    assert [a["label"] for a in turned] == [a["label"] for a in flat]
    assert [a["colour"] for a in turned] != [a["colour"] for a in flat]  # fresh images, not the flat ones turned
    triangle = dict(flat[CLASS_NAMES.index("triangle")], jitter=(0.0, 0.0, 1.0, 0.0), position="center")
    upright, down = (render(t, 48).astype(float) for t in (triangle, dict(triangle, style="upside_down")))
    # turned about its centroid: the image rotated 180 degrees, to the rasteriser's half-pixel offsets
    assert np.abs(down - upright[::-1, ::-1]).mean() < 0.2 * np.abs(down - upright).mean()
    circle = dict(flat[CLASS_NAMES.index("circle")], jitter=(0.0, 0.0, 1.0, 0.0), position="center")
    assert np.abs(render(dict(circle, style="upside_down"), 48).astype(int) - render(circle, 48)).max() <= 64
    with pytest.raises(ValueError):
        make_split("train", 1, style="glossy")


def test_export_command_writes_a_folder_train_py_reads(tmp_path):
    from data import FolderDataset
    shapes.main(["export", str(tmp_path / "d"), "--style", "upside_down", "--train_per_class", "2",
                 "--test_per_class", "1", "--image_size", "32"])
    train = FolderDataset(str(tmp_path / "d"), "train", 32, captions=str(tmp_path / "d" / "captions.jsonl"))
    test = FolderDataset(str(tmp_path / "d"), "test", 32, train=False)
    assert len(train) == 20 and len(test) == 10 and train.missing_captions == 0
    assert train.class_names == list(CLASS_NAMES)  # the backbone's class ids, by folder order
    image, label, sentence_, caption_ = train[3]
    assert image.shape == (3, 32, 32) and sentence_ == f"a photo of a {CLASS_NAMES[label]}"
    assert caption_.endswith(" background") and CLASS_NAMES[label] in caption_


def test_export_command_refuses_bad_targets_before_writing(tmp_path, capsys):
    """A zero split, an existing folder, a folder that cannot be made: one line each, and no folder left behind."""
    with pytest.raises(SystemExit):
        shapes.main(["export", str(tmp_path / "d"), "--test_per_class", "0", "--train_per_class", "1"])
    assert "--test_per_class must be at least 1" in capsys.readouterr().err and not (tmp_path / "d").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(SystemExit):
        shapes.main(["export", str(tmp_path / "full"), "--train_per_class", "1", "--test_per_class", "1"])
    assert "exists" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as error:
        shapes.main(["export", str(tmp_path / "a_file" / "d"), "--train_per_class", "1", "--test_per_class", "1"])
    assert str(error.value).startswith("error: cannot write") and "\n" not in str(error.value)
    assert sorted(os.listdir(tmp_path)) == ["a_file", "full"]  # no .part folder either
