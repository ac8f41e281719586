"""The shapes world (world/shapes.py) at tiny sizes: the renderer, the splits and texts, the upside-down domain, the
judge, the Dataset, and the export to an ImageNet-style folder (function and command)."""
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from world import shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_class_names_sorted_and_distinct():
    assert len(shapes.CLASS_NAMES) == shapes.NUM_CLASSES == 10
    assert shapes.CLASS_NAMES == sorted(shapes.CLASS_SHAPES) and len(set(shapes.CLASS_NAMES)) == 10
    assert shapes.VALUES['shape'] == shapes.CLASS_NAMES and set(shapes.TYPICAL_COLOUR) == set(shapes.CLASS_NAMES)
    assert shapes.sentence(3) == f'a photo of a {shapes.CLASS_NAMES[3]}'


@pytest.mark.parametrize('size', [shapes.IMAGE_SIZE, 64])
def test_render_shape_and_range(size):
    items = shapes.make_split('train', 20, seed=0)
    images = np.stack([shapes.render(a, size) for a in items])
    assert images.shape == (20, size, size, 3) and images.dtype == np.uint8
    for img, a in zip(images, items):
        # a shape on its background: the corners are the background, some pixels the shape's own colour
        for corner in (img[0, 0], img[0, -1], img[-1, 0], img[-1, -1]):
            assert tuple(corner) == shapes.BACKGROUNDS[a['background']]
        assert (np.abs(img.astype(int) - shapes.COLOURS[a['colour']]).sum(-1) == 0).any()
    x = shapes.to_input(images)
    assert x.shape == (20, 3, size, size) and x.dtype == torch.float32
    assert -1 <= x.min() and x.max() <= 1
    np.testing.assert_allclose(x[3].permute(1, 2, 0).numpy(), images[3] / 127.5 - 1, atol=1e-6)
    assert shapes.render(items[0]).shape == (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE, 3)  # the default size


def test_render_deterministic_and_seed_dependent():
    a, b, c = (shapes.make_split('train', 30, seed=s) for s in (1, 1, 2))
    assert a == b
    assert all(np.array_equal(shapes.render(x), shapes.render(y)) for x, y in zip(a, b))
    assert not any(np.array_equal(shapes.render(x), shapes.render(y)) for x, y in zip(a, c))
    assert shapes.make_split('train', 10, seed=1) == a[:10]  # item i depends only on (split, seed, style, i)
    # the jitter (centre, area, angle) moves the pixels of an otherwise equal item
    item = dict(a[shapes.CLASS_NAMES.index('star')], jitter=(0.0, 0.0, 0.33, 0.0))
    assert not np.array_equal(shapes.render(item), shapes.render(dict(item, jitter=(0.03, -0.02, 0.36, 7.0))))


