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
the other ways train.py offers are TOKENS below, compared on the shapes world by `python -m world.experiments
--tables paths`.
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

TEXT_CACHE_SIZE = 200_000  # text features kept: bounded, since a dataset's captions may not fit in memory


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
        """A text's features are a function of the text alone: fp32 whatever the autocast around, and one text at a
        time, since a matrix kernel's rounding can depend on a row's place in its batch (the last rows of a batch
        round differently on AVX2 CPUs). So a resumed run computes the same features as an uninterrupted one, and the
        cache (oldest out past TEXT_CACHE_SIZE) only saves time."""
        device = self.mean.device
        with torch.autocast(device.type, enabled=False):
            for text in dict.fromkeys(t for t in texts if t not in self.text_cache):
                tokens = self.tokenizer([text]).to(device)
                self.text_cache[text] = F.normalize(self.model.encode_text(tokens).float(), dim=-1)[0]  # (D,)
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


# How a token map is made differentiable (--tokens; the paper does not say): 'soft', softmax(logits / T) @ codebook;
# 'gumbel', one codebook entry sampled forward and the soft gradient backward (straight-through Gumbel-softmax);
# 'argmax', the most likely entry forward, the soft gradient backward; 'rollout', free running: the VAR draws each
# scale (straight-through Gumbel) from the scales it drew itself, as the sampler does (rollout_token_maps), instead
# of reading the teacher-forced logits, whose every scale sees the image's own coarser tokens. docs/semantic_loss.md
# measures each: in text-to-image only the rollout judges a caption the prompts could have drawn, since a
# teacher-forced first scale is the text's blend over the codebook, not an image; it is that task's default.
TOKENS = ('soft', 'gumbel', 'argmax', 'rollout')


def token_probs(logits_BlV: torch.Tensor, temperature: float, tokens: str) -> torch.Tensor:
    """Logits (B, l, V) -> differentiable weights over the codebook (B, l, V), one-hot forward unless 'soft'. tokens:
    'soft', 'gumbel' or 'argmax' (the rollout draws each scale with 'gumbel')."""
    if tokens == 'gumbel':
        return F.gumbel_softmax(logits_BlV.float(), tau=temperature, hard=True, dim=-1)
    probs = (logits_BlV.float() / temperature).softmax(dim=-1)
    if tokens == 'argmax':
        hard = F.one_hot(probs.argmax(dim=-1), probs.shape[-1]).to(probs.dtype)
        return hard + probs - probs.detach()  # straight-through: forward hard, backward soft
    return probs


def soft_token_maps(logits_BLV: torch.Tensor, codebook_VC: torch.Tensor, patch_nums: Sequence[int],
                    temperature: float = 1.0, tokens: str = 'soft') -> List[torch.Tensor]:
    """Predicted residual maps R_t, differentiably: token_probs @ codebook, per scale (B, Cvae, pn, pn)."""
    B = logits_BLV.shape[0]
    h_BLC = token_probs(logits_BLV, temperature, tokens) @ codebook_VC.float()  # (B, L, Cvae)
    maps, begin = [], 0
    for pn in patch_nums:
        maps.append(h_BLC[:, begin:begin + pn * pn].transpose(1, 2).reshape(B, -1, pn, pn))
        begin += pn * pn
    return maps


def rollout_token_maps(var: nn.Module, quantizer: nn.Module, cond_BD: torch.Tensor, temperature: float = 1.0,
                       prompt_1LC: Optional[torch.Tensor] = None, prefix_1PC: Optional[torch.Tensor] = None,
                       draw: str = 'gumbel') -> List[torch.Tensor]:
    """The VAR's own maps R_1..R_K, free running and differentiable (VAR.rollout): scale k is drawn (straight-through
    Gumbel; draw 'argmax': the most likely entries) from logits conditioned on the maps drawn at scales 1..k-1, which
    enter the next scale's input as in sampling (f_hat accumulated, area-downsampled)."""
    codebook_VC = quantizer.embedding.weight.float()
    return var.rollout(quantizer, cond_BD, lambda logits_BlV: token_probs(logits_BlV, temperature, draw) @ codebook_VC,
                       prompt_1LC, prefix_1PC)


