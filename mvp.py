"""
MVP, Multi-scale Visual Prompt tuning, on a frozen VAR. The VAR, its VQVAE and (for the semantic loss or
text-to-image) a CLIP stay frozen; what trains is the prompt frame_prompt.py lays on each scale's outer frame (or, for
the baselines, a prefilled prompt (Table 4), LoRA or the whole VAR (Table 3)) and, text-to-image, the projection of
a caption's CLIP features that replaces the class embedding. One training step, as train.py runs it:

    model = MVP(vae, var, parts, clip, semantic)
    idx = model.tokenise(images)                               # the frozen VQVAE's token maps R_1..R_K
    logits, losses = model(idx, labels, sentences, captions)   # teacher-forced, prompted: L_CE, L_sen, L_cap
    loss = sum(model.objective(losses).values())               # Eq. 9

and the rest of a run: build_run (a config of train.py's flags -> the modules), generate_images, save_prompt and
load_run (a ckpt.pt, a prompt folder or a Hugging Face repo id).
"""
import json
import math
import os
import re
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from huggingface_hub.utils import validate_repo_id
from safetensors.torch import load_file, save_file

from baselines import PrefilledPrompt, attach_lora, make_lora
from clip_loss import FrozenClip, SemanticLoss, rollout_token_maps
from device import cast_once
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


def conditions(var, text_cond_BD, labels, drop: bool, cond_drop: float):
    """The condition (B, C): VAR's class embedding, or the projected caption in text-to-image mode. With drop, a
    random cond_drop fraction becomes the null class, so classifier-free guidance keeps working."""
    cond = var.class_emb(labels) if text_cond_BD is None else text_cond_BD
    return var.drop_condition(cond, cond_drop) if drop else cond


