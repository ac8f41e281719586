"""Tests of fid.py: closed-form Frechet distances, precision/recall, IS, CLIP-score, CLIP
checkpoint folders, the CLI with its statistics cache and its one-line errors, and the
Inception weights path (offline failure, and loading a cached file through pytorch-fid)."""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fid  # noqa: E402

TINY_CLIP_CFG = {  # a tiny open_clip model: 32x32 images, patch 8, 2 layers of width 64 per tower
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def _images(seed, n, size=32, mean=128.0):
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(mean, 40, (n, size, size, 3)), 0, 255).astype(np.uint8)  # (n, size, size, 3)


def _save_folder(folder, images):
    """PNGs, every other one in a subfolder, so the recursive walk and sorting are exercised"""
    for i, im in enumerate(images):
        path = os.path.join(folder, 'sub' if i % 2 else '', f'{i:03d}.png')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(im).save(path)


@pytest.fixture(scope='module')
def tiny_clip(tmp_path_factory):
    """(random-weight ClipFeatures of a registered tiny config, checkpoint folder holding its weights)"""
    import open_clip
    root = tmp_path_factory.mktemp('clip')
    with open(root / 'tiny-test-clip.json', 'w') as f:
        json.dump(TINY_CLIP_CFG, f)
    open_clip.add_model_config(str(root / 'tiny-test-clip.json'))
    torch.manual_seed(0)
    model = fid.ClipFeatures('tiny-test-clip', pretrained=None)
    folder = root / 'tiny_clip'  # the layout the project ships: open_clip_config.json + weights
    folder.mkdir()
    with open(folder / 'open_clip_config.json', 'w') as f:
        json.dump({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": {}}, f)
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in model.model.state_dict().items()}, str(folder / 'open_clip_model.safetensors'))
    return model, str(folder)


@pytest.fixture(scope='module')
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp('data')
    _save_folder(root / 'gen', _images(0, 12))
    _save_folder(root / 'ref', _images(1, 12, mean=90.0))
    (root / 'texts.txt').write_text(''.join(f'picture number {i}\n' for i in range(12)))
    return root

# -----------------------------------------------------------------------------
# metrics


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)
    # same covariance: only the means count
    assert fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s1)) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-9)


def test_frechet_distance_commuting_non_diagonal():
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))  # shared eigenvectors: S1 and S2 commute
    a, b = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    sigma1, sigma2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert abs(sigma1[0, 1]) > 1e-3  # really non-diagonal
    mu1, mu2 = np.zeros(5), np.arange(5.0)
    expected = 30.0 + np.sum(a + b - 2 * np.sqrt(a * b))  # ||0 - (0..4)||^2 = 30
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_self_and_singular():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32))  # (400, 32), correlated
    mu, sigma = fid.feature_statistics(feats)
    assert mu.shape == (32,) and sigma.shape == (32, 32) and sigma.dtype == np.float64
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)
    # fewer samples than dimensions: rank-deficient covariances, still a finite, sensible number
    few1, few2 = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 1.0
    d = fid.frechet_distance(*fid.feature_statistics(few1), *fid.feature_statistics(few2))
    assert math.isfinite(d) and d > 64 * 0.5  # the means alone are ~sqrt(64) apart
    m, s = fid.feature_statistics(few1)
    assert abs(fid.frechet_distance(m, s, m, s)) < 1e-6 * np.trace(s)
    with pytest.raises(ValueError):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_precision_recall():
    rng = np.random.default_rng(3)
    shared = rng.normal(size=(100, 8))  # (100, 8)
    only_real, only_fake = rng.normal(size=(100, 8)) + 50, rng.normal(size=(100, 8)) - 50
    assert fid.precision_recall(shared, shared.copy()) == (1.0, 1.0)
    assert fid.precision_recall(shared, only_fake) == (0.0, 0.0)
    # half the fakes lie on the real manifold, half the reals on the fake manifold
    real, fake = np.concatenate([shared, only_real]), np.concatenate([shared, only_fake])
    assert fid.precision_recall(real, fake, k=3) == (0.5, 0.5)
    # fakes collapsed onto part of the real data: precise but not diverse
    precision, recall = fid.precision_recall(real, shared[:50])
    assert precision == 1.0 and 0.0 < recall <= 0.5
    # the radius is the distance to the k-th nearest OTHER point: reals 0 1 2 3 get radii 3 2 2 3,
    # so the real manifold is [-3, 6]
    line = np.array([[0.0], [1.0], [2.0], [3.0]])
    assert fid.precision_recall(line, np.array([[5.9], [-2.9], [6.1], [-3.1]]), k=3)[0] == 0.5
    assert fid.precision_recall(line, np.array([[4.9], [-1.9], [5.1], [-2.1]]), k=2)[0] == 0.5  # radii 2 1 1 2


