"""Tiny models shared by the tests: small enough to run a training step on the CPU in well under a second; and a
Hugging Face cache with nothing but the files a test puts there, the network unreachable."""
import hashlib
import os
import sys

# numpy's OpenBLAS spreads each small FD matrix product over every core, which beside the suite's other workers
# oversubscribes the CPU; one thread, as torch's (one_thread). Set before numpy is first imported (torch imports it).
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from var import VAR  # noqa: E402
from vqvae import VQVAE  # noqa: E402

TINY_PATCH_NUMS = (1, 2, 3, 4)  # 16x16 images with ch_mult (1, 1, 2): 4x downsampling
TINY_CLIP_CFG = dict(embed_dim=32,
                     vision_cfg=dict(image_size=32, layers=2, width=64, head_width=32, patch_size=8),
                     text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))


def pytest_configure(config):
    config.addinivalue_line('markers', 'slow: far longer than the other tests: collected first (below)')


def pytest_collection_modifyitems(items):
    """The slow tests first: pytest -n --dist worksteal then starts one at once on the first worker while the others
    share the rest, instead of a worker starting it last while the others wait."""
    items.sort(key=lambda item: item.get_closest_marker('slow') is None)  # a stable sort: the rest keep their order


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
    """A random tiny backbone folder as train.py, sample.py and world.evaluate read it: backbone.json + weights + clip/
    (open_clip local-dir) + the judge."""
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
    from world.shapes import Judge, save_judge
    save_judge(Judge(), os.path.join(folder, 'judge.pth'))  # random: world.evaluate's figures, not their values
    return folder


@pytest.fixture(scope='session')
def tiny_backbone(tmp_path_factory):
    return write_tiny_backbone(str(tmp_path_factory.mktemp('backbone')))


# Prepended to a script run in a fresh process: counts the connections it tries, so a test can tell "no request at all"
# from "a request refused at once" without timing anything.
COUNT_CONNECTIONS = '''
import socket
connections = []
_connect = socket.socket.connect
def _counting_connect(sock, address):
    connections.append(str(address))
    return _connect(sock, address)
socket.socket.connect = _counting_connect
'''
CLOSED_PORT = 'http://127.0.0.1:9'  # the discard port: nothing listens, a connection is refused at once


def offline_hub_env(hf_home: str, **extra) -> dict:
    """The environment of a process whose Hugging Face cache is hf_home and whose Hub (HF_ENDPOINT) refuses every
    connection: no proxy, no $MVP_CACHE, no offline flag unless `extra` sets one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(('HF_', 'HUGGINGFACE_')) and k != 'MVP_CACHE'
           and k.lower() not in ('http_proxy', 'https_proxy', 'all_proxy')}
    return dict(env, HF_HOME=str(hf_home), HF_ENDPOINT=CLOSED_PORT, no_proxy='*', OMP_NUM_THREADS='1',
                MKL_NUM_THREADS='1', **extra)


def write_hf_cache(hf_home, repo: str, files: dict) -> dict:
    """Lay files ({name: bytes}) out as huggingface_hub caches a download of `repo` at its main branch:
    HF_HOME/hub/models--org--name/{blobs/<sha256>, refs/main, snapshots/<commit>/<name> -> ../../blobs/<sha256>}.
    Returns {name: the snapshot path a lookup must find}."""
    root = os.path.join(str(hf_home), 'hub', 'models--' + repo.replace('/', '--'))
    commit = hashlib.sha1(repo.encode()).hexdigest()
    os.makedirs(os.path.join(root, 'blobs'), exist_ok=True)
    os.makedirs(os.path.join(root, 'refs'), exist_ok=True)
    os.makedirs(os.path.join(root, 'snapshots', commit), exist_ok=True)
    with open(os.path.join(root, 'refs', 'main'), 'w') as f:
        f.write(commit)
    paths = {}
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(root, 'blobs', blob), 'wb') as f:
            f.write(data)
        paths[name] = os.path.join(root, 'snapshots', commit, name)
        os.symlink(os.path.join('..', '..', 'blobs', blob), paths[name])
    return paths
