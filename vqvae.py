"""
The multi-scale residual VQVAE of VAR (VAR paper, Sec. 3.2, Algorithms 1 and 2).

An image is encoded once by a CNN into a feature map f (B, Cvae, h, w). The
quantizer then explains f coarse to fine: at scale k it area-downsamples what is
still unexplained (the residual) to pn_k x pn_k, looks up the nearest codebook
entry for every position (one codebook shared by all scales), bicubically
upsamples that token map back to h x w, passes it through phi_k (a 3x3 conv
blended with the identity) and subtracts it from the residual. The sum of all
upsampled scales, f_hat, is what the decoder turns back into an image.

The parameter names and the math follow the released `vae_ch160v4096z32.pth`
exactly, so that checkpoint loads with strict=True.
"""
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

VAR_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # the released 256px models' scales

# -----------------------------------------------------------------------------
# CNN encoder / decoder (the VQGAN / latent-diffusion f16 architecture)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """32 groups as released; a tiny model may want fewer (32 groups of 1 channel would be instance norm)."""
    return nn.GroupNorm(num_groups=groups if channels % groups == 0 else 1, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, norm_groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x):  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions of a feature map."""

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()
        self.norm = group_norm(channels, norm_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).unbind(1)  # each (B, C, HW)
        w = torch.bmm(q.transpose(1, 2), k).mul_(C ** -0.5).softmax(dim=2)  # (B, HWq, HWk)
        h = torch.bmm(v, w.transpose(1, 2)).view(B, C, H, W)
        return x + self.proj_out(h)


class Downsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x):  # asymmetric pad, then a stride-2 conv: (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2x(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x):  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2, mode='nearest'))


def middle(channels: int, dropout: float, norm_groups: int) -> nn.Module:
    """The lowest-resolution middle of encoder and decoder: resnet block, self-attention, resnet block."""
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, dropout, norm_groups)
    mid.attn_1 = AttnBlock(channels, norm_groups)
    mid.block_2 = ResnetBlock(channels, channels, dropout, norm_groups)
    return mid


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, dropout: float,
                 norm_groups: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        block_in = ch
        for level, mult in enumerate(ch_mult):
            last = level == len(ch_mult) - 1
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(block_in, ch * mult, dropout, norm_groups))
                block_in = ch * mult
                if last:  # attention only at the lowest resolution
                    stage.attn.append(AttnBlock(block_in, norm_groups))
            if not last:
                stage.downsample = Downsample2x(block_in)
            self.down.append(stage)
        self.mid = middle(block_in, dropout, norm_groups)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, z_channels, 3, 1, 1)

    def forward(self, x):  # (B, 3, H, W) -> (B, Cvae, H/f, W/f), f = 2^(len(ch_mult) - 1): 16 as released
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn):
                    h = stage.attn[i](h)
            if hasattr(stage, 'downsample'):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, dropout: float,
                 norm_groups: int):
        super().__init__()
        block_in = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, 1, 1)
        self.mid = middle(block_in, dropout, norm_groups)
        stages = []
        for level in reversed(range(len(ch_mult))):  # built from the lowest resolution up ...
            stage = nn.Module()
            stage.block, stage.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, ch * ch_mult[level], dropout, norm_groups))
                block_in = ch * ch_mult[level]
                if level == len(ch_mult) - 1:
                    stage.attn.append(AttnBlock(block_in, norm_groups))
            if level != 0:
                stage.upsample = Upsample2x(block_in)
            stages.insert(0, stage)  # ... but stored so that up[level] matches the encoder's down[level]
        self.up = nn.ModuleList(stages)
        self.norm_out = group_norm(block_in, norm_groups)
        self.conv_out = nn.Conv2d(block_in, 3, 3, 1, 1)

    def layers(self):
        """The decoder's layers in the order they run, each taking and returning one tensor."""
        yield self.conv_in
        yield from (self.mid.block_1, self.mid.attn_1, self.mid.block_2)
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                yield block
                if len(stage.attn):
                    yield stage.attn[i]
            if hasattr(stage, 'upsample'):
                yield stage.upsample
        yield self.to_rgb

    def to_rgb(self, h):  # (B, C, H, W) -> (B, 3, H, W)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, z, checkpointed: bool = False):  # (B, Cvae, h, w) -> (B, 3, f*h, f*w)
        """checkpointed: keep only each layer's input for the backward and recompute the layer's inside there, the
        same function and gradient for a fraction of the memory (MVP's semantic loss backpropagates through here)."""
        h = z
        for layer in self.layers():
            h = checkpoint(layer, h, use_reentrant=False) if checkpointed and torch.is_grad_enabled() else layer(h)
        return h


# -----------------------------------------------------------------------------
# the multi-scale residual quantizer


class Phi(nn.Conv2d):
    """phi_k of Algorithm 1: x -> (1 - r) * x + r * conv3x3(x), with r = quant_resi (0.5)."""

    def __init__(self, channels: int, resi_ratio: float):
        super().__init__(channels, channels, 3, 1, 1)
        self.resi_ratio = resi_ratio

    def forward(self, h):
        return h * (1 - self.resi_ratio) + super().forward(h) * self.resi_ratio


