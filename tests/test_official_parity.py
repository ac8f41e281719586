"""
Numerical identity with the official VAR implementation (FoundationVision/VAR), fp32 on the CPU.

Needs a checkout of the official code; point VAR_OFFICIAL at its work tree:
    VAR_OFFICIAL=/path/to/VAR python -m pytest tests/test_official_parity.py -v
Without it these tests are skipped (CI has no copy of the official code; we never ship it).
Both models get the same random weights (every parameter perturbed, so no block is the identity),
and must give the same token maps, images, logits and sampled tokens.
"""
import os
import sys

import pytest
import torch

from var import VAR
from vqvae import VQVAE

OFFICIAL = os.environ.get('VAR_OFFICIAL', '')
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(OFFICIAL, 'models', 'var.py')),
                                reason='set VAR_OFFICIAL to a checkout of FoundationVision/VAR to run the parity tests')

PATCH_NUMS = (1, 2, 3, 4)  # the official VQVAE hard-codes ch_mult (1,1,2,2,4): 16x downsampling, 64px images
VOCAB, CVAE, CH = 64, 8, 32


def official_models(shared_aln: bool):
    sys.path.insert(0, OFFICIAL)
    from models.var import VAR as OfficialVAR
    from models.vqvae import VQVAE as OfficialVQVAE
    torch.manual_seed(0)
    vae = OfficialVQVAE(vocab_size=VOCAB, z_channels=CVAE, ch=CH, test_mode=True, v_patch_nums=PATCH_NUMS)
    var = OfficialVAR(vae, num_classes=10, depth=3, embed_dim=64, num_heads=2, shared_aln=shared_aln, cond_drop_rate=0.0,
                      attn_l2_norm=True, patch_nums=PATCH_NUMS, flash_if_available=False, fused_if_available=False).eval()
    with torch.no_grad():  # random weights everywhere: gates, AdaLN, phis, codebook
        for p in list(vae.parameters()) + list(var.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
        vae.quantize.embedding.weight.normal_()
    return vae, var


def our_models(official_vae, official_var, shared_aln: bool):
    vae = VQVAE(vocab_size=VOCAB, z_channels=CVAE, ch=CH, patch_nums=PATCH_NUMS).eval()
    var = VAR(vocab_size=VOCAB, z_channels=CVAE, depth=3, width=64, num_heads=2, num_classes=10, patch_nums=PATCH_NUMS,
              shared_aln=shared_aln).eval()
    vae.load_state_dict(official_vae.state_dict(), strict=True)
    var.load_state_dict(official_var.state_dict(), strict=True)
    return vae, var


@pytest.mark.parametrize('shared_aln', [False, True])
def test_same_tokens_images_logits(shared_aln):
    o_vae, o_var = official_models(shared_aln)
    vae, var = our_models(o_vae, o_var, shared_aln)
    img = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        o_idx = o_vae.img_to_idxBl(img)
        idx = vae.img_to_idx(img)
        assert all(torch.equal(a, b) for a, b in zip(o_idx, idx))
        rec_diff = (o_vae.img_to_reconstructed_img(img, last_one=True) - vae.reconstruct(img)).abs().max().item()
        assert rec_diff < 1e-5, rec_diff
        o_x = o_vae.quantize.idxBl_to_var_input(o_idx)
        x = vae.quantize.teacher_forcing_input(idx)
        assert (o_x - x).abs().max().item() < 1e-6
        label = torch.tensor([3, 7])
        logit_diff = (o_var(label, o_x) - var(var.class_condition(label), x)).abs().max().item()
        assert logit_diff < 1e-4, logit_diff
    print(f'shared_aln={shared_aln}: reconstruction max|diff|={rec_diff:.2e}, logits max|diff|={logit_diff:.2e}')


@pytest.mark.parametrize('top_k,top_p,cfg', [(0, 0.0, 1.5), (10, 0.0, 4.0), (0, 0.8, 2.0), (20, 0.9, 1.0)])
def test_same_samples(top_k, top_p, cfg):
    o_vae, o_var = official_models(shared_aln=False)
    vae, var = our_models(o_vae, o_var, shared_aln=False)
    import models.var as official_var_module
    sampled = []
    original = official_var_module.sample_with_top_k_top_p_

    def recording_sampler(*args, **kwargs):  # record the official tokens (only within this test)
        out = original(*args, **kwargs)
        sampled.append(out[:, :, 0].clone())
        return out

    official_var_module.sample_with_top_k_top_p_ = recording_sampler
    try:
        label = torch.tensor([1, 4, 9])
        o_img = o_var.autoregressive_infer_cfg(3, label, g_seed=123, cfg=cfg, top_k=top_k, top_p=top_p)
    finally:
        official_var_module.sample_with_top_k_top_p_ = original
    idx = var.generate(vae, var.class_condition(label), cfg=cfg, top_k=top_k, top_p=top_p, seed=123)
    assert all(torch.equal(a, b) for a, b in zip(sampled, idx))
    img = vae.idx_to_img(idx).add(1).mul(0.5)
    img_diff = (o_img - img).abs().max().item()
    assert img_diff < 1e-5, img_diff
    no_cache = var.generate(vae, var.class_condition(label), cfg=cfg, top_k=top_k, top_p=top_p, seed=123, use_kv_cache=False)
    assert all(torch.equal(a, b) for a, b in zip(no_cache, idx))


def test_bench_official_sampler_is_the_official_model_on_our_weights():
    """tools.bench sampling --official builds the official models from ours (same weights): the same images as ours."""
    from tools import bench
    o_vae, o_var = official_models(shared_aln=False)
    vae, var = our_models(o_vae, o_var, shared_aln=False)
    args = type('Args', (), dict(cfg=1.5, top_k=10, top_p=0.9))()
    label = torch.tensor([1, 4])
    images = bench.official_sampler(OFFICIAL, vae, var)(label, 7, args)
    ours = vae.idx_to_img(var.generate(vae, var.class_condition(label), cfg=1.5, top_k=10, top_p=0.9, seed=7)).add(1).mul(0.5)
    assert (images - ours).abs().max().item() < 1e-5