def test_splits_disjoint_balanced_and_checked():
    train, test = shapes.make_split('train', 200, seed=0), shapes.make_split('test', 100, seed=0)
    assert [a['jitter'] for a in train[:100]] != [a['jitter'] for a in test]  # another stream, not the same items
    for split in (train, test):
        assert set(Counter(a['label'] for a in split).values()) == {len(split) // shapes.NUM_CLASSES}
        assert all(a['shape'] == shapes.CLASS_NAMES[a['label']] for a in split)
        assert all('style' not in a for a in split)  # the upright world's items carry no style
    for attribute in ('colour', 'texture', 'background'):  # every value occurs
        assert {a[attribute] for a in train} == set(shapes.VALUES[attribute]), attribute
    many = shapes.make_split('train', 500, seed=0)
    typical = np.mean([a['colour'] == shapes.TYPICAL_COLOUR[a['shape']] for a in many])
    assert 0.5 < typical < 0.7  # TYPICAL_SHARE = 0.6
    with pytest.raises(ValueError, match='split'):
        shapes.make_split('val', 10)
    with pytest.raises(ValueError, match='style'):
        shapes.make_split('train', 10, style='glossy')


def test_a_texture_keeps_the_colour_on_average_and_vanishes_at_kappas_resolution():
    item = dict(shapes.make_split('train', 1)[0], colour='red', background='white', shape='square')
    items = [dict(item, texture=t) for t in shapes.TEXTURES]
    for t in items:  # two shades whose mean is the colour, at full resolution
        assert np.allclose(shapes.texture_shades(t, 32).reshape(-1, 3).mean(0), shapes.COLOURS['red'])
    full = np.stack([shapes.render(t).astype(float) for t in items])
    coarse = shapes.area_downsample(np.stack([shapes.render(t) for t in items]))
    assert np.abs(full[1] - full[0]).max() > 40  # striped differs from plain in the render
    assert np.abs(coarse[1] - coarse[0]).max() < 0.01 and np.abs(coarse[2] - coarse[0]).max() < 0.01  # edges too


def test_every_caption_names_its_items_attributes():
    for item in shapes.make_split('test', 60):
        assert shapes.attributes_named(shapes.caption(item)) == {a: item[a] for a in shapes.ATTRIBUTES}
    assert shapes.attributes_named('A Pinstriped CYAN star') == {'texture': 'pinstriped', 'colour': 'cyan',
                                                                 'shape': 'star'}


def test_splits_are_deterministic_and_captions_varied():
    a, b = shapes.make_split('train', 64, seed=0), shapes.make_split('train', 64, seed=0)
    assert a == b and a != shapes.make_split('test', 64, seed=0)
    captions = [shapes.caption(x) for x in a]
    assert len(set(captions[:16])) == 16  # a batch of 16 repeats no caption
    words = set(shapes.world_words())
    assert all(set(c.split()) <= words for c in captions)
    assert [x['label'] for x in a[:10]] == list(range(10))


def test_the_judge_reads_every_attribute_and_learns_them():
    images, items = shapes.rendered('train', 600)
    judge = shapes.train_judge(images, items, epochs=6)
    heads = shapes.logits_of(judge(shapes.to_input(images[:5])))
    assert {a: h.shape[1] for a, h in heads.items()} == {a: len(v) for a, v in shapes.VALUES.items()}
    read = shapes.accuracies(judge, shapes.to_input(images), items)
    assert read['background'] > 0.8 and read['shape'] > 0.2  # 6 epochs of 600 renders; chance 0.29 and 0.1


def test_the_dataset_gives_train_py_its_four_fields():
    dataset = shapes.Dataset('train', 12, seed=1)
    assert len(dataset) == 12 and dataset.class_names == shapes.CLASS_NAMES
    image, label, sentence, caption = dataset[3]
    assert image.shape == (3, 32, 32) and -1 <= image.min() and image.max() <= 1
    assert label == 3 and sentence == shapes.sentence(3) and shapes.CLASS_NAMES[3] in caption
    assert dataset.caption_and_label(3) == (caption, label)
    np.testing.assert_array_equal(((image.permute(1, 2, 0) + 1) * 127.5).round().numpy().astype(np.uint8),
                                  shapes.render(dataset.items[3]))
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch[0].shape == (4, 3, 32, 32) and batch[1].tolist() == [0, 1, 2, 3]


def test_upside_down_domain_is_new_seeded_and_turned():
    """The cross-domain target: the same labels, palette and texts, every shape turned 180 degrees, its own seeded
    stream of items; the upright world's items stay what they were."""
    upright = shapes.make_split('train', 40, seed=0)
    turned = shapes.make_split('train', 40, seed=0, style='upside_down')
    assert turned == shapes.make_split('train', 40, seed=0, style='upside_down')
    assert all(a['style'] == 'upside_down' for a in turned) and all('style' not in a for a in upright)
    assert [a['label'] for a in turned] == [a['label'] for a in upright]
    assert [a['jitter'] for a in turned] != [a['jitter'] for a in upright]  # fresh items, not the upright ones turned
    assert all(not np.array_equal(shapes.render(a), shapes.render(b)) for a, b in zip(upright, turned))
    # centred, plain and any tilt: the upside-down render is the upright one rotated 180 degrees (to the rasteriser's
    # sub-pixel offsets), and far from the upright one for shapes without that symmetry
    for name in ('crescent', 'heart', 'star', 'triangle'):
        item = dict(upright[shapes.CLASS_NAMES.index(name)], texture='plain', jitter=(0.0, 0.0, 0.33, 6.0))
        up = shapes.render(item).astype(float)
        down = shapes.render(dict(item, style='upside_down')).astype(float)
        assert np.abs(down - np.rot90(up, 2)).mean() < 0.1 * np.abs(down - up).mean(), name


def check_exported_split(root, split, n_per_class, seed, style):
    """Every PNG of a split is the render of its item, in its class folder, with its caption in captions.jsonl."""
    items = shapes.make_split(split, n_per_class * shapes.NUM_CLASSES, seed, style)
    captions = {e['path']: e['caption'] for e in map(json.loads, open(os.path.join(root, 'captions.jsonl')))}
    assert sorted(os.listdir(os.path.join(root, split))) == shapes.CLASS_NAMES
    for name in shapes.CLASS_NAMES:
        files = os.listdir(os.path.join(root, split, name))
        assert len(files) == n_per_class and all(f.endswith('.png') for f in files)
    for i, item in enumerate(items):
        path = f"{split}/{item['shape']}/{i:05d}.png"
        np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(root, path))), shapes.render(item))
        assert captions[path] == shapes.caption(item)


