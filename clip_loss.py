"""
MVP's multi-level semantic refinement (MVP paper, Sec. 3.3, Eq. 7-9).

The teacher-forced logits say, for every scale, which codebook entries the model predicts. Taking
the softmax over the codebook times the codebook gives a differentiable ("soft") token map per scale.
Accumulating those maps exactly as the VQVAE does (bicubic up to the last scale, then phi) and
decoding with the frozen VQVAE decoder gives two images (Eq. 7):
    I_sen = Decoder(sum_{t <= kappa} Up(R_t)),  kappa = floor(beta * K)   (the early, coarse image)
    I_cap = Decoder(sum_{t <= K}     Up(R_t))                           (the full image)
The first scale is the exception when nothing trainable acts on it (class-to-image, where Table 6 turns its prompt
off): its teacher-forced prediction then comes from the class alone, so a soft first map paints every image of a
class with the class's average colours, whatever the caption says, and no gradient through it reaches a prompt.
There the image's own first-scale map is used, as the transformer's input already does in teacher forcing; the
scales the prompts act on stay predicted. The paper does not say how I_sen and I_cap are made differentiable;
this choice and the alternatives measured are in the README ("The semantic loss in the shapes world").
A frozen CLIP scores them against two texts with the symmetric image-text contrastive loss:
    L_semantic = lambda_sen * L_CLIP(I_sen, "a photo of a {class}") + lambda_cap * L_CLIP(I_cap, caption)  (Eq. 8)
and training minimises L = CE + L_semantic (Eq. 9). Gradients flow through CLIP's image tower, the
decoder and the soft tokens into the prompts; every network stays frozen.

CLIP is loaded by pretrained.load_clip, from open_clip by model name and pretrained tag, or from a local folder in
open_clip's own `open_clip_config.json` + weights layout (the shapes world's tiny CLIP ships that way).
"""
import itertools
import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

TEXT_CHUNK = 32  # texts go through the text tower this many at a time (FrozenClip.encode_text)
TEXT_CACHE_SIZE = 200_000  # text features kept (about 400 MB at D = 512)