class MVP(nn.Module):
    """A frozen VAR and what MVP trains on it, as one module: forward takes a batch's token maps and returns the
    teacher-forced logits and the losses of Eq. 9; objective() weighs them into the terms a step minimises.

    parts: the TunedParts (or DDP around them); semantic: the SemanticLoss (clip_loss.py), or None for CE alone;
    first_scale_fixed: nothing trainable acts on the first scale, whose map then enters the teacher-forced I_sen and
    I_cap as the image's own (clip_loss.py); dtype: the forward's autocast (fp32: none); compile: the VAR through
    torch.compile."""

    def __init__(self, vae, var, parts: nn.Module, clip: Optional[FrozenClip] = None,
                 semantic: Optional[SemanticLoss] = None, cond_drop: float = 0.1, first_scale_fixed: bool = False,
                 dtype: torch.dtype = torch.float32, compile: bool = False):
        super().__init__()
        self.vae, self.var, self.parts, self.clip, self.semantic = vae, var, parts, clip, semantic
        self.cond_drop, self.first_scale_fixed, self.dtype = cond_drop, first_scale_fixed, dtype
        self.t2i = getattr(parts, 'module', parts).text_cond is not None  # DDP keeps the parts as .module
        self.var_forward = torch.compile(var) if compile else var

    @torch.no_grad()
    def tokenise(self, images_B3HW: torch.Tensor) -> List[torch.Tensor]:
        """Step 1: the frozen VQVAE's token maps R_1..R_K of the images (K tensors (B, pn*pn)), the targets."""
        return self.vae.img_to_idx(images_B3HW)

    def forward(self, idx: List[torch.Tensor], labels_B: torch.Tensor, sentences: Optional[List[str]] = None,
                captions: Optional[List[str]] = None):
        """Steps 2-3 -> (logits (B, L, V), losses): 'ce' and, with the semantic loss, 'sen' and 'cap', unweighted.
        sentences, captions: what I_sen and I_cap are judged against; in text-to-image the captions condition."""
        x_BLCv = self.vae.quantize.teacher_forcing_input(idx)  # teacher forcing: the inputs of scales 2..K
        text_feats_BD = self.clip.encode_text(captions) if self.t2i else None
        with torch.autocast(x_BLCv.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            prompt_1LC, prefix_1PC, text_cond_BC = self.parts(text_feats_BD)
            cond_BC = conditions(self.var, text_cond_BC, labels_B, drop=True, cond_drop=self.cond_drop)
            logits_BLV = self.var_forward(cond_BC, x_BLCv, prompt_1LC=prompt_1LC, prefix_1PC=prefix_1PC)
            losses = {'ce': F.cross_entropy(logits_BLV.view(-1, self.var.vocab_size), torch.cat(idx, dim=1).view(-1))}
            # Eq. 8's two levels (clip_loss.py), on images decoded from these logits or from the VAR's own free-running
            # maps. Like CE, the teacher-forced levels also judge the dropped samples: their coarser scales are the
            # image's own, so their target is still the image's sentence and caption.
            if self.semantic is not None:
                maps = self.free_running_maps(text_cond_BC, labels_B, prompt_1LC, prefix_1PC)
                first_map = idx[0] if self.first_scale_fixed and maps is None else None
                sem = self.semantic(logits_BLV, sentences, captions, first_map, maps)
                losses.update(sen=sem['sen'], cap=sem['cap'])
        return logits_BLV, losses

    def free_running_maps(self, text_cond_BC, labels_B, prompt_1LC, prefix_1PC):
        """With --tokens rollout, the maps the prompted VAR draws itself for the batch's conditions (none dropped: each
        sample is judged against its own texts); else None, and the semantic loss reads the teacher-forced logits."""
        if self.semantic.tokens != 'rollout':
            return None
        cond_BC = conditions(self.var, text_cond_BC, labels_B, drop=False, cond_drop=0.0)
        return rollout_token_maps(self.var, self.vae.quantize, cond_BC, self.semantic.temperature, prompt_1LC,
                                  prefix_1PC)

    def objective(self, losses: dict) -> dict:
        """The terms of L = L_CE + lambda_sen * L_sen + lambda_cap * L_cap (Eq. 9), whose sum a step minimises; a
        level whose lambda is 0 is no term (update.py's --balance combines the terms' gradients)."""
        terms = {'ce': losses['ce']}
        if self.semantic is not None:
            for level, weight in (('sen', self.semantic.lambda_sen), ('cap', self.semantic.lambda_cap)):
                if weight > 0:
                    terms[level] = weight * losses[level]
        return terms


# -----------------------------------------------------------------------------
# build, sample, save and load a run


# Eq. 9's lambdas (sentence, caption) and the differentiable path (clip_loss.TOKENS) unless given, per task: what the
# shapes world's studies favour on its judge (docs/semantic_loss.md). The paper gives neither; "Eq. 9 as written" here
# means both lambdas 1 on soft tokens. In text-to-image that lost to CE alone, and the free-running rollout at 0.1 beat
# CE alone.
DEFAULT_LAMBDAS = {'class-to-image': (1.0, 1.0), 'text-to-image': (0.1, 0.1)}
DEFAULT_TOKENS = {'class-to-image': 'soft', 'text-to-image': 'rollout'}


def first_scale_fixed(config: dict) -> bool:
    """MVP without a first-scale prompt, class-to-image: nothing trainable acts on the first scale's prediction, so
    I_sen and I_cap take the image's own first map (clip_loss.py)."""
    return config['prompt'] == 'mvp' and config['first_scale'] == 'off' and not config['t2i']


def build_run(config: dict, device, need_clip: bool, backbone: Optional[tuple] = None):
    """Backbone (frozen), trainable parts and, when needed, CLIP, all from a run config (a dict of train.py's flags).
    backbone: a (vae, var) already built (tools/bench.py's random ones) instead of config['backbone']'s."""
    vae, var = backbone or load_backbone(config['backbone'], config['depth'], config.get('cache_dir'), device)
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


def check_sampling(cfg: float, top_k: int, top_p: float):
    """Sampling settings that no sampler can use: one line naming the flag (sample.py's, world.evaluate's)."""
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
    dtype: the transformer blocks and the VQVAE decoder under autocast to it (the logits and sampling stay fp32, as
    var.py casts them); fp32 is the official code's function, bit for bit."""
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
        python -c "import mvp; mvp.export_prompt('runs/mvp/ckpt.pt', 'runs/mvp_prompt')"
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
                                        f'{PROMPT_FILE} (train.py writes them beside ckpt.pt, mvp.export_prompt makes '
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
