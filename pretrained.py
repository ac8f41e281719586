"""
The officially released VAR weights (their architectures, where to get them, strict loading), and the files a run
writes: JSON, images and checkpoints, each atomically.

    vae, var = load_released(depth=16)   # finds or downloads vae_ch160v4096z32.pth and var_d16.pth
    vae, var = load_backbone('checkpoints/shapes')   # a small backbone folder (backbone.json + weights)

The files come from the Hugging Face repo FoundationVision/var through huggingface_hub: a file already in the
Hugging Face cache (HF_HOME, as `hf download FoundationVision/var` leaves it) is used as it is, a missing one is
downloaded there (HF_ENDPOINT, HF_HUB_OFFLINE and the token apply as everywhere else). A cache directory
(--cache_dir, else $MVP_CACHE) is a plain folder of the .pth files instead, as the official demo's wget leaves
them; missing files are downloaded into it. Offline, a missing file fails within seconds with one line naming
the repo, the file and where to put it. Everything loads with strict=True.
"""
import fcntl
import json
import math
import os
import shutil
import socket
import tempfile
import time
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache
from PIL import Image

from var import VAR
from vqvae import VAR_PATCH_NUMS, VQVAE

RELEASE_REPO = 'FoundationVision/var'
VAE_FILE = 'vae_ch160v4096z32.pth'
DEPTHS = (16, 20, 24, 30, 36)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)  # d36 generates 512x512
HUB_TIMEOUT = 5.0  # seconds one request to the Hub may take before it counts as unreachable


def default_cache_dir() -> Optional[str]:
    """$MVP_CACHE, a plain folder of the released files; None: the Hugging Face cache."""
    return os.environ.get('MVP_CACHE') or None


def one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def hub_error(repo: str, filename: str) -> Optional[Exception]:
    """None when the Hub serves repo's filename, else why not, within HUB_TIMEOUT seconds: one request without
    retries (hf_hub_download retries an unreachable Hub for about 25 s before it gives up)."""
    try:
        get_hf_file_metadata(hf_hub_url(repo, filename), timeout=HUB_TIMEOUT)
    except Exception as e:  # no network, HF_HUB_OFFLINE, a proxy, a mirror (HF_ENDPOINT) or repo without the file
        return e
    return None


def hub_file(repo: str, filename: str, folder: Optional[str], advice: str) -> str:
    """Local path of repo's filename: in `folder` (a plain folder) if given, else in the Hugging Face cache;
    downloaded there by huggingface_hub when missing. When that fails: one line naming the repo, the file, and
    `advice` (where to put the file by hand)."""
    if folder:
        path = os.path.join(folder, filename)
        if os.path.isfile(path):
            return path
    else:
        cached = try_to_load_from_cache(repo, filename)
        if isinstance(cached, str):
            return cached
    error = hub_error(repo, filename)
    if error is None:
        try:
            return hf_hub_download(repo, filename, local_dir=folder)
        except Exception as e:  # the connection broke off, the disk is full
            error = e
    raise ConnectionError(f'{filename} of the Hugging Face repo {repo} is not in {folder or "the Hugging Face cache"} '
                          f'and could not be downloaded ({one_line(error)}): {advice}')


def released_file(filename: str, cache_dir: Optional[str] = None) -> str:
    """Path of a released file: in cache_dir (a plain folder) if given, else in the Hugging Face cache."""
    url = hf_hub_url(RELEASE_REPO, filename)
    where = f'at {os.path.join(cache_dir, filename)}' if cache_dir else 'in a folder passed as --cache_dir (or $MVP_CACHE)'
    return hub_file(RELEASE_REPO, filename, cache_dir, f'download {url} elsewhere and put it {where}')


def released_vqvae(patch_nums=VAR_PATCH_NUMS) -> VQVAE:
    return VQVAE(vocab_size=4096, z_channels=32, ch=160, ch_mult=(1, 1, 2, 2, 4), patch_nums=patch_nums)


