"""
The VAR transformer: next-scale prediction (VAR paper, Sec. 3.1 and 4).

A sequence holds the token maps of all scales, flattened and concatenated:
L = sum(pn*pn) positions (680 for the 256px models). Scale 1's single position
holds the start token (the class embedding); every later scale's positions hold
the VQVAE's f_hat so far, downsampled to that scale's size. A block-causal mask
lets every position see its own scale and all coarser ones, so one forward pass
predicts every scale's token map from the coarser ones (teacher forcing).
Conditioning is by AdaLN: every block's LayerNorm scale/shift/gate come from the
class embedding. Sampling runs scale by scale with a KV cache.

MVP adds one thing here (marked "MVP" below): an additive prompt map F (1, L, C)
summed onto the input tokens (MVP paper, Eq. 6). The prefilled-prompt baseline
of MVP's Table 4 (learned tokens prepended to the sequence) is marked too.
With neither, this is the untouched VAR, and the parameter names are the
released checkpoints' (`var_d16.pth` ... `var_d36.pth`), which load strict.
"""
import math
from contextlib import contextmanager
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from vqvae import VAR_PATCH_NUMS, VQVAE


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drop the whole residual branch of a sample with probability p."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - p)
    return x * keep / (1 - p)


class SelfAttention(nn.Module):
    def __init__(self, width: int, num_heads: int, attn_l2_norm: bool = True):
        super().__init__()
        assert width % num_heads == 0
        self.num_heads, self.head_dim = num_heads, width // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:  # cosine attention with a learned per-head temperature, capped at 100
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer('zero_k_bias', torch.zeros(width))  # keys get no bias
        self.proj = nn.Linear(width, width)
        self.kv_cache = None  # None: off; () or (k, v) of all coarser scales while sampling with the cache on

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        B, L, C = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(B, L, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1) * self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()
            k = F.normalize(k, dim=-1)
        if self.kv_cache is not None:  # sampling: attend to the cached keys/values of all coarser scales
            if len(self.kv_cache):
                k = torch.cat((self.kv_cache[0], k), dim=2)
                v = torch.cat((self.kv_cache[1], v), dim=2)
            self.kv_cache = (k, v)
        q, k = q.to(v.dtype), k.to(v.dtype)  # F.normalize runs in fp32 under autocast
        mask = None if attn_bias is None else attn_bias.to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # (B, H, L, hd)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU(approximate='tanh')
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class AdaLNSelfAttn(nn.Module):
    """A transformer block whose LayerNorms take scale, shift and a residual gate from the condition (AdaLN)."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float, shared_aln: bool, attn_l2_norm: bool,
                 norm_eps: float, drop_path_rate: float):
        super().__init__()
        self.width, self.shared_aln, self.drop_path_rate = width, shared_aln, drop_path_rate
        self.attn = SelfAttention(width, num_heads, attn_l2_norm)
        self.ffn = FFN(width, round(width * mlp_ratio))
        self.ln_wo_grad = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        if shared_aln:  # d36: one AdaLN projection for all blocks (VAR.shared_ada_lin), plus a per-block offset
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, width) / width ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, attn_bias: Optional[torch.Tensor]) -> torch.Tensor:
        # x: (B, L, C); cond: (B, C), or (B, 1, 6, C) already projected when the AdaLN is shared
        if self.shared_aln:
            ada = self.ada_gss + cond  # (B, 1, 6, C)
        else:
            ada = self.ada_lin(cond).view(-1, 1, 6, self.width)  # (B, 1, 6, C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = ada.unbind(2)  # each (B, 1, C)
        h = self.attn(self.ln_wo_grad(x) * (scale1 + 1) + shift1, attn_bias) * gamma1
        x = x + drop_path(h, self.drop_path_rate, self.training)
        h = self.ffn(self.ln_wo_grad(x) * (scale2 + 1) + shift2) * gamma2
        return x + drop_path(h, self.drop_path_rate, self.training)


class AdaLNBeforeHead(nn.Module):
    def __init__(self, width: int, norm_eps: float):
        super().__init__()
        self.width = width
        self.ln_wo_grad = nn.LayerNorm(width, eps=norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BD).view(-1, 1, 2, self.width).unbind(2)  # each (B, 1, C)
        return self.ln_wo_grad(x) * (scale + 1) + shift


def sample_top_k_top_p(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0,
                       rng: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sample one token per position from logits (B, l, V), keeping the top_k logits and/or the top_p mass."""
    B, l, V = logits_BlV.shape
    logits = logits_BlV.clone()
    if top_k > 0:
        kth_best = logits.topk(top_k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth_best, -torch.inf)
    if top_p > 0:
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=False)
        outside = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)  # the low tail holding 1 - top_p
        outside[..., -1:] = False  # always keep the best token
        logits.masked_fill_(outside.scatter(-1, sorted_idx, outside), -torch.inf)
    return torch.multinomial(logits.softmax(dim=-1).view(-1, V), num_samples=1, generator=rng).view(B, l)


