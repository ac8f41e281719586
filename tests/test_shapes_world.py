"""The shipped shapes-world backbone (checkpoints/shapes, made by world.pretrain) and runs still do what the README
and their gate reports say."""
import json
import os

import numpy as np
import pytest
import torch

from fid import ClipFeatures, clip_score
from world import shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.join(REPO, 'checkpoints', 'shapes')


def report(stage: str) -> dict:
    with open(os.path.join(ROOT, f'report_{stage}.json')) as f:
        return json.load(f)


def test_every_gate_report_says_what_its_figures_say():
    """A flag that disagrees with its own figure was written by hand or by other code than the gate's."""
    judge, vqvae, clip, var = (report(s) for s in ('judge', 'vqvae', 'clip', 'var'))
    assert judge['G0_class_at_kappa'] == (judge['at_kappa']['shape'] >= 0.90)
    assert vqvae['G1_psnr'] == (vqvae['heldout_psnr_db'] >= 30)
    assert vqvae['G1_class_at_kappa'] == (vqvae['own_tokens_at_kappa']['shape'] >= 0.80)
    assert vqvae['G1_attributes_kept'] == (min(vqvae['judge_on_reconstructions'].values()) >= 0.95)
    assert clip['G2_met'] == (clip['image_to_caption_top1'] >= 0.90 and clip['names_class_at_kappa'] >= 0.70)
    assert var['G3_recognised'] == (var['class_recognised'] >= 0.90) and var['G3_fd'] == (var['fd_ratio'] <= 1.5)
    for r in (judge, vqvae, clip, var):
        assert r['steps'] > 0 and r['seconds'] > 0  # every stage trained to its end


def test_shipped_vqvae_reconstructs_what_the_judge_reads():
    from pretrained import load_backbone
    vae, _ = load_backbone(ROOT)  # strict loading of the shipped VQVAE and VAR
    images, items = shapes.rendered('test', 60, 7)
    x = shapes.to_input(images)
    with torch.no_grad():
        rec = vae.reconstruct(x).float().clamp(-1, 1)
    psnr = 10 * torch.log10(4 / (rec - x).square().mean()).item()
    assert psnr > 28, psnr  # report_vqvae.json: over 30 dB on 1,000 held-out renders
    read = shapes.accuracies(shapes.load_judge(ROOT), rec, items)
    assert min(read.values()) >= 0.9, read


def test_tiny_clip_scores_matching_captions_above_shuffled():
    clip = ClipFeatures(pretrained=os.path.join(ROOT, 'clip'))
    images, items = shapes.rendered('test', 60, 3)
    image_feats = clip.images(images)
    captions = [shapes.caption(a) for a in items]
    matched = clip_score(image_feats, clip.texts(captions))
    shuffled = clip_score(image_feats, clip.texts(captions[1:] + captions[:1]))  # every image with another's caption
    assert matched > shuffled + 5, (matched, shuffled)


def test_sample_text_uses_the_shipped_text_to_image_run(tmp_path, monkeypatch):
    import sample
    from PIL import Image
    monkeypatch.chdir(REPO)  # as in the README
    out = tmp_path / 'grid.png'
    sample.main(['--text', 'a striped red heart on a white background', '--n', '2', '--out', str(out),
                 '--device', 'cpu'])
    S = shapes.IMAGE_SIZE
    with Image.open(out) as im:
        assert im.size == (2 * S + 3 * 2, S + 2 * 2)


@pytest.mark.parametrize('run', ['mvp_c2i', 'mvp_t2i'])
def test_the_shipped_runs_load_on_the_shipped_backbone(run, monkeypatch):
    from mvp import load_run
    monkeypatch.chdir(REPO)
    config, _, var, _, parts = load_run(os.path.join('checkpoints', 'shapes', run), 'cpu')
    assert config['backbone'] == 'checkpoints/shapes' and config['data'] == 'shapes'
    assert config['t2i'] == (run == 'mvp_t2i') and parts.prompt.tokens.abs().sum() > 0  # trained prompts


def test_quick_start_runs_end_to_end(tmp_path, monkeypatch):
    """The README's quick start, shortened to a few steps: MVP with both CLIP losses on the shipped backbone, then
    the judge's figures before and after."""
    import train
    from world import evaluate
    monkeypatch.chdir(REPO)
    out = str(tmp_path / 'quickstart')
    train.main(['--backbone', 'checkpoints/shapes', '--data', 'shapes', '--max_steps', '3', '--shapes_n', '64',
                '--batch_size', '4', '--num_workers', '0', '--device', 'cpu', '--sample_every', '0', '--out_dir', out])
    results = evaluate.evaluate_run(out, per_class=3, seed=0)
    assert set(results) == {'before', 'after'} and all(np.isfinite(v) for r in results.values() for v in r.values())
    assert results['before']['class_accuracy'] >= 0.5  # the shipped VAR draws its classes (G3: >= 90% on 1,000)


def test_text_projection_starts_captions_near_their_class_embedding():
    """mvp.init_text_projection on the shipped VAR and CLIP: held-out captions land closest to their own class's
    embedding far above chance (1 in 10), at the class embeddings' scale."""
    from clip_loss import FrozenClip
    from mvp import init_text_projection
    from pretrained import load_backbone, load_clip
    from text_condition import TextCondition
    _, var = load_backbone(ROOT)
    clip = FrozenClip(*load_clip(os.path.join(ROOT, 'clip')))
    text_cond = TextCondition(clip.encode_text(['']).shape[1], var.width)
    init_text_projection(text_cond, clip, var, shapes.Dataset('train', 2000))
    items = shapes.make_split('test', 200, 0)
    with torch.no_grad():
        cond = text_cond(clip.encode_text([shapes.caption(a) for a in items]))  # (200, C)
    class_emb = var.class_emb.weight[:shapes.NUM_CLASSES]
    nearest = torch.cdist(cond, class_emb).argmin(1)
    assert (nearest == torch.tensor([a['label'] for a in items])).float().mean() > 0.3
    assert 0.5 < cond.norm(dim=1).mean() / class_emb.norm(dim=1).mean() < 2