def released_var(depth: int) -> VAR:
    """The architecture of var_d{depth}.pth: width 64*depth, depth heads, 1000 classes; d36 is 512px with shared AdaLN."""
    if depth not in DEPTHS:
        raise ValueError(f'no released VAR has depth {depth}; the released depths are {DEPTHS}')
    patch_nums = PATCH_NUMS_512 if depth == 36 else VAR_PATCH_NUMS
    return VAR(vocab_size=4096, z_channels=32, depth=depth, num_classes=1000, patch_nums=patch_nums,
               shared_aln=depth == 36, attn_l2_norm=True)


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
    if depth not in DEPTHS:  # before any download
        raise ValueError(f'no released VAR has depth {depth}; the released depths are {DEPTHS}')
    filenames = (VAE_FILE, f'var_d{depth}.pth')
    paths = [released_file(filename, cache_dir) for filename in filenames]  # a missing file fails before any model is built
    var = released_var(depth)
    vae = released_vqvae(var.patch_nums)
    for model, filename, path in zip((vae, var), filenames, paths):
        load_into(model, read_state_dict(path), path, f'{type(model).__name__} {filename}')
    return vae.to(device).eval(), var.to(device).eval()


def save_backbone(folder: str, vae: VQVAE, vae_kwargs: dict, var: VAR, var_kwargs: dict, half: bool = True):
    """A small backbone as a folder: backbone.json (the constructor arguments) + vqvae.pth + var.pth (fp16 if half)."""
    os.makedirs(folder, exist_ok=True)
    for model, name in ((vae, 'vqvae.pth'), (var, 'var.pth')):
        state = {k: (v.half() if half and v.is_floating_point() else v) for k, v in model.state_dict().items()}
        atomic_write(os.path.join(folder, name), lambda tmp: torch.save(state, tmp))
    write_json(os.path.join(folder, 'backbone.json'), {'vqvae': vae_kwargs, 'var': var_kwargs})


class WriteError(OSError):
    """A file that could not be written (a full disk, a quota, a file-size limit): one line naming it and the cause."""


def atomic_write(path: str, write: Callable[[str], None], suffix: str = ''):
    """write(tmp) to a temporary name beside path, then rename it to path: a crash or a full disk never leaves a
    half-written file at path, and a failed write leaves no temporary file either (a WriteError naming path and the
    cause). suffix: an ending the writer insists on (np.savez adds .npz)."""
    tmp = path + '.part' + suffix
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a short write as a RuntimeError of its C++ writer
        if os.path.exists(tmp):
            os.remove(tmp)
        raise WriteError(f'cannot write {path}: {write_failure(e, path)}; the file there (if any) is as it was') from None
    except BaseException:  # Ctrl-C mid-write: no partial file either
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_failure(error: BaseException, path: str) -> str:
    """Why a write failed, in words: the system's reason where it gives one, else the writer's first line and the
    space left on that disk."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    try:
        free = f'{shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free / 2 ** 20:.1f} MB free there'
    except OSError:
        free = 'the free space is unknown'
    return f'{str(error).strip().splitlines()[0][:200]} ({free})'


def lock_folder(folder: str):
    """Hold an exclusive lock on FOLDER/.run.lock for as long as the returned file stays open; one line naming the live
    process that holds it otherwise. The kernel drops the lock when its process dies (kill -9, a crash), so a
    folder left by a dead run is taken over as it is."""
    os.makedirs(folder, exist_ok=True)
    handle = open(os.path.join(folder, '.run.lock'), 'a+')
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or 'another process'
        handle.close()
        raise ValueError(f'--out_dir {folder} is in use by a live run ({holder}): wait for it to end, or choose '
                         f'another --out_dir') from None
    except OSError as e:
        handle.close()
        raise ValueError(f'--out_dir {folder}: cannot lock it for this run ({e.strerror})') from None
    handle.seek(0)
    handle.truncate()
    handle.write(f'pid {os.getpid()} on {socket.gethostname()}, started {time.strftime("%Y-%m-%d %H:%M:%S")}\n')
    handle.flush()
    return handle


def probe_write(folder: str, what: str):
    """A real write into folder: permission bits alone mislead root and read-only mounts."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise ValueError(f'{what}: cannot write into {folder} ({e.strerror})') from None