def test_inception_score():
    n, classes = 100, 10
    uniform = np.full((n, classes), 1.0 / classes)
    assert fid.inception_score(uniform) == pytest.approx((1.0, 0.0), abs=1e-9)
    one_hot = np.eye(classes)[np.arange(n) % classes]  # confident, and every class in every split
    assert fid.inception_score(one_hot) == pytest.approx((10.0, 0.0), abs=1e-9)
    assert fid.inception_score(one_hot, splits=1)[0] == pytest.approx(10.0)
    assert fid.inception_score(50.0 * one_hot)[0] == pytest.approx(10.0, rel=1e-6)  # logits
    assert fid.inception_score(np.eye(classes)[np.zeros(n, int)])[0] == pytest.approx(1.0)  # one class: not diverse
    with pytest.raises(ValueError):
        fid.inception_score(one_hot[:5], splits=10)


def test_clip_score(tiny_clip):
    model, _ = tiny_clip
    feats = model.images(_images(4, 8))  # (8, 32), random weights
    assert feats.shape == (8, 32)
    assert fid.clip_score(feats, feats) == pytest.approx(100.0)
    assert fid.clip_score(feats, -feats) == 0.0  # negative cosines count as 0
    shuffled = fid.clip_score(feats, feats[np.roll(np.arange(8), 1)])
    rng = np.random.default_rng(5)
    noisy = fid.clip_score(feats, feats + 0.1 * feats.std() * rng.normal(size=feats.shape))
    assert shuffled < noisy < 100.0
    texts = model.texts(['a red circle', 'a blue square', 'a star'])
    assert texts.shape == (3, 32)
    assert 0.0 <= fid.clip_score(feats[:3], texts) <= 100.0
    with pytest.raises(ValueError):
        fid.clip_score(feats, texts)

# -----------------------------------------------------------------------------
# inputs and CLIP checkpoints


def test_load_images(tmp_path):
    images = _images(6, 5, size=16)
    _save_folder(tmp_path / 'png', images)
    # sorted relative paths: 000.png 002.png 004.png sub/001.png sub/003.png
    np.testing.assert_array_equal(fid.load_images(str(tmp_path / 'png')), images[[0, 2, 4, 1, 3]])
    Image.fromarray(images[0]).save(tmp_path / 'png' / 'sub' / 'zzz.JPEG')
    Image.fromarray(images[1]).save(tmp_path / 'png' / 'zzz.webp')
    (tmp_path / 'png' / 'notes.txt').write_text('not an image')
    assert fid.load_images(str(tmp_path / 'png')).shape == (7, 16, 16, 3)
    np.savez(tmp_path / 'samples.npz', arr_0=images)
    np.testing.assert_array_equal(fid.load_images(str(tmp_path / 'samples.npz')), images)