class SharedPhis(nn.Module):
    """K phis shared by all scales: scale k uses the phi whose tick is nearest to k / (num_scales - 1)."""

    def __init__(self, channels: int, resi_ratio: float, count: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList([Phi(channels, resi_ratio) for _ in range(count)])
        margin = 1 / 3 / count if count == 4 else 1 / 2 / count  # the released model's tick placement
        self.ticks = np.linspace(margin, 1 - margin, count)

    def for_scale(self, si: int, num_scales: int) -> Phi:
        return self.qresi_ls[int(np.argmin(np.abs(self.ticks - si / (num_scales - 1))))]


class MultiScaleQuantizer(nn.Module):
    def __init__(self, vocab_size: int, z_channels: int, patch_nums: Sequence[int], beta: float = 0.25,
                 quant_resi: float = 0.5, share_quant_resi: int = 4):
        super().__init__()
        assert len(patch_nums) >= 2, 'need at least two scales'
        self.vocab_size, self.Cvae, self.patch_nums, self.beta = vocab_size, z_channels, tuple(patch_nums), beta
        self.quant_resi = SharedPhis(z_channels, quant_resi, share_quant_resi)
        # codebook usage per scale (an EMA of hit counts), kept for monitoring a from-scratch training run
        self.register_buffer('ema_vocab_hit_SV', torch.zeros(len(self.patch_nums), vocab_size))
        self.embedding = nn.Embedding(vocab_size, z_channels)

    def phi(self, si: int) -> Phi:
        return self.quant_resi.for_scale(si, len(self.patch_nums))

    def upsample_and_phi(self, si: int, h_BChw: torch.Tensor) -> torch.Tensor:
        """One scale's contribution to f_hat: bicubic up to the last scale's size (not for the last scale), then phi."""
        H = self.patch_nums[-1]
        if si != len(self.patch_nums) - 1:
            h_BChw = F.interpolate(h_BChw, size=(H, H), mode='bicubic')
        return self.phi(si)(h_BChw)

    def nearest_code(self, z_NC: torch.Tensor) -> torch.Tensor:  # (N, Cvae) -> (N,) codebook indices
        codebook = self.embedding.weight.data  # (V, Cvae)
        dist = z_NC.square().sum(1, keepdim=True) + codebook.square().sum(1)  # (N, V)
        dist.addmm_(z_NC, codebook.T, alpha=-2, beta=1)
        return dist.argmin(dim=1)

    def residual_quantize(self, f_BChw: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Algorithm 1: returns the token maps (B, pn*pn) and the running f_hat after every scale."""
        B, C, H, W = f_BChw.shape
        assert H == W == self.patch_nums[-1], f'feature map {H}x{W} does not match the last scale {self.patch_nums[-1]}'
        f_rest = f_BChw.detach().clone()
        f_hat = torch.zeros_like(f_rest)
        idx_list, f_hat_list = [], []
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode='area') if si != len(self.patch_nums) - 1 else f_rest
            idx_N = self.nearest_code(z.permute(0, 2, 3, 1).reshape(-1, C))  # (B*pn*pn,)
            h_BChw = self.embedding(idx_N.view(B, pn, pn)).permute(0, 3, 1, 2)  # (B, Cvae, pn, pn)
            h_BChw = self.upsample_and_phi(si, h_BChw)
            f_hat = f_hat + h_BChw
            f_rest = f_rest - h_BChw.detach()
            idx_list.append(idx_N.view(B, pn * pn))
            f_hat_list.append(f_hat)
        return idx_list, f_hat_list

    def forward(self, f_BChw: torch.Tensor):
        """Training-time quantization: f_hat with a straight-through gradient, the VQ loss and codebook hits."""
        f = f_BChw.float()
        idx_list, f_hat_list = self.residual_quantize(f)
        f_no_grad = f.detach()
        # codebook and phi learn from || f_hat_k - sg(f) ||^2 at every scale k; the encoder from the commitment term
        # beta * || sg(f_hat_k) - f ||^2 (as in the released training code, averaged over the scales)
        vq_loss = sum(F.mse_loss(fh.detach(), f) * self.beta + F.mse_loss(fh, f_no_grad) for fh in f_hat_list) / len(f_hat_list)
        f_hat = f_hat_list[-1]
        f_hat_st = (f_hat.detach() - f_no_grad) + f  # straight-through: decoder gradient flows into the encoder
        if self.training:
            with torch.no_grad():
                hits = torch.stack([torch.bincount(idx.flatten(), minlength=self.vocab_size).float() for idx in idx_list])  # (S, V)
                self.ema_vocab_hit_SV.mul_(0.99).add_(hits, alpha=0.01)
        return f_hat_st, vq_loss, idx_list

    def codebook_usage(self) -> float:
        """Fraction of codebook entries hit at any scale recently (from the EMA of hit counts)."""
        return (self.ema_vocab_hit_SV.sum(0) > 1e-3).float().mean().item()

    def idx_to_fhat(self, idx_list: List[torch.Tensor]) -> torch.Tensor:
        """Algorithm 2 (before the decoder): sum of the upsampled, phi-refined token maps -> f_hat (B, Cvae, H, W)."""
        f_hat = 0
        for si, idx_Bl in enumerate(idx_list):
            pn = self.patch_nums[si]
            h_BChw = self.embedding(idx_Bl).transpose(1, 2).reshape(idx_Bl.shape[0], self.Cvae, pn, pn)
            f_hat = f_hat + self.upsample_and_phi(si, h_BChw)
        return f_hat

    def teacher_forcing_input(self, idx_list: List[torch.Tensor]) -> torch.Tensor:
        """The transformer's input for scales 2..K: f_hat after scale k, area-downsampled to scale k+1's size.

        Returns (B, L - first_l, Cvae), concatenated over scales in order.
        """
        B = idx_list[0].shape[0]
        f_hat = torch.zeros(B, self.Cvae, self.patch_nums[-1], self.patch_nums[-1], device=idx_list[0].device)
        next_scales = []
        for si in range(len(self.patch_nums) - 1):
            pn, pn_next = self.patch_nums[si], self.patch_nums[si + 1]
            h_BChw = self.embedding(idx_list[si]).transpose(1, 2).reshape(B, self.Cvae, pn, pn)
            f_hat = f_hat + self.upsample_and_phi(si, h_BChw)
            next_scales.append(F.interpolate(f_hat, size=(pn_next, pn_next), mode='area').flatten(2).transpose(1, 2))
        return torch.cat(next_scales, dim=1)

    def next_autoregressive_input(self, si: int, f_hat: torch.Tensor, h_BChw: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Sampling: add scale si's map (B, Cvae, pn, pn) to f_hat; return f_hat and the next scale's input map."""
        f_hat = f_hat + self.upsample_and_phi(si, h_BChw)
        if si == len(self.patch_nums) - 1:
            return f_hat, f_hat
        pn_next = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn_next, pn_next), mode='area')


