"""data.FolderDataset on small ImageNet-style folders written by world.shapes.export_image_folder (and by hand)."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from data import FolderDataset, load_captions  # noqa: E402
from world.shapes import CLASS_NAMES, IMAGE_SIZE, export_image_folder  # noqa: E402

S = 16  # the target image size, below the exported IMAGE_SIZE (32 px)


@pytest.fixture(scope='module')
def shapes_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes_folder')
    records = export_image_folder(str(root), 'train', n_per_class=2)
    return str(root), records


def test_labels_in_sorted_folder_order(shapes_folder):
    root, records = shapes_folder
    ds = FolderDataset(root, 'train', S, captions=os.path.join(root, 'captions.jsonl'))
    assert len(ds) == len(records) == 20
    folders = sorted(os.listdir(os.path.join(root, 'train')))
    assert folders == sorted(CLASS_NAMES)
    labels = [ds[i][1] for i in range(len(ds))]
    assert labels == sorted(labels) == [k for k in range(10) for _ in range(2)]
    for (path, label) in ds.samples:
        assert path.split(os.sep)[1] == folders[label]


def test_sentences_from_class_names_file(shapes_folder, tmp_path):
    root, _ = shapes_folder
    ds = FolderDataset(root, 'train', S)
    assert ds.class_names == CLASS_NAMES
    assert [ds[i][2] for i in (0, 19)] == [f'a photo of a {CLASS_NAMES[0]}', f'a photo of a {CLASS_NAMES[9]}']
    # the names come from the file (not from the folder names): another file, other sentences
    names = tmp_path / 'names.txt'
    names.write_text(''.join(f'thing number {k}\n' for k in range(10)) + '\n')  # a trailing blank line is fine
    ds = FolderDataset(root, 'train', S, class_names=str(names))
    assert ds.sentences == [f'a photo of a thing number {k}' for k in range(10)]
    assert all(ds[i][2] == f'a photo of a thing number {ds[i][1]}' for i in range(len(ds)))


def test_captions_from_jsonl(shapes_folder):
    root, records = shapes_folder
    ds = FolderDataset(root, 'train', S, captions=os.path.join(root, 'captions.jsonl'))
    assert ds.missing_captions == 0
    caption_of = {r['path']: r['caption'] for r in records}
    for i, (path, _) in enumerate(ds.samples):
        assert ds[i][3] == caption_of[path.replace(os.sep, '/')]
    assert ds[0][3] != ds[0][2]  # a caption, not the sentence


def test_missing_captions_fall_back_to_the_sentence(shapes_folder, tmp_path):
    root, records = shapes_folder
    kept = [r for i, r in enumerate(records) if i % 4 != 0]  # drop 5 of 20
    partial = tmp_path / 'partial.jsonl'
    partial.write_text(''.join(json.dumps(r) + '\n' for r in kept))
    ds = FolderDataset(root, 'train', S, captions=str(partial))
    assert ds.missing_captions == 5
    caption_of = {r['path']: r['caption'] for r in kept}
    for i, (path, label) in enumerate(ds.samples):
        expected = caption_of.get(path.replace(os.sep, '/'), f'a photo of a {CLASS_NAMES[label]}')
        assert ds[i][3] == expected


def test_images_shape_and_range(shapes_folder):
    root, records = shapes_folder
    assert Image.open(os.path.join(root, records[0]['path'])).size == (IMAGE_SIZE, IMAGE_SIZE)  # the world's 32 px
    for size in (S, 24, IMAGE_SIZE):
        ds = FolderDataset(root, 'train', size)
        for i in (0, 7, 19):
            img = ds[i][0]
            assert img.shape == (3, size, size) and img.dtype == torch.float32
            assert img.min() >= -1 and img.max() <= 1
            assert img.std() > 0.05  # a shape on a background, not a flat image


@pytest.fixture(scope='module')
def wide_folder(tmp_path_factory):
    """One non-square (96 x 32) noise image: random crops have room to move."""
    root = tmp_path_factory.mktemp('wide')
    os.makedirs(root / 'train' / 'noise')
    pixels = np.random.default_rng(0).integers(0, 256, (32, 96, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / 'train' / 'noise' / 'wide.png')
    return str(root)


def crop(root, seed, epoch, train=True):
    ds = FolderDataset(root, 'train', S, train=train, seed=seed)
    ds.epoch = epoch
    return ds[0][0]


def test_random_crop_depends_only_on_seed_epoch_index(wide_folder):
    assert torch.equal(crop(wide_folder, 0, 0), crop(wide_folder, 0, 0))
    assert torch.equal(crop(wide_folder, 5, 3), crop(wide_folder, 5, 3))
    epochs = [crop(wide_folder, 0, e) for e in range(6)]
    assert any(not torch.equal(epochs[0], x) for x in epochs[1:])  # other epochs, other crops
    seeds = [crop(wide_folder, s, 0) for s in range(6)]
    assert any(not torch.equal(seeds[0], x) for x in seeds[1:])
    assert all(x.shape == (3, S, S) for x in epochs + seeds)


def test_center_crop_for_evaluation(wide_folder):
    # resize the short side to 1.125 S (Lanczos) -> 54 x 18, then the centered S x S window
    img = Image.open(os.path.join(wide_folder, 'train', 'noise', 'wide.png')).convert('RGB')
    short = round(1.125 * S)
    resized = img.resize((round(96 * short / 32), short), Image.LANCZOS)
    left, top = (resized.width - S) // 2, (resized.height - S) // 2
    expected = np.asarray(resized.crop((left, top, left + S, top + S)), dtype=np.float32) / 127.5 - 1
    for epoch in (0, 4):  # no randomness at all
        got = crop(wide_folder, seed=epoch, epoch=epoch, train=False)
        np.testing.assert_allclose(got.permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_empty_folder_raises(tmp_path):
    (tmp_path / 'train' / 'some_class').mkdir(parents=True)
    (tmp_path / 'train' / 'some_class' / 'notes.txt').write_text('not an image')
    with pytest.raises(ValueError, match='no images'):
        FolderDataset(str(tmp_path), 'train', S)
    with pytest.raises(FileNotFoundError):
        FolderDataset(str(tmp_path), 'val', S)


def test_broken_jsonl_names_the_line(shapes_folder, tmp_path):
    root, records = shapes_folder
    good = [json.dumps(r) for r in records[:3]]
    cases = {
        'syntax': [good[0], '', '{"path": "train/circle/00000.png", "caption": ', good[1]],  # line 3, after a blank line
        'no_caption_key': [good[0], good[1], good[2], '{"path": "train/circle/00000.png"}'],  # line 4
        'not_an_object': [good[0], '["a", "list"]'],  # line 2
    }
    for name, lines in cases.items():
        path = tmp_path / f'{name}.jsonl'
        path.write_text('\n'.join(lines) + '\n')
        line_no = {'syntax': 3, 'no_caption_key': 4, 'not_an_object': 2}[name]
        with pytest.raises(ValueError, match=f'line {line_no}\\b') as info:
            FolderDataset(root, 'train', S, captions=str(path))
        assert str(path) in str(info.value)
        with pytest.raises(ValueError, match=f'line {line_no}\\b'):
            load_captions(str(path))


def test_class_names_with_the_wrong_count(shapes_folder, tmp_path):
    root, _ = shapes_folder
    names = tmp_path / 'names.txt'
    names.write_text('\n'.join(CLASS_NAMES[:9]) + '\n')
    with pytest.raises(ValueError, match='9 class names.*10 class folders'):
        FolderDataset(root, 'train', S, class_names=str(names))


def test_missing_class_names_file_is_an_error(shapes_folder, tmp_path):
    # an explicitly given --class_names file that does not exist must not silently fall back to the folder names
    root, _ = shapes_folder
    with pytest.raises(FileNotFoundError, match='nope.txt'):
        FolderDataset(root, 'train', S, class_names=str(tmp_path / 'nope.txt'))