def test_clip_features_from_folder(tiny_clip, tmp_path):
    model, folder = tiny_clip
    images = _images(7, 6)
    expected = model.images(images)
    loaded = fid.ClipFeatures('ViT-B-32', folder)  # the folder's config wins over --clip-model
    assert loaded.label == f'tiny_clip/{folder}'
    np.testing.assert_allclose(loaded.images(images), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(fid.ClipFeatures('ViT-B-32', folder).images(images), loaded.images(images))
    pil = [Image.fromarray(im) for im in images]
    np.testing.assert_array_equal(loaded.images(pil), loaded.images(images))
    with pytest.raises(fid.FIDError, match='open_clip_config.json'):
        fid.ClipFeatures('ViT-B-32', str(tmp_path))

# -----------------------------------------------------------------------------
# CLI


def _run(capsys, *argv):
    """(exit code, stdout, stderr) of fid.main(argv)"""
    try:
        fid.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_clip_end_to_end_and_cache(tiny_clip, folders, capsys, monkeypatch):
    _, ckpt = tiny_clip
    gen, ref = folders / 'gen', folders / 'ref'
    calls = []
    featurise = fid._featurise
    monkeypatch.setattr(fid, '_featurise', lambda *a: calls.append(a[0]) or featurise(*a))
    args = [gen, ref, '--features', 'clip', '--clip-pretrained', ckpt, '--device', 'cpu', '--batch-size', '5']
    code, out, err = _run(capsys, *args, '--pr', '--clip-score', folders / 'texts.txt')
    assert code == 0, err
    lines = dict(line.split(': ') for line in out.strip().splitlines())
    label = f'tiny_clip/{ckpt}'
    assert list(lines) == [f'FD_clip({label})', 'precision', 'recall', f'CLIP-score({label})']
    values = {k: float(v) for k, v in lines.items()}
    assert all(math.isfinite(v) for v in values.values()) and values[f'FD_clip({label})'] > 0
    assert 0 <= values['precision'] <= 1 and 0 <= values['recall'] <= 1
    assert sorted(calls) == [str(gen), str(ref)]  # each input featurised once, texts included
    cache = str(gen) + '.clip-tiny_clip-tiny_clip.stats.npz'
    with np.load(cache) as c:
        assert c['features'].shape == (12, 32) and str(c['feature_space']) == 'clip-tiny_clip-tiny_clip'

    calls.clear()  # second run: everything from the cache
    code, out2, _ = _run(capsys, *args)
    assert code == 0 and calls == [] and out2.splitlines()[0] == out.splitlines()[0]
    code, out3, _ = _run(capsys, *args, '--no-cache')
    assert code == 0 and len(calls) == 2 and out3 == out2

    calls.clear()  # a cache file stands in for its input, per-image features included
    code, out4, _ = _run(capsys, cache, ref, *args[2:], '--pr')
    assert code == 0 and calls == [] and out4 == ''.join(out.splitlines(keepends=True)[:3])

    calls.clear()  # a changed input invalidates its cache
    Image.fromarray(_images(9, 1)[0]).save(gen / '999.png')
    code, out5, _ = _run(capsys, *args)
    assert code == 0 and calls == [str(gen)] and out5 != out2
    os.remove(gen / '999.png')


def _assert_one_line_error(code, out, err, *needles):
    """exit code != 0, nothing on stdout, and on stderr no traceback and one message line
    (besides progress bars, when the error comes up while reading images)"""
    assert code != 0 and out == ''
    lines = [line for line in err.splitlines() if line.strip() and '%|' not in line]
    assert 'Traceback' not in err and len(lines) == 1 and lines[0].startswith('fid.py: error: '), err
    for needle in needles:
        assert needle in lines[0]


def test_cli_bad_inputs(tiny_clip, folders, tmp_path, capsys):
    _, ckpt = tiny_clip
    clip = ['--features', 'clip', '--clip-pretrained', ckpt]
    gen, ref = folders / 'gen', folders / 'ref'
    _assert_one_line_error(*_run(capsys, tmp_path / 'missing', ref, *clip), 'no such file')
    (tmp_path / 'empty').mkdir()
    _assert_one_line_error(*_run(capsys, tmp_path / 'empty', ref, *clip), 'no images')
    np.savez(tmp_path / 'junk.npz', x=np.zeros(3))
    _assert_one_line_error(*_run(capsys, gen, tmp_path / 'junk.npz', *clip), 'arr_0', 'mu')
    np.savez(tmp_path / 'stats.npz', mu=np.zeros(2048), sigma=np.eye(2048))  # Inception statistics only
    _assert_one_line_error(*_run(capsys, gen, tmp_path / 'stats.npz', *clip), 'inception statistics only')
    (tmp_path / 'texts.txt').write_text('one\ntwo\n')
    _assert_one_line_error(*_run(capsys, gen, ref, *clip, '--clip-score', tmp_path / 'texts.txt'),
                           '12 images', '2 texts')
    _save_folder(tmp_path / 'mixed', [_images(8, 1, size=16)[0], _images(8, 1, size=24)[0]])
    _assert_one_line_error(*_run(capsys, tmp_path / 'mixed', ref, *clip, '--no-cache'), 'same size')
    _assert_one_line_error(*_run(capsys, gen, ref, '--features', 'clip', '--clip-pretrained', tmp_path / 'nope.pt'),
                           'could not load CLIP model')
    _assert_one_line_error(*_run(capsys, gen, ref, *clip, '--batch-size', '0'), '--batch-size must be at least 1')
    _assert_one_line_error(*_run(capsys, gen, ref, *clip, '--device', 'gpu0'), '--device gpu0 is not a device')
    # and as a real process: exit code 1, one line on stderr, nothing on stdout
    p = subprocess.run([sys.executable, fid.__file__, str(tmp_path / 'missing'), str(ref)],
                       capture_output=True, text=True, timeout=120)
    _assert_one_line_error(p.returncode, p.stdout, p.stderr, 'no such file')

# -----------------------------------------------------------------------------
# Inception


def test_inception_offline_fails_fast(tmp_path, monkeypatch, folders, capsys):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))  # an empty hub cache
    url = 'http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth'  # discard port: refused at once
    cached = str(tmp_path / 'torch' / 'hub' / 'checkpoints' / 'pt_inception-2015-12-05-6726825d.pth')
    start = time.time()
    with pytest.raises(fid.FIDError) as e:
        fid.InceptionFeatures('cpu', weights_url=url)
    assert time.time() - start < 15
    assert url in str(e.value) and cached in str(e.value)
    assert not os.listdir(os.path.dirname(cached))  # no partial file left behind
    monkeypatch.setattr(fid, 'FID_WEIGHTS_URL', url)
    _assert_one_line_error(*_run(capsys, folders / 'gen', folders / 'ref', '--no-cache'), url, cached)


def test_inception_features_from_cached_weights(tmp_path, monkeypatch):
    """random weights in the FID Inception's layout, placed in the hub cache: no download, and
    pytorch-fid's network plus the fc layer for IS are built from that file"""
    import torchvision
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    path = tmp_path / 'hub' / 'checkpoints' / 'pt_inception-2015-12-05-6726825d.pth'
    path.parent.mkdir(parents=True)
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    torch.save(net.state_dict(), path)
    model = fid.InceptionFeatures('cpu', weights_url='http://127.0.0.1:9/unused.pth')
    feats = model.images(_images(10, 2))
    assert feats.shape == (2, 2048) and feats.dtype == np.float32 and np.isfinite(feats).all()
    logits = model.logits(feats)  # (2, 1008) = pool3 @ W.T, no bias
    np.testing.assert_allclose(logits, feats.astype(np.float64) @ net.fc.weight.detach().double().numpy().T, rtol=1e-6)
