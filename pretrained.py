"""
The officially released VAR weights: their architectures, where to get them, and strict loading.

    vae, var = load_released(depth=16)   # finds or downloads vae_ch160v4096z32.pth and var_d16.pth
    vae, var = load_backbone('checkpoints/shapes')   # a small backbone folder (backbone.json + weights)

Files are looked up in the cache directory (--cache_dir, else $MVP_CACHE, else ~/.cache/mvp) and downloaded
from the release page when missing. Offline, the download fails at once with one line naming the URL and the
path where the file can be put by hand. Everything loads with strict=True.
"""
import http.client
import json
import os
import urllib.error
import urllib.request
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn

from var import VAR
from vqvae import VAR_PATCH_NUMS, VQVAE

RELEASE_URL = 'https://huggingface.co/FoundationVision/var/resolve/main/'
VAE_FILE = 'vae_ch160v4096z32.pth'
DEPTHS = (16, 20, 24, 30, 36)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # d36 generates 512x512


def default_cache_dir() -> str:
    return os.environ.get('MVP_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'mvp')


def released_vqvae(patch_nums=VAR_PATCH_NUMS) -> VQVAE:
    return VQVAE(vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4), patch_nums=patch_nums)


def released_var(depth: int) -> VAR:
    """The architecture of var_d{depth}.pth: width 64*depth, depth heads, 1000 classes; d36 is 512px with shared AdaLN."""
    if depth not in DEPTHS:
        raise ValueError(f'no released VAR has depth {depth}; the released depths are {DEPTHS}')
    patch_nums = PATCH_NUMS_512 if depth == 36 else VAR_PATCH_NUMS
    return VAR(vocab_size=4096, z_channels=32, depth=depth, num_classes=1000, patch_nums=patch_nums,
               shared_aln=depth == 36, attn_l2_norm=True)


def download(filename: str, cache_dir: str, timeout: float = 10.0) -> str:
    """Path of filename in cache_dir, downloading it from the release page first if it is not there."""
    path = os.path.join(cache_dir, filename)
    if os.path.isfile(path):
        return path
    url = RELEASE_URL + filename
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f'{path}.{os.getpid()}.part'  # per process: DDP ranks may download at the same time
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, 'wb') as out:
            while chunk := response.read(1 << 22):
                out.write(chunk)
            if response.length:  # the server hung up early: read() returns b'' instead of raising
                raise http.client.IncompleteRead(b'', response.length)
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = getattr(e, 'reason', e)
        raise ConnectionError(f'could not download {url} ({reason}); download it elsewhere and put it at {path}') from None
    os.replace(tmp, path)  # atomic: a broken download never leaves a half-written file at `path`
    return path


def read_state_dict(path: str) -> Dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated zip, pickle garbage, not a torch file at all
        raise ValueError(f'{path} is not a readable PyTorch checkpoint ({type(e).__name__}); delete it and download it again') from None
    if not isinstance(state, dict):
        raise ValueError(f'{path} does not hold a state dict')
    return state


def load_into(model: nn.Module, state: Dict[str, torch.Tensor], path: str, what: str):
    """load_state_dict(strict=True), with a one-line error naming the file when it is for another architecture."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        details = []
        if 'class_emb.weight' in state and 'class_emb.weight' in expected:
            blocks = len({k.split('.')[1] for k in state if k.startswith('blocks.')})
            details.append(f'the file holds a depth-{blocks} VAR of width {state["class_emb.weight"].shape[1]}')
        if wrong:
            k = wrong[0]
            details.append(f'{k} is {tuple(state[k].shape)} in the file, {tuple(expected[k].shape)} in the model')
        details.append(f'{len(missing)} missing and {len(unexpected)} unexpected keys')
        raise ValueError(f'{path} does not fit {what}: ' + '; '.join(details))
    model.load_state_dict(state, strict=True)


def load_released(depth: int = 16, cache_dir: Optional[str] = None, device='cpu') -> Tuple[VQVAE, VAR]:
    """The released VQVAE and VAR-d{depth}, weights loaded strict, in eval mode, on `device`."""
    cache_dir = cache_dir or default_cache_dir()
    var = released_var(depth)  # raises for a depth that was never released, before any download
    vae = released_vqvae(var.patch_nums)
    for model, filename in ((vae, VAE_FILE), (var, f'var_d{depth}.pth')):
        path = download(filename, cache_dir)
        load_into(model, read_state_dict(path), path, f'{type(model).__name__} {filename}')
    return vae.to(device).eval(), var.to(device).eval()


def save_backbone(folder: str, vae: VQVAE, vae_kwargs: dict, var: VAR, var_kwargs: dict, half: bool = True):
    """A small backbone as a folder: backbone.json (the constructor arguments) + vqvae.pth + var.pth (fp16 if half)."""
    os.makedirs(folder, exist_ok=True)
    for model, name in ((vae, 'vqvae.pth'), (var, 'var.pth')):
        state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
        torch.save(state, os.path.join(folder, name + '.part'))
        os.replace(os.path.join(folder, name + '.part'), os.path.join(folder, name))
    with open(os.path.join(folder, 'backbone.json'), 'w') as f:
        json.dump({'vqvae': vae_kwargs, 'var': var_kwargs}, f, indent=1)


def load_backbone(backbone: str = 'released', depth: int = 16, cache_dir: Optional[str] = None,
                  device='cpu') -> Tuple[VQVAE, VAR]:
    """'released': the official VQVAE + VAR-d{depth}; otherwise a folder written by save_backbone."""
    if backbone == 'released':
        return load_released(depth, cache_dir, device)
    config_path = os.path.join(backbone, 'backbone.json')
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f'{backbone} is neither "released" nor a backbone folder (no {config_path})')
    with open(config_path) as f:
        config = json.load(f)
    vae, var = VQVAE(**config['vqvae']), VAR(**config['var'])
    for model, name in ((vae, 'vqvae.pth'), (var, 'var.pth')):
        path = os.path.join(backbone, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'missing {path}')
        load_into(model, read_state_dict(path), path, f'the {type(model).__name__} of {config_path}')
    return vae.to(device).eval(), var.to(device).eval()
