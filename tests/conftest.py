"""Tiny models shared by the tests: small enough to run a training step on the CPU in well under a second."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from var import VAR  # noqa: E402
from vqvae import VQVAE  # noqa: E402

TINY_PATCH_NUMS = (1, 2, 3, 4)  # 16x16 images with ch_mult (1, 1, 2): 4x downsampling
TINY_CLIP_CFG = dict(embed_dim=32,
                     vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))


@pytest.fixture(scope='session', autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is as fast, and does not collapse when other jobs share the CPU cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_vae():
    torch.manual_seed(0)
    return VQVAE(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, patch_nums=TINY_PATCH_NUMS).eval()


@pytest.fixture
def tiny_var():
    torch.manual_seed(0)
    var = VAR(vocab_size=32, z_channels=8, depth=2, width=64, num_heads=2, num_classes=5, patch_nums=TINY_PATCH_NUMS).eval()
    with torch.no_grad():  # a "pretrained-like" model: gates open, so prompts and inputs matter
        for p in var.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return var


@pytest.fixture
def tiny_clip():
    import open_clip
    from clip_loss import FrozenClip
    torch.manual_seed(0)
    model = open_clip.model.CLIP(**TINY_CLIP_CFG).eval().requires_grad_(False)
    return FrozenClip(model, open_clip.get_tokenizer('ViT-B-32'))


def write_tiny_backbone(folder: str, num_classes: int = 10) -> str:
    """A random tiny backbone folder as train.py/sample.py read it: backbone.json + weights + clip/ (open_clip local-dir)."""
    import json
    import open_clip
    from safetensors.torch import save_file
    from pretrained import save_backbone
    torch.manual_seed(0)
    vae_kwargs = dict(vocab_size=32, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, patch_nums=TINY_PATCH_NUMS)
    var_kwargs = dict(vocab_size=32, z_channels=8, depth=2, width=64, num_heads=2, num_classes=num_classes,
                      patch_nums=TINY_PATCH_NUMS)
    save_backbone(folder, VQVAE(**vae_kwargs), vae_kwargs, VAR(**var_kwargs), var_kwargs, half=False)
    clip_dir = os.path.join(folder, 'clip')
    os.makedirs(clip_dir, exist_ok=True)
    with open(os.path.join(clip_dir, 'open_clip_config.json'), 'w') as f:
        json.dump({'model_cfg': TINY_CLIP_CFG, 'preprocess_cfg': {}}, f)
    save_file(open_clip.model.CLIP(**TINY_CLIP_CFG).state_dict(), os.path.join(clip_dir, 'open_clip_model.safetensors'))
    from shapes import ShapeClassifier
    torch.save(ShapeClassifier().state_dict(), os.path.join(folder, 'shape_classifier.pth'))
    return folder


@pytest.fixture(scope='session')
def tiny_backbone(tmp_path_factory):
    return write_tiny_backbone(str(tmp_path_factory.mktemp('backbone')))
