"""
The MVP model: a frozen, pretrained VAR (with its VQVAE and, for the semantic loss or text-to-image, a frozen CLIP)
and what MVP trains on it; how a run's trained tensors are built, saved, shared, loaded and sampled from; and the
loss of one training step (Eq. 9). train.py trains it; sample.py, evaluate.py and bench.py use it.

    vae, var, clip, parts = build_run(config, device, need_clip=True)    # config: train.py's flags as a dict
    config, vae, var, clip, parts = load_run('runs/mvp')                  # a ckpt.pt, a prompt folder or a repo id
    images = generate_images(vae, var, parts, clip, labels=torch.tensor([0, 1]))
"""
import json
import math
import os
import re
from contextlib import contextmanager
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub.utils import validate_repo_id
from PIL import Image
from safetensors.torch import load_file, save_file

from baselines import PrefilledPrompt, attach_lora, make_lora
from clip_loss import FrozenClip, SemanticLoss
from frame_prompt import FramePrompt
from pretrained import DEFAULT_CLIP, atomic_write, hub_file, load_backbone, load_clip, write_json
from text_condition import TextCondition

# the settings that decide what a checkpoint's trained tensors mean: a resumed or sampled run must match them
ARCHITECTURE_KEYS = ('backbone', 'depth', 'prompt', 'tau', 'placement', 'placement_seed', 'first_scale', 't2i')
# a prompt folder: the trained tensors alone, and what they are (the run's flags less the training machine's paths)
PROMPT_FILE, CONFIG_FILE = 'prompt.safetensors', 'config.json'
LOCAL_KEYS = ('cache_dir', 'out_dir', 'resume')


# -----------------------------------------------------------------------------
# the model: frozen backbone + what MVP trains


class TunedParts(nn.Module):
    """Everything that trains: the prompt (MVP or prefilled), or for the baselines of Table 3 the LoRA pairs
    (attached to the VAR's attention by build_run) or the whole VAR transformer; in text-to-image mode also the
    text projection. DDP wraps this module, and a checkpoint holds its state dict: only what was trained."""

    def __init__(self, prompt: nn.Module = None, text_cond: nn.Module = None, lora: nn.ModuleList = None,
                 var: nn.Module = None):
        super().__init__()
        self.prompt, self.text_cond, self.lora, self.var = prompt, text_cond, lora, var

    def forward(self, text_feats_BD=None):
        """-> (prompt map F (1, L, C) or None, prefix (1, P, C) or None, text condition (B, C) or None).
        LoRA and the fully tuned VAR act inside the VAR itself: no prompt."""
        prompt_out = self.prompt() if self.prompt is not None else None
        is_prefix = isinstance(self.prompt, PrefilledPrompt)
        cond = self.text_cond(text_feats_BD) if self.text_cond is not None else None
        return (None if is_prefix else prompt_out), (prompt_out if is_prefix else None), cond


def build_run(config: dict, device, need_clip: bool):
    """Backbone (frozen), trainable parts and, when needed, CLIP, all from a run config (a dict of train.py's flags)."""
    vae, var = load_backbone(config['backbone'], config['depth'], config.get('cache_dir'), device)
    prompt = lora = tuned_var = None
    if config['prompt'] in ('mvp', 'prefilled'):
        frame = FramePrompt(var.patch_nums, var.width, config['tau'], config['placement'], config['first_scale'] == 'on',
                            config['placement_seed'])
        prompt = frame if config['prompt'] == 'mvp' else PrefilledPrompt(len(frame.index), var.width)  # same token budget
    clip = None
    if need_clip or config['t2i']:
        clip_model = config['clip_model']
        if clip_model is None:
            local = os.path.join(config['backbone'], 'clip')
            clip_model = local if os.path.isdir(local) else DEFAULT_CLIP[0]
        clip = FrozenClip(*load_clip(clip_model, config['clip_pretrained'], device)).to(device)
    text_cond = TextCondition(clip.encode_text(['']).shape[1], var.width) if config['t2i'] else None
    for frozen in (vae, var, clip):
        if frozen is not None:
            frozen.requires_grad_(False).eval()
    if config['prompt'] == 'lora':  # after loading the backbone: the wrapped layers' state-dict keys change (baselines.py)
        lora = make_lora(var, config.get('lora_rank', 8))
        attach_lora(var, lora)
    elif config['prompt'] == 'full':  # the VAR transformer trains (kept in eval mode, as in prompt tuning)
        tuned_var = var.requires_grad_(True)
    return vae, var, clip, TunedParts(prompt, text_cond, lora, tuned_var).to(device)


