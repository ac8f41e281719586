"""The shipped shapes-world models (checkpoints/shapes, made by pretrain.py) still do what the README says."""
import os

import numpy as np
import torch

import shapes
from fid import ClipFeatures, clip_score

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'checkpoints', 'shapes')


def held_out(n: int, seed: int = 0):
    items = shapes.make_split('test', n, seed)
    return np.stack([shapes.render(a) for a in items]), items


def test_tiny_clip_scores_matching_captions_above_shuffled():
    clip = ClipFeatures(pretrained=os.path.join(ROOT, 'clip'))
    images, items = held_out(60)
    image_feats = clip.images(images)
    captions = [shapes.caption(a) for a in items]
    matched = clip_score(image_feats, clip.texts(captions))
    shuffled = clip_score(image_feats, clip.texts(captions[1:] + captions[:1]))  # every image with another's caption
    assert matched > shuffled + 5, (matched, shuffled)
    sentences = [shapes.sentence(a['label']) for a in items]
    assert clip_score(image_feats, clip.texts(sentences)) > clip_score(image_feats, clip.texts(sentences[7:] + sentences[:7]))


def test_shipped_backbone_reconstructs_every_attribute():
    from pretrained import load_backbone
    vae, var = load_backbone(ROOT)  # strict loading of the shipped VQVAE and VAR
    images, items = held_out(32)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    rec = vae.reconstruct(x)
    psnr = 10 * torch.log10(1 / ((rec - x) / 2).square().mean()).item()
    assert psnr > 33, psnr  # README: 37.1 dB on 1000 held-out images
    classifier = shapes.load_shape_classifier(ROOT)
    for key in ('shape', 'colour', 'size', 'position', 'background'):
        accuracy = np.mean([shapes.attribute_accuracy(r, a, keys=(key,), shape_classifier=classifier.predict)
                            for r, a in zip(rec, items)])
        assert accuracy >= 0.9, (key, accuracy)


def test_shipped_shape_classifier_names_held_out_renders():
    images, items = held_out(100, seed=3)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        predicted = shapes.load_shape_classifier(ROOT)(x).argmax(1)
    assert (predicted == torch.tensor([a['label'] for a in items])).float().mean() >= 0.97


def test_sample_text_uses_the_shipped_text_to_image_run(tmp_path, monkeypatch):
    import sample
    monkeypatch.chdir(os.path.dirname(os.path.dirname(ROOT)))  # the repository root, as in the README
    out = tmp_path / 'grid.png'
    sample.main(['--text', 'a large green circle in the center on a white background', '--n', '2', '--out', str(out),
                 '--device', 'cpu'])
    from PIL import Image
    S = shapes.IMAGE_SIZE
    assert Image.open(out).size == (2 * S + 3 * 2, S + 2 * 2)


def test_quick_start_runs_end_to_end(tmp_path, monkeypatch):
    """The README's quick start, shortened to a few steps: MVP with both CLIP losses on the shipped backbone, then
    the before/after figures."""
    import evaluate
    import train
    monkeypatch.chdir(os.path.dirname(os.path.dirname(ROOT)))
    out = str(tmp_path / 'quickstart')
    train.main(['--backbone', 'checkpoints/shapes', '--data', 'shapes', '--max_steps', '3', '--shapes_n', '64',
                '--batch_size', '4', '--num_workers', '0', '--device', 'cpu', '--sample_every', '0', '--out_dir', out])
    results = evaluate.evaluate_run(f'{out}/ckpt.pt', per_class=3, seed=0)
    assert set(results) == {'before', 'after'} and all(np.isfinite(v) for r in results.values() for v in r.values())


def test_text_projection_starts_captions_near_their_class_embedding():
    """model.init_text_projection on the shipped VAR and CLIP: held-out captions land closest to their own class's
    embedding far above chance (1 in 10), at the class embeddings' scale (fitted on sentences alone, they land ~5x
    farther out, where VAR draws noise)."""
    from clip_loss import FrozenClip
    from pretrained import load_clip
    from pretrained import load_backbone
    from text_condition import TextCondition
    from mvp import init_text_projection

    _, var = load_backbone(ROOT)
    clip = FrozenClip(*load_clip(os.path.join(ROOT, 'clip')))
    text_cond = TextCondition(clip.encode_text(['']).shape[1], var.width)
    init_text_projection(text_cond, clip, var, shapes.ShapesDataset('train', 2000))
    items = shapes.make_split('test', 200, 0)
    with torch.no_grad():
        cond = text_cond(clip.encode_text([shapes.caption(a) for a in items]))  # (200, C)
    class_emb = var.class_emb.weight[:shapes.NUM_CLASSES]
    nearest = torch.cdist(cond, class_emb).argmin(1)
    assert (nearest == torch.tensor([a['label'] for a in items])).float().mean() > 0.3
    assert 0.5 < cond.norm(dim=1).mean() / class_emb.norm(dim=1).mean() < 2