class FrozenClip(nn.Module):
    """CLIP's two towers behind a small API: images in [-1, 1] of any size, texts as strings; unit-norm features."""

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        size = model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        mean = getattr(model.visual, 'image_mean', None) or (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's
        std = getattr(model.visual, 'image_std', None) or (0.26862954, 0.26130258, 0.27577711)
        self.register_buffer('mean', torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.text_cache: Dict[str, torch.Tensor] = {}  # text features never change: the text tower is frozen

    def encode_image(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Differentiable: [-1, 1] images -> CLIP's preprocessing (resize, mean/std) -> unit features (B, D)."""
        x = (img_B3HW.float() + 1) / 2  # to [0, 1]
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode='bicubic', align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return F.normalize(self.model.encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:  # (B, D), unit norm, cached per string
        """A text's features are a function of the text alone: fp32 whatever the autocast around, in chunks of exactly
        TEXT_CHUNK texts (padded), since a matrix kernel's rounding can depend on the batch it runs in. So a resumed
        run computes the same features as an uninterrupted one, and the cache (oldest out past TEXT_CACHE_SIZE: 1.28M
        ImageNet captions would fill 2.6 GB) only saves time."""
        missing = sorted({t for t in texts if t not in self.text_cache})
        device = self.mean.device
        with torch.autocast(device.type, enabled=False):
            for begin in range(0, len(missing), TEXT_CHUNK):
                chunk = missing[begin:begin + TEXT_CHUNK]
                tokens = self.tokenizer(chunk + [''] * (TEXT_CHUNK - len(chunk))).to(device)
                feats = F.normalize(self.model.encode_text(tokens).float(), dim=-1)[:len(chunk)]  # (n, D)
                self.text_cache.update(zip(chunk, feats))
        feats_BD = torch.stack([self.text_cache[t] for t in texts])
        excess = len(self.text_cache) - TEXT_CACHE_SIZE
        for oldest in list(itertools.islice(self.text_cache, max(0, excess))):  # a dict keeps insertion order
            del self.text_cache[oldest]
        return feats_BD

    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.exp().clamp(max=100)


def contrastive_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, texts: Sequence[str],
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric image-text InfoNCE over the batch: (L_IT + L_TI) / 2 (MVP Sec. 3.3, as CLIP).

    Identical texts in a batch (two images of one class share "a photo of a {class}") are all correct
    matches: the target spreads evenly over them. (With the identical features a frozen text tower gives
    them, this equals CLIP's one-hot loss summed over the batch; either way the lowest loss is
    log(number of duplicates), not 0.)
    """
    logits = logit_scale * image_feats @ text_feats.T  # (B, B): image i vs text j
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    text_id = torch.tensor([ids[t] for t in texts], device=logits.device)
    same = (text_id[:, None] == text_id[None, :]).float()  # (B, B), symmetric
    target = same / same.sum(1, keepdim=True)
    image_to_text = torch.sum(-target * logits.log_softmax(dim=1), dim=1).mean()
    text_to_image = torch.sum(-target * logits.T.log_softmax(dim=1), dim=1).mean()
    return (image_to_text + text_to_image) / 2


def soft_token_maps(logits_BLV: torch.Tensor, codebook_VC: torch.Tensor, patch_nums: Sequence[int],
                    temperature: float = 1.0, gumbel: bool = False) -> List[torch.Tensor]:
    """Predicted residual maps R_t, differentiably: softmax(logits / T) @ codebook, per scale (B, Cvae, pn, pn).

    With gumbel, a straight-through Gumbel-softmax: one sampled codebook entry forward, the soft gradient backward.
    """
    B = logits_BLV.shape[0]
    if gumbel:
        probs = F.gumbel_softmax(logits_BLV.float(), tau=temperature, hard=True, dim=-1)
    else:
        probs = (logits_BLV.float() / temperature).softmax(dim=-1)  # (B, L, V)
    h_BLC = probs @ codebook_VC.float()  # (B, L, Cvae)
    maps, begin = [], 0
    for pn in patch_nums:
        maps.append(h_BLC[:, begin:begin + pn * pn].transpose(1, 2).reshape(B, -1, pn, pn))
        begin += pn * pn
    return maps


def inter_anchor(beta: float, num_scales: int) -> int:
    """kappa = floor(beta * K), which must lie in 1..K-1 (MVP Sec. 3.3)."""
    kappa = math.floor(beta * num_scales)
    if not 1 <= kappa <= num_scales - 1:
        raise ValueError(f'beta={beta} gives kappa={kappa} for {num_scales} scales; kappa must be in 1..{num_scales - 1}')
    return kappa


class SemanticLoss(nn.Module):
    """L_semantic of Eq. 8 from teacher-forced logits, with the frozen VQVAE decoder and a frozen CLIP."""

    def __init__(self, clip: FrozenClip, vqvae: nn.Module, beta: float = 0.6, lambda_sen: float = 1.0,
                 lambda_cap: float = 1.0, temperature: float = 1.0, gumbel: bool = False, checkpointed: bool = True):
        """checkpointed: activation checkpointing in the decoder and CLIP's image tower (recomputed in the backward,
        the same loss and gradient): at 256 px the decoder's activations for I_sen and I_cap are most of a training
        step's memory (bench.py fullsize measures it). It sets open_clip's grad checkpointing of the image tower
        to the same."""
        super().__init__()
        self.clip, self.vqvae = clip, vqvae
        self.kappa = inter_anchor(beta, len(vqvae.patch_nums))
        self.lambda_sen, self.lambda_cap = lambda_sen, lambda_cap
        self.temperature, self.gumbel, self.checkpointed = temperature, gumbel, checkpointed
        if hasattr(clip.model.visual, 'set_grad_checkpointing'):
            clip.model.visual.set_grad_checkpointing(checkpointed)

    def decode_sen_cap(self, logits_BLV: torch.Tensor, first_idx_Bl: Optional[torch.Tensor] = None):
        """Eq. 7: I_sen from scales 1..kappa and I_cap from all K scales of the predicted maps, images in [-1, 1].
        first_idx_Bl: the image's own first-scale tokens (B, 1), used in place of the first predicted map."""
        quant = self.vqvae.quantize
        maps = soft_token_maps(logits_BLV, quant.embedding.weight, quant.patch_nums, self.temperature, self.gumbel)
        if first_idx_Bl is not None:
            maps[0] = quant.embedding(first_idx_Bl).transpose(1, 2).reshape_as(maps[0]).to(maps[0].dtype)
        f_hat_sen = sum(quant.upsample_and_phi(si, h) for si, h in enumerate(maps[:self.kappa]))
        f_hat_cap = f_hat_sen + sum(quant.upsample_and_phi(si, h) for si, h in enumerate(maps) if si >= self.kappa)
        wanted = [f for f, w in ((f_hat_sen, self.lambda_sen), (f_hat_cap, self.lambda_cap)) if w > 0]
        images = self.vqvae.fhat_to_img(torch.cat(wanted), self.checkpointed) if wanted else None  # one pass for both
        B = logits_BLV.shape[0]
        img_sen = images[:B] if self.lambda_sen > 0 else None
        img_cap = images[-B:] if self.lambda_cap > 0 else None
        return img_sen, img_cap

    def score(self, img_sen, img_cap, sentences: Sequence[str], captions: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Eq. 8 on decoded images (None for a level whose lambda is 0)."""
        scale = self.clip.logit_scale()
        zero = scale.new_zeros(())
        loss_sen = contrastive_loss(self.clip.encode_image(img_sen), self.clip.encode_text(sentences), sentences, scale) \
            if img_sen is not None else zero
        loss_cap = contrastive_loss(self.clip.encode_image(img_cap), self.clip.encode_text(captions), captions, scale) \
            if img_cap is not None else zero
        return {'sen': loss_sen, 'cap': loss_cap, 'semantic': self.lambda_sen * loss_sen + self.lambda_cap * loss_cap}

    def forward(self, logits_BLV: torch.Tensor, sentences: Sequence[str], captions: Sequence[str],
                first_idx_Bl: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        return self.score(*self.decode_sen_cap(logits_BLV, first_idx_Bl), sentences, captions)