@torch.no_grad()
def init_text_projection(text_cond: TextCondition, clip: FrozenClip, var, dataset, n_captions: int = 2048):
    """Start the text projection at the least-squares map from CLIP text features to VAR's class embeddings, fitted
    on "a photo of a {class}" for every class and on up to n_captions training captions, each to its class."""
    sentences = [f'a photo of a {name}' for name in dataset.class_names]
    picks = range(0, len(dataset), max(1, len(dataset) // n_captions))[:n_captions]  # spread over the dataset
    captions, caption_labels = zip(*(dataset.caption_and_label(i) for i in picks))
    texts = sentences + list(captions)
    labels = torch.cat((torch.arange(len(sentences)), torch.tensor(caption_labels))).to(var.class_emb.weight.device)
    feats = torch.cat([clip.encode_text(texts[i:i + 512]) for i in range(0, len(texts), 512)])  # (N, D)
    text_cond.init_least_squares(feats, var.class_emb(labels))


DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}  # --dtype's values, less 'auto'


def auto_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (fp16 where bf16 is missing); on the CPU bf16 where oneDNN has bf16 matrix kernels (AVX512-BF16 or
    AMX), else fp32, since without them bf16 is emulated and slower than fp32 (docs/benchmarks.md)."""
    if device.type == 'cuda':
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    fast_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if fast_bf16 else torch.float32


def parse_device(name: str) -> torch.device:
    """Every script's --device: auto (CUDA where there is one, else the CPU), cpu, cuda, cuda:1, ...; a one-line
    ValueError for a name torch does not know, or for CUDA on a machine without it."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f'--device {name} is not a device (auto, cpu, cuda, cuda:1, ...)') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {name} but CUDA is not available')
    return device


def set_conv_layout(vae, dtype: torch.dtype):
    """The VQVAE's convolution weights in channels_last (NHWC) memory for bf16/fp16 sampling, where oneDNN's and
    cuDNN's fast convolution kernels want it (bench.py sampling measures the gain), and in the default layout for
    fp32, whose results match the official code bit for bit. The values stay the same."""
    vae.to(memory_format=torch.channels_last if dtype != torch.float32 else torch.contiguous_format)


@contextmanager
def cast_once(*modules: nn.Module):
    """Inside one autocast region, each fp32 weight is cast to bf16/fp16 once instead of at every use: autocast caches
    the cast only for leaf tensors that require grad, so the frozen weights are marked so for the duration (under
    no_grad nothing records a graph). Without it, sampling re-casts every linear layer's weight at each scale, a large
    share of its time (bench.py sampling). The values computed are the same."""
    frozen = [p for m in modules for p in m.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


def conditions(var, text_cond_BD, labels, drop: bool, cond_drop: float):
    """The condition (B, C): VAR's class embedding, or the projected caption in text-to-image mode. With drop, a
    random cond_drop fraction becomes the null class, so classifier-free guidance keeps working."""
    cond = var.class_emb(labels) if text_cond_BD is None else text_cond_BD
    return var.drop_condition(cond, cond_drop) if drop else cond


def check_sampling(cfg: float, top_k: int, top_p: float):
    """Sampling settings that no sampler can use: one line naming the flag (sample.py's, evaluate.py's)."""
    if not (math.isfinite(cfg) and cfg >= 0):
        raise ValueError(f'--cfg must be a finite number >= 0, got {cfg}')
    if top_k < 0:
        raise ValueError(f'--top_k must be at least 0 (0: no top-k truncation), got {top_k}')
    if not 0 < top_p <= 1:
        raise ValueError(f'--top_p must lie in (0, 1] (1: no nucleus truncation), got {top_p}')


@torch.no_grad()
def generate_images(vae, var, parts, clip, labels=None, texts=None, cfg_scale=1.5, top_k=900, top_p=0.96, seed=0,
                    use_prompt=True, dtype=torch.float32):
    """Images in [0, 1] (B, 3, H, W) for class labels or (text-to-image) texts; use_prompt=False: without the prompt
    (the plain VAR for MVP and prefilled runs; LoRA and full fine-tuning change the VAR itself, so not for those).
    dtype: the transformer blocks and the VQVAE decoder under autocast to it (embeddings, head and sampling stay fp32,
    as var.py keeps them); fp32 is the official code's function, bit for bit."""
    prompt_map = prefix = text_cond = None
    if parts is not None:  # None: the plain VAR, nothing trained
        prompt_map, prefix, text_cond = parts(clip.encode_text(texts) if texts is not None else None)
    cond = text_cond if texts is not None else var.class_emb(labels)
    if not use_prompt:
        prompt_map = prefix = None
    with torch.autocast(cond.device.type, dtype=dtype, enabled=dtype != torch.float32), cast_once(var, vae):
        idx = var.generate(vae, cond, cfg=cfg_scale, top_k=min(top_k, var.vocab_size), top_p=top_p, seed=seed,
                           prompt_1LC=prompt_map, prefix_1PC=prefix)
        images = vae.idx_to_img(idx)
    return images.float().add(1).mul(0.5).clamp(0, 1)


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


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f'no checkpoint at {path}')
    try:  # tensors and plain Python values only: unpickling anything else can run code from the file
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        unsafe = re.search(r'Unsupported global: GLOBAL (\S+)', str(e))
        if unsafe:
            raise ValueError(f'{path} holds a pickled {unsafe.group(1)}, which is not a tensor: refused, as loading '
                             f'it could run code') from None
        raise ValueError(f'{path} is not a readable checkpoint ({type(e).__name__})') from None
    if not isinstance(ckpt, dict) or 'config' not in ckpt or 'parts' not in ckpt:
        raise ValueError(f'{path} is not an MVP training checkpoint')
    return ckpt


def write_config(config: dict, path: str):
    """A run's config.json, atomically, without the training machine's paths (it is shared with the prompt)."""
    write_json(path, {k: v for k, v in config.items() if k not in LOCAL_KEYS})


def save_prompt(folder: str, config: dict, state: dict):
    """What a run trained as FOLDER/prompt.safetensors (tensors only: anyone can load it without pickle) and what
    the tensors are as FOLDER/config.json, each written atomically."""
    os.makedirs(folder, exist_ok=True)
    write_config(config, os.path.join(folder, CONFIG_FILE))
    path = os.path.join(folder, PROMPT_FILE)
    # clone: safetensors refuses tensors that share memory (a state dict may hold views of one another)
    tensors = {k: v.detach().cpu().clone() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def export_prompt(ckpt_path: str, folder: str):
    """A training checkpoint's prompt folder, e.g. for a checkpoint written before runs exported their own:
        python -c "import model; model.export_prompt('runs/mvp/ckpt.pt', 'runs/mvp_prompt')"
    """
    ckpt = load_checkpoint(ckpt_path)
    save_prompt(folder, ckpt['config'], ckpt['parts'])


def is_repo_id(name: str) -> bool:  # 'user/repo': a Hugging Face repo, when no such local path exists
    try:
        validate_repo_id(name)
    except ValueError:
        return False
    return name.count('/') == 1 and not name.endswith(('.pt', '.pth'))


def read_run(path: str) -> Tuple[dict, dict, str]:
    """(config, trained tensors, the file holding them) of a training checkpoint, a prompt folder, or a Hugging Face
    repo id holding a prompt folder's two files (looked up in, or downloaded to, the Hugging Face cache)."""
    if os.path.isfile(path):
        ckpt = load_checkpoint(path)
        return ckpt['config'], ckpt['parts'], path
    if os.path.isdir(path):
        config_path, tensors_path = os.path.join(path, CONFIG_FILE), os.path.join(path, PROMPT_FILE)
        for file in (config_path, tensors_path):
            if not os.path.isfile(file):
                raise FileNotFoundError(f'{path} has no {os.path.basename(file)}: a prompt folder holds {CONFIG_FILE} and '
                                        f'{PROMPT_FILE} (train.py writes them beside ckpt.pt, model.export_prompt makes '
                                        f'them from one)')
    elif is_repo_id(path):
        advice = (f'if {path} is meant as a local path, it does not exist; else download the repo\'s {CONFIG_FILE} and '
                  f'{PROMPT_FILE} elsewhere into a folder and pass the folder')
        config_path, tensors_path = (hub_file(path, name, None, advice) for name in (CONFIG_FILE, PROMPT_FILE))
    else:
        raise FileNotFoundError(f'no checkpoint, prompt folder or Hugging Face repo at {path}')
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f'{config_path} is not a readable JSON file ({type(e).__name__})') from None
    missing = [k for k in ARCHITECTURE_KEYS + ('clip_model', 'clip_pretrained') if k not in config]
    if missing:
        raise ValueError(f'{config_path} does not say {", ".join(missing)}: not the config of an MVP prompt')
    try:
        state = load_file(tensors_path)
    except Exception as e:
        raise ValueError(f'{tensors_path} is not a readable safetensors file ({type(e).__name__})') from None
    return config, state, tensors_path


def load_trained(parts: TunedParts, state: dict, source: str, config: dict):
    """parts.load_state_dict(strict=True); tensors trained for another backbone or other settings are one line
    naming the file and the setting."""
    kinds = ('a class-to-image run', 'a text-to-image run (--t2i)')
    text = any(k.startswith('text_cond.') for k in state)
    if text != bool(config['t2i']):
        raise ValueError(f'{source} holds the tensors of {kinds[text]}, not of {kinds[bool(config["t2i"])]}')
    expected = parts.state_dict()
    backbone = f'--backbone {config["backbone"]} --depth {config["depth"]}'
    if set(state) != set(expected):
        other = sorted(set(state) ^ set(expected))
        raise ValueError(f'{source} does not fit --prompt {config["prompt"]} on {backbone} ({len(other)} tensors differ, '
                         f'e.g. {other[0]}): it was trained with another --prompt or backbone')
    for k, v in expected.items():
        file_shape = tuple(state[k].shape)
        if file_shape == tuple(v.shape):
            continue
        if k.startswith('prompt.') and len(file_shape) != v.dim():  # MVP's (N, C) tokens, the prefilled (1, P, C)
            setting = f'--prompt than --prompt {config["prompt"]}'
        elif k.startswith('prompt.') and file_shape[-1] == v.shape[-1]:  # the number of prompt tokens
            setting = f'--tau, --placement or --first_scale than --tau {config["tau"]} --placement {config["placement"]} ' \
                      f'--first_scale {config["first_scale"]}'
        elif k.startswith('lora.'):
            setting = f'--lora_rank or backbone than --lora_rank {config.get("lora_rank")} {backbone}'
        elif k.startswith('text_cond.'):
            setting = f'backbone or CLIP than {backbone} --clip_model {config["clip_model"]}'
        else:
            setting = f'backbone (of another width) than {backbone}'
        raise ValueError(f'{source} does not fit the model of its settings: {k} is {file_shape} in the file, '
                         f'{tuple(v.shape)} in the model; it was trained with another {setting}')
    parts.load_state_dict(state, strict=True)


def check_same_architecture(saved: dict, wanted: dict, path: str):
    text_keys = ('clip_model', 'clip_pretrained') if wanted.get('t2i') else ()  # the text projection reads this CLIP
    lora_keys = ('lora_rank',) if wanted.get('prompt') == 'lora' else ()
    for key in ARCHITECTURE_KEYS + text_keys + lora_keys:
        if saved.get(key) != wanted.get(key):
            raise ValueError(f'{path} was trained with --{key} {saved.get(key)}, not {wanted.get(key)}: '
                             f'start a new --out_dir or use the same settings')


def load_run(path: str, device='cpu', need_clip: bool = False, cache_dir: Optional[str] = None):
    """Rebuild a trained run from a training checkpoint, a prompt folder or a Hugging Face repo id:
    (config, vae, var, clip or None, trained parts). cache_dir: where the released weights are (default: the
    run's own --cache_dir, else $MVP_CACHE or the Hugging Face cache)."""
    config, state, source = read_run(path)
    vae, var, clip, parts = build_run({**config, 'cache_dir': cache_dir or config.get('cache_dir')}, device, need_clip)
    load_trained(parts, state, source, config)
    return config, vae, var, clip, parts.eval()



# -----------------------------------------------------------------------------
# one training step (train.py's loop and bench.py's training benchmark run these)


@torch.no_grad()
def teacher_forcing(vae, images_B3HW: torch.Tensor):
    """Step 1: the frozen VQVAE's token maps R_1..R_K (the targets, K tensors (B, pn*pn)) and the transformer's input
    for scales 2..K (B, L - first_l, Cvae)."""
    idx = vae.img_to_idx(images_B3HW)
    return idx, vae.quantize.teacher_forcing_input(idx)


def mvp_loss(var, model, semantic: Optional[SemanticLoss], idx, x_BLCv, labels, texts, cond_drop: float,
             first_scale_fixed: bool, autocast, forward_var=None):
    """Steps 2-3: the prompted VAR's teacher-forced logits and the terms of L = CE + L_semantic (Eq. 9) ->
    (terms, losses): terms {'ce', and 'sen' = lambda_sen * L_sen, 'cap' = lambda_cap * L_cap for the levels that are
    on}, whose sum is L; losses {'ce', 'sen', 'cap'} unweighted, for the log.

    model: the TunedParts (or DDP around them); texts: (sentences, captions, caption features for text-to-image or
    None); first_scale_fixed: nothing trainable acts on the first scale, whose map then enters I_sen and I_cap as the
    image's own (clip_loss.py); forward_var: the VAR to call (torch.compile'd, say), by default var."""
    sentences, captions, text_feats_BD = texts
    with autocast:
        prompt_map, prefix, text_cond = model(text_feats_BD)
        cond = conditions(var, text_cond, labels, drop=True, cond_drop=cond_drop)
        logits = (forward_var or var)(cond, x_BLCv, prompt_1LC=prompt_map, prefix_1PC=prefix)  # (B, L, V)
        ce = F.cross_entropy(logits.view(-1, var.vocab_size), torch.cat(idx, dim=1).view(-1))
        terms, losses = {'ce': ce}, {'ce': ce}
        if semantic is None:
            return terms, losses
        sem = semantic(logits, sentences, captions, idx[0] if first_scale_fixed else None)
        losses.update(sen=sem['sen'], cap=sem['cap'])
        for level, weight in (('sen', semantic.lambda_sen), ('cap', semantic.lambda_cap)):
            if weight > 0:
                terms[level] = weight * sem[level]  # Eq. 8
        return terms, losses


# How the terms' gradients make one update (--balance): 'sum' is Eq. 9 as written, one clip on the total; 'clip_each'
# clips each term's gradient on its own; 'normalize' rescales each semantic level's gradient to `ratio` times CE's norm,
# so the CLIP losses steer the direction without drowning CE (their raw gradients dwarf CE's: docs/balance.md).
BALANCES = ('sum', 'clip_each', 'normalize')


def norm_of(grads) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def term_gradients(terms: dict, params, scale=1.0, keep_graph: bool = False, norms_only: bool = False) -> dict:
    """{term: its gradient at params (a list like params), or with norms_only its norm alone}, each term through the
    one shared graph (kept after the last with keep_graph, for a backward of the sum). scale: the grad scaler's
    factor (fp16), divided out again."""
    out, names = {}, list(terms)
    for i, name in enumerate(names):
        keep = keep_graph or i < len(names) - 1
        found = torch.autograd.grad(terms[name] * scale, params, retain_graph=keep, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g / scale for p, g in zip(params, found)]
        out[name] = norm_of(grads) if norms_only else grads  # norms only: no copy of a large model's gradient kept
    return out


def combine(grads: dict, norms: dict, balance: str, grad_clip: float, ratio: float):
    """One update direction from the terms' gradients and their norms (BALANCES) -> (gradient list, whether a clip
    bound)."""
    if balance == 'clip_each':
        factors = {name: torch.clamp(grad_clip / (n + 1e-6), max=1.0) for name, n in norms.items()}
        bound = any(bool(n > grad_clip) for n in norms.values())
    elif balance == 'normalize':
        factors = {name: (1.0 if name == 'ce' else ratio * norms['ce'] / (n + 1e-12)) for name, n in norms.items()}
        bound = False
    else:
        factors, bound = {name: 1.0 for name in grads}, False
    total = [sum(factors[name] * grads[name][i] for name in grads) for i in range(len(next(iter(grads.values()))))]
    return total, bound


def warmup_cosine_lr(step: int, total: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to min_ratio * lr at step `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def optimizer_step(terms: dict, optimizer, scaler, params, grad_clip: float, balance: str = 'sum', ratio: float = 0.1,
                   record: bool = False, reduce=None):
    """Backward (through the grad scaler for fp16), balance, clip, step -> (the update's gradient norm before the
    global clip, record).
    record: {'grad_<term>': each term's gradient norm at the trainable parameters, 'clipped': whether a clip bound},
    taken from each term's own backward (the logged steps only, in the 'sum' balance: it costs a backward per term).
    reduce: averages a gradient list over DDP's processes, where the gradients were taken term by term."""
    optimizer.zero_grad(set_to_none=True)
    # the scaler's factor as a tensor: scale() also sets the scaler up, which unscale_ needs (fp16)
    scale = scaler.scale(torch.ones((), device=params[0].device)) if scaler.is_enabled() else 1.0
    if balance == 'sum':
        norms = term_gradients(terms, params, scale, keep_graph=True, norms_only=True) if record else {}
        scaler.scale(sum(terms.values())).backward()  # Eq. 9
        bound = False
    else:
        grads = term_gradients(terms, params, scale)
        if reduce is not None:
            grads = {name: reduce(g) for name, g in grads.items()}
        norms = {name: norm_of(g) for name, g in grads.items()}
        total, bound = combine(grads, norms, balance, grad_clip, ratio)
        for p, g in zip(params, total):
            p.grad = (g * scale).to(p.dtype)  # scaled again: unscale_ below checks it for inf / NaN as it does a backward's
    scaler.unscale_(optimizer)
    clip_at = float('inf') if balance == 'clip_each' else grad_clip
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_at)
    scaler.step(optimizer)
    scaler.update()
    if not record:
        return grad_norm, {}
    row = {f'grad_{name}': n.item() for name, n in norms.items()}
    row['clipped'] = bound or (balance != 'clip_each' and grad_norm.item() > grad_clip)
    return grad_norm, row