def test_export_image_folder(tmp_path):
    from data import FolderDataset
    records = shapes.export_image_folder(str(tmp_path), 'train', n_per_class=2, seed=0)
    shapes.export_image_folder(str(tmp_path), 'test', n_per_class=1, seed=0)
    again = shapes.export_image_folder(str(tmp_path), 'train', n_per_class=2, seed=0)  # replaces, keeps the test's
    assert records == again and len(records) == 2 * shapes.NUM_CLASSES
    assert (tmp_path / 'class_names.txt').read_text() == '\n'.join(shapes.CLASS_NAMES) + '\n'
    entries = [json.loads(line) for line in (tmp_path / 'captions.jsonl').read_text().splitlines()]
    assert len(entries) == len({e['path'] for e in entries}) == 3 * shapes.NUM_CLASSES
    assert all(set(e) == {'path', 'caption'} for e in entries)
    check_exported_split(str(tmp_path), 'train', 2, 0, 'upright')
    check_exported_split(str(tmp_path), 'test', 1, 0, 'upright')
    train = FolderDataset(str(tmp_path), 'train', 32, captions=str(tmp_path / 'captions.jsonl'))
    assert len(train) == 20 and train.missing_captions == 0 and train.class_names == shapes.CLASS_NAMES
    caption_of = {r['path']: r['caption'] for r in records}
    assert [train[i][1] for i in (0, 19)] == [0, 9]
    assert all(train[i][3] == caption_of[path.replace(os.sep, '/')] for i, (path, _) in enumerate(train.samples))
    assert len(FolderDataset(str(tmp_path), 'test', 32, train=False)) == 10
    # the upside-down domain exports its own items
    turned = tmp_path / 'turned'
    shapes.export_image_folder(str(turned), 'train', n_per_class=1, seed=0, style='upside_down')
    check_exported_split(str(turned), 'train', 1, 0, 'upside_down')


def export_command(*args):
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    return subprocess.run([sys.executable, '-m', 'world.shapes', 'export', *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_export_command_writes_a_folder_train_py_reads(tmp_path):
    from data import FolderDataset
    out = tmp_path / 'd'
    result = export_command(out, '--style', 'upside_down', '--train_per_class', 2, '--test_per_class', 1,
                            '--seed', 3)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f'wrote {out}: 20 train and 10 test images (upside_down)')
    assert sorted(os.listdir(tmp_path)) == ['d']  # no .part folder left
    check_exported_split(str(out), 'train', 2, 3, 'upside_down')  # the style and seed reached the renders
    check_exported_split(str(out), 'test', 1, 3, 'upside_down')
    train = FolderDataset(str(out), 'train', 32, captions=str(out / 'captions.jsonl'))
    test = FolderDataset(str(out), 'test', 32, train=False)
    assert len(train) == 20 and len(test) == 10 and train.missing_captions == 0
    assert train.class_names == list(shapes.CLASS_NAMES)  # the backbone's class ids, by folder order
    image, label, sentence, caption = train[3]
    assert image.shape == (3, 32, 32) and sentence == f'a photo of a {shapes.CLASS_NAMES[label]}'
    assert shapes.attributes_named(caption)['shape'] == shapes.CLASS_NAMES[label]


@pytest.mark.parametrize('case', ['existing_out', 'zero_train'])
def test_export_command_refuses_in_one_line(tmp_path, case):
    out = tmp_path / 'd'
    if case == 'existing_out':
        out.mkdir()
        (out / 'x').write_text('')
        result = export_command(out, '--train_per_class', 1, '--test_per_class', 1)
        message = f'{out} exists: export writes a new folder'
    else:
        result = export_command(out, '--train_per_class', 0, '--test_per_class', 1)
        message = '--train_per_class must be at least 1, got 0'
    assert result.returncode != 0 and 'Traceback' not in result.stderr and result.stdout == ''
    errors = [line for line in result.stderr.splitlines() if not line.startswith('usage:')]
    assert len(errors) == 1 and errors[0].endswith(f'error: {message}'), result.stderr  # argparse's usage line aside
    assert sorted(os.listdir(tmp_path)) == (['d'] if case == 'existing_out' else [])  # nothing written, no .part
    if case == 'existing_out':
        assert os.listdir(out) == ['x']
