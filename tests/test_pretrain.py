"""pretrain.py end to end on a handful of steps: every stage writes loadable files and a report of its gate."""
import json
import os

import pytest
import torch

import pretrain
import shapes
from clip_loss import load_clip
from pretrained import load_backbone


@pytest.fixture(scope='module')
def pretrained_folder(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('backbone'))
    pretrain.main(['--stage', 'all', '--out', out, '--n_train', '64', '--vae_steps', '3', '--var_steps', '3',
                   '--clip_steps', '2', '--classifier_steps', '2', '--log_every', '1'])
    return out


def report(out: str, stage: str) -> dict:
    with open(os.path.join(out, f'report_{stage}.json')) as f:
        return json.load(f)


def test_every_stage_reports_its_gate(pretrained_folder):
    vqvae = report(pretrained_folder, 'vqvae')
    assert 0 < vqvae['heldout_psnr_db'] < 60 and 0 < vqvae['codebook_usage'] <= 1
    assert 0 <= vqvae['recon_shape_recognised'] <= 1  # the classifier stage ran first, so this is measured
    var = report(pretrained_folder, 'var')
    assert 0 <= var['class_recognised'] <= 1 and var['samples'] == 20 * shapes.NUM_CLASSES
    assert 0 <= report(pretrained_folder, 'clip')['image_to_caption_top1'] <= 1
    assert 0 <= report(pretrained_folder, 'classifier')['heldout_accuracy'] <= 1
    assert all(report(pretrained_folder, s)['steps'] > 0 for s in ('vqvae', 'var', 'clip', 'classifier'))


def test_written_models_load_strictly_and_run(pretrained_folder):
    vae, var = load_backbone(pretrained_folder)
    assert var.patch_nums == pretrain.PATCH_NUMS and var.num_classes == shapes.NUM_CLASSES
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        idx = var.generate(vae, var.class_emb(torch.tensor([0, 1])), cfg=1.5, top_k=0, top_p=0.0, seed=0)
        assert vae.idx_to_img(idx).shape == (2, 3, 64, 64)
        assert shapes.load_shape_classifier(pretrained_folder)(x).shape == (2, shapes.NUM_CLASSES)
    model, tokenizer = load_clip(os.path.join(pretrained_folder, 'clip'))
    assert model.encode_text(tokenizer(['a photo of a star'])).shape[-1] == pretrain.CLIP_CFG['embed_dim']