def inter_anchor(beta: float, num_scales: int) -> int:
    """kappa = floor(beta * K), which must lie in 1..K-1 (MVP Sec. 3.3)."""
    kappa = math.floor(beta * num_scales)
    if not 1 <= kappa <= num_scales - 1:
        raise ValueError(f'beta={beta} gives kappa={kappa} for {num_scales} scales; kappa must be in 1..{num_scales - 1}')
    return kappa


class EmbedInChunks(torch.autograd.Function):
    """features = embed(f_hat) for (N, ...) inputs, with the memory of `chunk` of them: the forward keeps no
    activations, the backward recomputes embed chunk by chunk and backpropagates each chunk alone. embed (the
    frozen decoder and CLIP's image tower) treats each image on its own, so this is the same function and the same
    gradient as one batched pass, the way gradient checkpointing is; its memory no longer grows with the batch."""

    @staticmethod
    def forward(ctx, f_hat, embed, chunk: int):
        ctx.embed, ctx.chunk = embed, chunk
        device = f_hat.device.type  # a Function's backward does not run under the forward's autocast: keep it
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.save_for_backward(f_hat)
        return torch.cat([EmbedInChunks.embed_with_grad(embed, part)[1].detach() for part in f_hat.split(chunk)])

    @staticmethod
    def embed_with_grad(embed, part):
        """(input leaf, features) with a graph, the chunk's activations alive until the caller drops them. The forward
        runs this way too, so that its values are the backward's exactly: some kernels (PyTorch's fused attention
        fast path) are taken only when nothing requires grad, and round differently."""
        part = part.detach().requires_grad_(True)
        with torch.enable_grad():
            return part, embed(part)

    @staticmethod
    def backward(ctx, grad_features):
        f_hat, = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        grads = []
        for part, grad in zip(f_hat.split(ctx.chunk), grad_features.split(ctx.chunk)):
            if not grad.any():  # e.g. the caption level's images in the sentence loss's own backward (--balance)
                grads.append(torch.zeros_like(part))
                continue
            with torch.autocast(device, dtype=dtype, enabled=enabled):
                leaf, features = EmbedInChunks.embed_with_grad(ctx.embed, part)
            grads.append(torch.autograd.grad(features, leaf, grad)[0])
        return torch.cat(grads), None, None