def check_writable(path: str, flag: str, create: bool):
    """Before any heavy work: the folder that `path` goes in exists (or, with create, can be made) and takes a file."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        if not create:
            raise ValueError(f'{flag} {path}: there is no folder {folder}')
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise ValueError(f'{flag} {path}: cannot create the folder {folder} ({e.strerror})') from None
    probe_write(folder, f'{flag} {path}')


def check_creatable(folder: str, flag: str):
    """Before any heavy work, making nothing (a refused run leaves no folder): folder, or else its nearest existing
    ancestor, is a folder that takes a file."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f'{flag} {folder}: cannot create it ({existing} is not a folder)')
    probe_write(existing, f'{flag} {folder}')


def write_json(path: str, obj):
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


def to_uint8(images_B3HW: torch.Tensor) -> np.ndarray:  # [0, 1] -> (B, H, W, 3) uint8
    return (images_B3HW.detach().permute(0, 2, 3, 1).cpu().float().numpy() * 255).round().astype(np.uint8)


def save_grid(images, path: str, nrow: int = 8):
    """images (B, 3, H, W) in [0, 1] -> one PNG grid."""
    B, _, H, W = images.shape
    nrow = min(nrow, B)
    rows = math.ceil(B / nrow)
    grid = Image.new('RGB', (nrow * W + (nrow + 1) * 2, rows * H + (rows + 1) * 2), 'white')
    arr = to_uint8(images)
    for i in range(B):
        grid.paste(Image.fromarray(arr[i]), (2 + (i % nrow) * (W + 2), 2 + (i // nrow) * (H + 2)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda tmp: grid.save(tmp, format='PNG'))


def save_image(image_3HW: torch.Tensor, path: str):
    """One image in [0, 1] as a PNG of its own size, without a grid's border."""
    atomic_write(path, lambda tmp: Image.fromarray(to_uint8(image_3HW[None])[0]).save(tmp, format='PNG'))


def atomic_save(obj, path: str):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint at `path`."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# the CLIP of the semantic loss for real runs: the CLIP most CLIP-guided generation and CLIP-score work uses, and small
# enough (150M) to sit beside VAR-d16 in a fine-tuning step
DEFAULT_CLIP = ('ViT-B-16', 'openai')


def check_clip_weights_reachable(model_name: str, pretrained: str):
    """Fail within seconds, with one line naming the repo, the file and the cache, when open_clip would have to
    download weights from the Hub that cannot be reached (open_clip itself retries for about a minute)."""
    import open_clip
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.errors import RemoteEntryNotFoundError
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        raise ValueError(f'open_clip knows no pretrained tag {pretrained!r} for {model_name}; '
                         f'see open_clip.list_pretrained(), or pass a checkpoint file or folder')
    if not cfg.get('hf_hub'):
        return  # weights from a plain URL: open_clip downloads them with a timeout of its own
    repo, filename = os.path.split(cfg['hf_hub'])  # 'org/name/' or 'org/name/file.bin', as open_clip reads it
    filename = filename or HF_WEIGHTS_NAME
    safe = HF_SAFE_WEIGHTS_NAME if filename == HF_WEIGHTS_NAME else \
        filename[:-4] + '.safetensors' if filename.endswith(('.bin', '.pth')) else None
    names = (safe, filename) if safe else (filename,)  # what open_clip tries, in its order
    if any(isinstance(try_to_load_from_cache(repo, name), str) for name in names):
        return
    for name in names:
        error = hub_error(repo, name)
        if error is None:
            return
        if not isinstance(error, RemoteEntryNotFoundError):  # on "no such file" (the Hub answered) open_clip
            break  # tries the next name; anything else: the Hub cannot be reached
    raise ConnectionError(f'CLIP weights {model_name}/{pretrained} ({names[0]} of the Hugging Face repo {repo}) are '
                          f'not in the Hugging Face cache {constants.HF_HUB_CACHE} and could not be downloaded '
                          f'({one_line(error)}): fetch them there with `hf download {repo} {names[0]}`, or pass a '
                          f'checkpoint file or folder as the CLIP pretrained path')


CLIP_VOCAB = 'bpe_simple_vocab.txt.gz'  # a CLIP folder's own BPE merges, in open_clip's format (the shapes world's CLIP)


def load_clip(model_name: str = DEFAULT_CLIP[0], pretrained: Optional[str] = DEFAULT_CLIP[1], device='cpu'):
    """A frozen open_clip model in eval mode and its tokenizer.

    model_name: an open_clip model name, or a folder in open_clip's local-dir layout
    (open_clip_config.json + open_clip_model.safetensors; + bpe_simple_vocab.txt.gz, open_clip's vocabulary file,
    where the folder's CLIP has a vocabulary of its own, as the shapes world's does).
    pretrained: an open_clip tag ('openai', 'laion2b_s34b_b88k', ...), a checkpoint file for model_name,
    a local-dir folder (then model_name is ignored), or None / 'none' (random weights).
    """
    import open_clip
    pretrained = None if pretrained == 'none' else pretrained
    folder = model_name if os.path.isdir(model_name) else pretrained if pretrained and os.path.isdir(pretrained) else None
    quick_gelu = False
    if folder:
        if not os.path.isfile(os.path.join(folder, 'open_clip_config.json')):
            raise FileNotFoundError(f'{folder} has no open_clip_config.json: not an open_clip model folder')
        if not any(f.endswith(('.safetensors', '.bin', '.pth')) for f in os.listdir(folder)):  # open_clip would
            raise FileNotFoundError(f'{folder} has no CLIP weights (*.safetensors, *.bin or *.pth)')  # go random
        name, pretrained = 'local-dir:' + os.path.abspath(folder), None
    else:
        name = model_name
        if pretrained and not os.path.isfile(pretrained):
            check_clip_weights_reachable(model_name, pretrained)
            # OpenAI's weights were trained with QuickGELU, which the plain configs (ViT-B-16, ...) lack
            quick_gelu = bool(open_clip.get_pretrained_cfg(model_name, pretrained).get('quick_gelu'))
    model = open_clip.create_model(name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu)
    vocab = os.path.join(folder, CLIP_VOCAB) if folder else ''
    tokenizer = open_clip.get_tokenizer(name, **({'bpe_path': vocab} if os.path.isfile(vocab) else {}))
    model.eval().requires_grad_(False)
    return model, tokenizer


RANDOM = 'released-random'  # the released architecture with random weights: smoke tests and benchmarks, no download


def backbone_spec(backbone: str = 'released', depth: int = 16) -> Tuple[int, int]:
    """(image size, number of classes) of a backbone, without building or loading it."""
    if backbone in ('released', RANDOM):
        return (512 if depth == 36 else 256), 1000
    config_path = os.path.join(backbone, 'backbone.json')
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f'{backbone} is neither "released" nor a backbone folder (no {config_path})')
    with open(config_path) as f:
        config = json.load(f)
    vqvae = config['vqvae']
    return vqvae['patch_nums'][-1] * 2 ** (len(vqvae['ch_mult']) - 1), config['var']['num_classes']


def load_backbone(backbone: str = 'released', depth: int = 16, cache_dir: Optional[str] = None,
                  device='cpu') -> Tuple[VQVAE, VAR]:
    """'released': the official VQVAE + VAR-d{depth}; 'released-random': their architectures with random weights (a
    run at the released sizes without a download: it runs, it learns nothing worth sampling); otherwise a folder
    written by save_backbone."""
    if backbone == 'released':
        return load_released(depth, cache_dir, device)
    if backbone == RANDOM:
        var = released_var(depth)
        return released_vqvae(var.patch_nums).to(device).eval(), var.to(device).eval()
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