class VAR(nn.Module):
    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, depth: int = 16, width: Optional[int] = None,
                 num_heads: Optional[int] = None, mlp_ratio: float = 4.0, num_classes: int = 1000,
                 patch_nums=VAR_PATCH_NUMS, shared_aln: bool = False, attn_l2_norm: bool = True,
                 cond_drop_rate: float = 0.1, drop_path_rate: float = 0.0, norm_eps: float = 1e-6):
        super().__init__()
        width = width or 64 * depth  # the released models: width 64*depth, one head per 64 channels
        num_heads = num_heads or width // 64
        self.vocab_size, self.Cvae, self.depth, self.width = vocab_size, z_channels, depth, width
        self.num_classes, self.cond_drop_rate = num_classes, cond_drop_rate
        self.patch_nums = tuple(patch_nums)
        self.L = sum(pn * pn for pn in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.begin_ends = []  # [begin, end) of every scale in the flattened sequence
        for pn in self.patch_nums:
            begin = self.begin_ends[-1][1] if self.begin_ends else 0
            self.begin_ends.append((begin, begin + pn * pn))

        init_std = math.sqrt(1 / width / 3)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, width))  # added to the start token
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, width))  # absolute positions, per scale
        scale_of_position = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(self.patch_nums)])  # (L,)
        self.register_buffer('lvl_1L', scale_of_position.view(1, self.L))
        # block-causal mask: position i may attend to j iff scale(j) <= scale(i)
        visible = scale_of_position.view(-1, 1) >= scale_of_position.view(1, -1)  # (L, L)
        self.register_buffer('attn_bias_for_masking', torch.where(visible, 0.0, -torch.inf).view(1, 1, self.L, self.L))
        self.word_embed = nn.Linear(z_channels, width)
        self.class_emb = nn.Embedding(num_classes + 1, width)  # the last row is the null class for CFG
        self.lvl_embed = nn.Embedding(len(self.patch_nums), width)  # which scale a position belongs to
        if shared_aln:
            self.shared_ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        self.blocks = nn.ModuleList([
            AdaLNSelfAttn(width, num_heads, mlp_ratio, shared_aln, attn_l2_norm, norm_eps,
                          drop_path_rate * i / max(depth - 1, 1))
            for i in range(depth)])
        self.head_nm = AdaLNBeforeHead(width, norm_eps)
        self.head = nn.Linear(width, vocab_size)
        self.init_weights(init_std)

    @torch.no_grad()
    def init_weights(self, init_std: float, init_head: float = 0.02, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5):
        """VAR's initialisation for training from scratch (the released weights overwrite it)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if getattr(m, 'bias', None) is not None:
                    m.bias.zero_()
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=init_std)
        self.head.weight.mul_(init_head)
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * self.depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * self.depth))
            ada = block.ada_gss.view(6, -1) if block.shared_aln else block.ada_lin[-1].weight.view(6, self.width, -1)
            ada[2:].mul_(init_adaln)  # scales and shifts
            ada[:2].mul_(init_adaln_gamma)  # residual gates start near zero: every block starts as identity

    def shared_ada(self, cond_BD: torch.Tensor) -> torch.Tensor:
        """The AdaLN input of the blocks: the condition itself, or its shared projection (B, 1, 6, C) for d36."""
        if hasattr(self, 'shared_ada_lin'):
            return self.shared_ada_lin(cond_BD).view(-1, 1, 6, self.width)
        return cond_BD

    def class_condition(self, label_B: torch.Tensor, drop: bool = False) -> torch.Tensor:
        """Class labels (B,) -> condition (B, C); with drop, each becomes the null class with cond_drop_rate (for CFG)."""
        cond_BD = self.class_emb(label_B)
        return self.drop_condition(cond_BD, self.cond_drop_rate) if drop else cond_BD

    def drop_condition(self, cond_BD: torch.Tensor, rate: float) -> torch.Tensor:
        """Training for classifier-free guidance: each condition (a class's or a caption's) becomes the null one with
        probability rate."""
        null_B1 = torch.rand(cond_BD.shape[0], 1, device=cond_BD.device) < rate
        return torch.where(null_B1, self.null_condition(cond_BD.shape[0]).to(cond_BD.dtype), cond_BD)

    def null_condition(self, batch_size: int) -> torch.Tensor:  # (B, C)
        return self.class_emb.weight[self.num_classes].expand(batch_size, -1)

    def embed_inputs(self, cond_BD: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor) -> torch.Tensor:
        """Start token + word embeddings of scales 2..K, plus scale and position embeddings -> (B, L, C)."""
        B = cond_BD.shape[0]
        sos = cond_BD.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start  # (B, first_l, C)
        x_BLC = torch.cat((sos, self.word_embed(x_BLCv_wo_first_l.float())), dim=1)  # (B, L, C)
        return x_BLC + self.lvl_embed(self.lvl_1L) + self.pos_1LC

    def logits(self, h_BLC: torch.Tensor, cond_BD: torch.Tensor) -> torch.Tensor:  # (B, l, C) -> (B, l, V), fp32
        return self.head(self.head_nm(h_BLC.float(), cond_BD.float())).float()

    def forward(self, cond_BD: torch.Tensor, x_BLCv_wo_first_l: torch.Tensor, prompt_1LC: Optional[torch.Tensor] = None,
                prefix_1PC: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher forcing: condition (B, C) and VQVAE input (B, L - first_l, Cvae) -> logits (B, L, V).

        prompt_1LC: MVP's prompt map F (zeros away from the prompt positions), added to the input tokens.
        prefix_1PC: the prefilled-prompt baseline's P tokens, prepended to the sequence.
        """
        with torch.autocast(device_type=cond_BD.device.type, enabled=False):  # embeddings in fp32, as released
            x_BLC = self.embed_inputs(cond_BD.float(), x_BLCv_wo_first_l)
            # MVP (Eq. 6, p(R_t | R_hat_<t, F_t)): the prompt F_t is added to the input tokens at scale t's positions,
            # the ones that predict R_t (the first scale's is the start token); the sequence length does not change
            if prompt_1LC is not None:
                x_BLC = x_BLC + prompt_1LC
        attn_bias = self.attn_bias_for_masking
        if prefix_1PC is not None:  # prefilled-prompt baseline (MVP Table 4): the sequence grows by P tokens
            x_BLC, attn_bias = self.prepend_prefix(x_BLC, prefix_1PC)
        ada = self.shared_ada(cond_BD)
        for block in self.blocks:
            x_BLC = block(x_BLC, ada, attn_bias)
        if prefix_1PC is not None:
            x_BLC = x_BLC[:, prefix_1PC.shape[1]:]
        return self.logits(x_BLC, cond_BD)

    def prepend_prefix(self, x_BlC: torch.Tensor, prefix_1PC: torch.Tensor):
        """Prefilled-prompt baseline: prepend P tokens that every position sees and that see only each other."""
        B, l, _ = x_BlC.shape
        P = prefix_1PC.shape[1]
        bias = x_BlC.new_full((P + l, P + l), -torch.inf)
        bias[:, :P] = 0.0
        bias[P:, P:] = self.attn_bias_for_masking[0, 0, :l, :l]
        return torch.cat((prefix_1PC.expand(B, -1, -1).to(x_BlC.dtype), x_BlC), dim=1), bias.view(1, 1, P + l, P + l)

    def rollout(self, quantizer: nn.Module, cond_BD: torch.Tensor, draw: Callable[[torch.Tensor], torch.Tensor],
                prompt_1LC: Optional[torch.Tensor] = None, prefix_1PC: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
        """Free running with gradients: the maps the VAR draws itself, scale by scale through the KV cache as
        generate() samples (no guidance), so scale k sees only the maps drawn at 1..k-1; one pass over the sequence,
        the cost of a teacher-forced forward. draw: logits (B, l, V) -> the drawn map's codebook vectors (B, l, Cvae),
        differentiable (clip_loss.rollout_token_maps). Returns the K maps, (B, Cvae, pn, pn) each."""
        B = cond_BD.shape[0]
        with torch.autocast(device_type=cond_BD.device.type, enabled=False):  # embeddings in fp32, as in forward()
            lvl_pos_1LC = self.lvl_embed(self.lvl_1L) + self.pos_1LC
            if prompt_1LC is not None:  # MVP (Eq. 6): every scale's input tokens get their prompt map F_t
                lvl_pos_1LC = lvl_pos_1LC + prompt_1LC
            next_input = cond_BD.float().unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start \
                + lvl_pos_1LC[:, :self.first_l]
        ada = self.shared_ada(cond_BD)
        weights = [self.cast_frozen_matrices(block, cond_BD.device.type) for block in self.blocks]
        f_hat = cond_BD.new_zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1], dtype=torch.float32)
        maps = []
        with self.kv_cache(True):
            for si, pn in enumerate(self.patch_nums):
                x, attn_bias = next_input, None  # the cache holds every coarser scale's keys and values
                if prefix_1PC is not None and si == 0:  # prefilled baseline: the prefix enters the cache once
                    x, attn_bias = self.prepend_prefix(x, prefix_1PC)
                for block, block_weights in zip(self.blocks, weights):
                    x = torch.func.functional_call(block, block_weights, (x, ada, attn_bias))
                maps.append(draw(self.logits(x[:, -pn * pn:], cond_BD)).transpose(1, 2).reshape(B, self.Cvae, pn, pn))
                f_hat, next_map = quantizer.next_autoregressive_input(si, f_hat, maps[-1])
                if si < len(self.patch_nums) - 1:
                    begin, end = self.begin_ends[si + 1]
                    with torch.autocast(device_type=cond_BD.device.type, enabled=False):
                        next_input = self.word_embed(next_map.flatten(2).transpose(1, 2)) + lvl_pos_1LC[:, begin:end]
        return maps

    @contextmanager
    def kv_cache(self, on: bool):
        """Every block's attention keeps the keys and values of the scales before (on) or sees the whole sequence
        (off), for the length of the with; off again after it, whatever happens inside."""
        for block in self.blocks:
            block.attn.kv_cache = () if on else None
        try:
            yield
        finally:
            for block in self.blocks:
                block.attn.kv_cache = None

    @staticmethod
    def cast_frozen_matrices(block: nn.Module, device_type: str) -> dict:
        """Under autocast, the block's frozen linear weights cast once to the autocast dtype (the values autocast
        computes), to call it with at every scale: autocast keeps its cast only for weights that require grad, so
        each scale would cast a frozen weight again and keep that copy for the backward. {} without autocast, and
        where something wraps attn.mat_qkv (LoRA): attention reads its weight, which such a wrapper merges from its
        own, and a base cast first would round the merge differently."""
        if not torch.is_autocast_enabled(device_type) or not isinstance(block.attn.mat_qkv, nn.Linear):
            return {}
        dtype = torch.get_autocast_dtype(device_type)
        return {name: p.to(dtype) for name, p in block.named_parameters()
                if name.endswith('weight') and p.ndim == 2 and not p.requires_grad}

    @torch.no_grad()
    def generate(self, vqvae: VQVAE, cond_BD: torch.Tensor, cfg: float = 1.5, top_k: int = 0, top_p: float = 0.0,
                 seed: Optional[int] = None, prompt_1LC: Optional[torch.Tensor] = None,
                 prefix_1PC: Optional[torch.Tensor] = None, use_kv_cache: bool = True,
                 given_idx: Sequence[torch.Tensor] = ()) -> List[torch.Tensor]:
        """Next-scale sampling with classifier-free guidance (VAR paper, Sec. 4; the released sampler).

        cond_BD: (B, C) conditions; the guidance branch uses the null class. Guidance grows linearly with the
        scale index: t_k = cfg * k / (K - 1), logits = (1 + t_k) * cond - t_k * uncond.
        given_idx: token maps of the first scales, (B, pn*pn) each, taken instead of sampled (the VAR paper's zero-shot
        editing teacher-forces known tokens the same way); the rest are sampled given them.
        Returns the sampled token maps, a list of (B, pn*pn) long tensors; vqvae.idx_to_img turns them into images.
        """
        B = cond_BD.shape[0]
        rng = None if seed is None else torch.Generator(device=cond_BD.device).manual_seed(seed)
        cond_2BD = torch.cat((cond_BD, self.null_condition(B).to(cond_BD.dtype)))  # conditional half, then null half
        ada = self.shared_ada(cond_2BD)
        lvl_pos_1LC = self.lvl_embed(self.lvl_1L) + self.pos_1LC
        if prompt_1LC is not None:  # MVP (Eq. 6): every scale's input tokens get their prompt map F_t
            lvl_pos_1LC = lvl_pos_1LC + prompt_1LC
        # the first scale's input: start token (the condition) + its position embeddings
        next_input = cond_2BD.unsqueeze(1).expand(2 * B, self.first_l, -1) + self.pos_start + lvl_pos_1LC[:, :self.first_l]
        seen = []  # without the cache: all inputs so far, re-run every scale
        f_hat = cond_BD.new_zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1], dtype=torch.float32)
        idx_list = []
        with self.kv_cache(use_kv_cache):
            for si, pn in enumerate(self.patch_nums):
                begin, end = self.begin_ends[si]
                if use_kv_cache:
                    x, attn_bias = next_input, None  # the cache holds every coarser scale's keys and values
                else:
                    seen.append(next_input)
                    x, attn_bias = torch.cat(seen, dim=1), self.attn_bias_for_masking[:, :, :end, :end]
                if prefix_1PC is not None and (si == 0 or not use_kv_cache):  # prefilled baseline: the prefix enters
                    x, attn_bias = self.prepend_prefix(x, prefix_1PC)  # once with the cache, every scale without
                for block in self.blocks:
                    x = block(x, ada, attn_bias)
                logits_2BlV = self.logits(x[:, -(end - begin):], cond_2BD)
                t = cfg * si / (len(self.patch_nums) - 1)
                logits_BlV = (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]
                idx_Bl = given_idx[si] if si < len(given_idx) else sample_top_k_top_p(logits_BlV, top_k, top_p, rng)
                idx_list.append(idx_Bl)
                h_BChw = vqvae.quantize.embedding(idx_Bl).transpose(1, 2).reshape(B, self.Cvae, pn, pn)
                f_hat, next_map = vqvae.quantize.next_autoregressive_input(si, f_hat, h_BChw)
                if si < len(self.patch_nums) - 1:
                    next_begin, next_end = self.begin_ends[si + 1]
                    next_input = self.word_embed(next_map.flatten(2).transpose(1, 2)) + lvl_pos_1LC[:, next_begin:next_end]
                    next_input = next_input.repeat(2, 1, 1)  # the same map feeds both CFG halves
        return idx_list