# -----------------------------------------------------------------------------


class VQVAE(nn.Module):
    """Encoder -> quant_conv -> multi-scale quantizer -> post_quant_conv -> decoder. Images are in [-1, 1]."""

    def __init__(self, vocab_size: int = 4096, z_channels: int = 32, ch: int = 160, ch_mult: Sequence[int] = (1, 1, 2, 2, 4),
                 num_res_blocks: int = 2, patch_nums: Sequence[int] = VAR_PATCH_NUMS, beta: float = 0.25,
                 quant_resi: float = 0.5, share_quant_resi: int = 4, dropout: float = 0.0, norm_groups: int = 32):
        super().__init__()
        self.vocab_size, self.Cvae, self.patch_nums = vocab_size, z_channels, tuple(patch_nums)
        self.downsample = 2 ** (len(ch_mult) - 1)
        self.image_size = self.patch_nums[-1] * self.downsample
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels, dropout, norm_groups)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels, dropout, norm_groups)
        self.quantize = MultiScaleQuantizer(vocab_size, z_channels, patch_nums, beta, quant_resi, share_quant_resi)
        self.quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 3, 1, 1)

    def forward(self, img_B3HW: torch.Tensor):
        """Training: returns (reconstruction, vq_loss, token maps)."""
        f_hat, vq_loss, idx_list = self.quantize(self.quant_conv(self.encoder(img_B3HW)))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss, idx_list

    def fhat_to_img(self, f_hat: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        """(B, Cvae, h, w) -> (B, 3, H, W) in [-1, 1]; checkpointed: see Decoder.forward."""
        return self.decoder(self.post_quant_conv(f_hat), checkpointed).clamp(-1, 1)

    @torch.no_grad()
    def img_to_idx(self, img_B3HW: torch.Tensor) -> List[torch.Tensor]:
        """Image in [-1, 1] -> multi-scale token maps, a list of (B, pn*pn) long tensors."""
        return self.quantize.residual_quantize(self.quant_conv(self.encoder(img_B3HW)).float())[0]

    def idx_to_img(self, idx_list: List[torch.Tensor]) -> torch.Tensor:
        """Multi-scale token maps -> image in [-1, 1] (Algorithm 2)."""
        return self.fhat_to_img(self.quantize.idx_to_fhat(idx_list))

    @torch.no_grad()
    def img_to_partial_sums(self, img_B3HW: torch.Tensor) -> List[torch.Tensor]:
        """Image in [-1, 1] -> f_hat after scales 1..k for every k = 1..K, each (B, Cvae, H/f, W/f): the last is the
        whole quantized image, the earlier ones what decoding only the coarse scales sees (MVP's I_sen)."""
        return self.quantize.residual_quantize(self.quant_conv(self.encoder(img_B3HW)).float())[1]

    @torch.no_grad()
    def reconstruct(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Image -> quantized -> image, all in [-1, 1]."""
        return self.fhat_to_img(self.img_to_partial_sums(img_B3HW)[-1])