class SemanticLoss(nn.Module):
    """L_semantic of Eq. 8, with the frozen VQVAE decoder and a frozen CLIP, on I_sen and I_cap decoded from the
    teacher-forced logits or (--tokens rollout) from the maps the VAR drew itself."""

    def __init__(self, clip: FrozenClip, vqvae: nn.Module, beta: float = 0.6, lambda_sen: float = 1.0,
                 lambda_cap: float = 1.0, temperature: float = 1.0, tokens: str = 'soft', chunk: int = 0):
        """chunk: decode and embed I_sen and I_cap this many images at a time, recomputing them in the backward
        (EmbedInChunks, and the decoder layer by layer within a chunk: the same loss and gradient, for the activation
        memory of one decoder layer on `chunk` images instead of the whole decoder on 2B: at 256 px the decoder's
        activations are most of a step's memory, tools.bench fullsize); 0: one batched pass, nothing recomputed."""
        super().__init__()
        self.clip, self.vqvae = clip, vqvae
        self.kappa = inter_anchor(beta, len(vqvae.patch_nums))
        self.lambda_sen, self.lambda_cap = lambda_sen, lambda_cap
        assert tokens in TOKENS, tokens
        self.temperature, self.tokens, self.chunk = temperature, tokens, chunk

    def sen_cap_fhat(self, logits_BLV: torch.Tensor, first_idx_Bl: Optional[torch.Tensor] = None, maps=None):
        """Eq. 7's decoder inputs: the soft maps of scales 1..kappa (I_sen) and 1..K (I_cap), accumulated as the
        VQVAE does, each (B, Cvae, h, w). first_idx_Bl: the image's own first-scale tokens (B, 1), used in place of
        the first predicted map. maps: the K maps themselves (rollout_token_maps), instead of the logits'."""
        quant = self.vqvae.quantize
        if maps is None:
            if self.tokens == 'rollout':
                raise ValueError('--tokens rollout judges the maps the VAR draws itself: pass rollout_token_maps')
            maps = soft_token_maps(logits_BLV, quant.embedding.weight, quant.patch_nums, self.temperature, self.tokens)
        if first_idx_Bl is not None:
            maps[0] = quant.embedding(first_idx_Bl).transpose(1, 2).reshape_as(maps[0]).to(maps[0].dtype)
        f_hat_sen = sum(quant.upsample_and_phi(si, h) for si, h in enumerate(maps[:self.kappa]))
        f_hat_cap = f_hat_sen + sum(quant.upsample_and_phi(si, h) for si, h in enumerate(maps) if si >= self.kappa)
        return f_hat_sen, f_hat_cap

    def wanted(self, f_hat_sen, f_hat_cap):
        """The decoder inputs of the levels whose lambda is not 0, as one batch (one pass for both)."""
        return torch.cat([f for f, w in ((f_hat_sen, self.lambda_sen), (f_hat_cap, self.lambda_cap)) if w > 0])

    def split(self, both, B: int):
        """(I_sen part, I_cap part) of a batch made by wanted(), None for a level whose lambda is 0."""
        return (both[:B] if self.lambda_sen > 0 else None), (both[-B:] if self.lambda_cap > 0 else None)

    def decode_sen_cap(self, logits_BLV: torch.Tensor, first_idx_Bl: Optional[torch.Tensor] = None, maps=None):
        """Eq. 7: the images I_sen and I_cap in [-1, 1] (None for a level whose lambda is 0)."""
        if self.lambda_sen == self.lambda_cap == 0:
            return None, None
        images = self.vqvae.fhat_to_img(self.wanted(*self.sen_cap_fhat(logits_BLV, first_idx_Bl, maps)))
        return self.split(images, logits_BLV.shape[0])

    def embed(self, f_hat: torch.Tensor) -> torch.Tensor:
        """Decoder inputs -> CLIP image features (N, D), the decoder checkpointed layer by layer: within a chunk's
        backward only one decoder layer's activations are alive at a time (vqvae.Decoder.forward)."""
        return self.clip.encode_image(self.vqvae.fhat_to_img(f_hat, checkpointed=True))

    def score(self, feats_sen, feats_cap, sentences: Sequence[str], captions: Sequence[str]) -> Dict[str, torch.Tensor]:
        """Eq. 8 on the CLIP features of I_sen and I_cap (None for a level whose lambda is 0): each level's loss,
        and 'semantic', their weighted sum (MVP.objective weighs the levels itself, as terms --balance tells apart)."""
        scale = self.clip.logit_scale()
        zero = scale.new_zeros(())
        loss_sen = contrastive_loss(feats_sen, self.clip.encode_text(sentences), sentences, scale) \
            if feats_sen is not None else zero
        loss_cap = contrastive_loss(feats_cap, self.clip.encode_text(captions), captions, scale) \
            if feats_cap is not None else zero
        return {'sen': loss_sen, 'cap': loss_cap, 'semantic': self.lambda_sen * loss_sen + self.lambda_cap * loss_cap}

    def forward(self, logits_BLV: torch.Tensor, sentences: Sequence[str], captions: Sequence[str],
                first_idx_Bl: Optional[torch.Tensor] = None, maps=None) -> Dict[str, torch.Tensor]:
        """maps: with --tokens rollout, the VAR's free-running maps (rollout_token_maps), which replace the logits'."""
        if self.lambda_sen == self.lambda_cap == 0:
            return self.score(None, None, sentences, captions)
        if self.chunk:
            f_hat = self.wanted(*self.sen_cap_fhat(logits_BLV, first_idx_Bl, maps))
            feats_sen, feats_cap = self.split(EmbedInChunks.apply(f_hat, self.embed, self.chunk), logits_BLV.shape[0])
        else:  # one decoder pass for both images, then CLIP on each level's images
            img_sen, img_cap = self.decode_sen_cap(logits_BLV, first_idx_Bl, maps)
            feats_sen, feats_cap = (self.clip.encode_image(img) if img is not None else None for img in (img_sen, img_cap))
        return self.score(feats_sen, feats_cap, sentences, captions)
