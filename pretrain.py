"""
Pretrain the shapes world's small backbone from scratch with the project's own code, on CUDA or the CPU.

MVP tunes a *pretrained* VAR. The released one needs a GPU and ImageNet; this script makes a small stand-in
that runs anywhere: a multi-scale VQVAE, a class-conditional VAR and a CLIP, all on shapes.py's world
(48x48 images, 12x12 latents, scales 1,2,3,4,6,8,12), plus the shape classifier that scores generated images.

    python pretrain.py --stage all         # classifier, vqvae, decoder, clip, var, in that order
    python pretrain.py --stage var         # one stage (each reads what the stages before it wrote)
    python pretrain.py --stage all --evaluate   # train nothing: measure the saved files' gates again

A stage saves its training state to OUT/resume/STAGE.pt every --ckpt_every steps; run the same command again
after a stop and it continues from there. Writes OUT/backbone.json, vqvae.pth, var.pth, clip/ (open_clip's
local-dir layout), shape_classifier.pth (all fp16) and report_<stage>.json with the quality gates, measured on
held-out images with the saved files: VQVAE PSNR and the shape kind kept in reconstructions; VAR samples
recognised as their class and their FD_clip against that of reconstructions; CLIP image-to-caption top-1 among 100.
"""
import argparse
import gzip
import hashlib
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

import shapes
from clip_loss import contrastive_loss
from device import DTYPES, auto_dtype, parse_device
from fid import fd_clip
from mvp import generate_images
from pretrained import CLIP_VOCAB, atomic_save, load_backbone, save_backbone, to_uint8, write_json
from shapes import attribute_distributions, attribute_tv, rendered, to_input
from update import warmup_cosine_lr
from var import VAR
from vqvae import VQVAE

IMAGE_SIZE = shapes.IMAGE_SIZE  # 48: 12x12 latents at 4x downsampling, each token a 4x4-pixel patch
PATCH_NUMS = (1, 2, 3, 4, 6, 8, 12)
VAE_KWARGS = dict(vocab_size=1024, z_channels=16, ch=32, ch_mult=(1, 2, 4), num_res_blocks=2, patch_nums=PATCH_NUMS,
                  norm_groups=8)
VAR_KWARGS = dict(vocab_size=1024, z_channels=16, depth=6, width=192, num_heads=3, num_classes=shapes.NUM_CLASSES,
                  patch_nums=PATCH_NUMS)
CLIP_CFG = dict(embed_dim=64,
                vision_cfg=dict(image_size=IMAGE_SIZE, patch_size=6, width=128, layers=4, head_width=32),
                text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=3))


def cosine_lr(step: int, total: int, lr: float, warmup: int = 100) -> float:  # every stage decays to 5% of its lr
    return warmup_cosine_lr(step, total, lr, warmup, min_ratio=0.05)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:  # images in [-1, 1] -> PSNR in dB on the [0, 1] scale
    mse = ((a - b) / 2).square().mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def log(stage: str, step: int, total: int, t0: float, **values):
    print(f'[{stage}] step {step}/{total} ' + ' '.join(f'{k} {v:.4f}' for k, v in values.items())
          + f' ({time.time() - t0:.0f}s)', flush=True)


def write_report(out: str, stage: str, report: dict):
    """OUT/report_STAGE.json; a report without training figures (--evaluate) keeps the earlier ones."""
    path = os.path.join(out, f'report_{stage}.json')
    if 'steps' not in report and os.path.isfile(path):
        with open(path) as f:
            report = {**{k: v for k, v in json.load(f).items() if k in ('steps', 'seconds')}, **report}
    write_json(path, report)
    print(f'[{stage}] report: {json.dumps(report)}', flush=True)


def autocast(device: torch.device, dtype: torch.dtype):
    """The decoder's, VAR's and CLIP's training steps under bf16 autocast where --dtype resolved to bf16 (the VQVAE
    stage stays fp32, as the shipped VQVAE was trained); nothing where it resolved to fp32."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype: auto is bf16 on CUDA and on CPUs with bf16 matrix units (device.auto_dtype; this project's 2-core AMX
    CPU runs a VAR step 2x faster than in fp32), else fp32 (a GPU without bf16 too: there is no loss scaler here)."""
    if name == 'auto':
        return torch.bfloat16 if auto_dtype(device) == torch.bfloat16 else torch.float32
    return DTYPES[name]


class Resumable:
    """A stage's training state (model, optimizer, step, RNGs, training seconds so far) in OUT/resume/STAGE.pt every
    `every` steps, written atomically; a rerun of the stage continues from it, and a finished stage deletes it.
    `start` is when the stage would have started had it never stopped: its logs and report count the seconds of every
    run, not only the last (the seconds between the last save and a stop are lost with the steps)."""

    def __init__(self, out: str, stage: str, every: int):
        self.path, self.every = os.path.join(out, 'resume', f'{stage}.pt'), every
        self.start = time.time()

    def seconds(self) -> int:
        return round(time.time() - self.start)

    def restore(self, model, opt, rng: np.random.Generator) -> int:
        if not os.path.isfile(self.path):
            return 0
        state = torch.load(self.path, map_location='cpu', weights_only=True)
        model.load_state_dict(state['model'])
        opt.load_state_dict(state['opt'])
        rng.bit_generator.state = state['numpy']
        torch.set_rng_state(state['torch'])
        self.start -= state['seconds']
        print(f'resuming from {self.path} at step {state["step"]}', flush=True)
        return state['step']

    def maybe_save(self, step: int, total: int, model, opt, rng: np.random.Generator):
        if step % self.every or step >= total:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        atomic_save({'step': step, 'model': model.state_dict(), 'opt': opt.state_dict(),
                     'numpy': rng.bit_generator.state, 'torch': torch.get_rng_state(), 'seconds': self.seconds()},
                    self.path)

    def finish(self):
        if os.path.isfile(self.path):
            os.remove(self.path)


# -----------------------------------------------------------------------------


def shape_weighted_error(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 + L2 reconstruction error with the shape's pixels weighted up (it covers 4-16% of the image), or the
    background's error swamps its edges. The background is the median colour of the top and bottom rows."""
    border = torch.cat((x[:, :, 0], x[:, :, -1]), dim=2).median(dim=2).values[:, :, None, None]  # (B, 3, 1, 1)
    weight = 1 + 9 * ((x - border).abs().amax(dim=1, keepdim=True) > 0.2).float()  # (B, 1, H, W)
    error = (rec - x).abs() + (rec - x).square()
    return (weight * error).mean() / weight.mean()


def coarse_partial_sums(quantizer, f: torch.Tensor, scale_B: torch.Tensor) -> torch.Tensor:
    """f_hat_k for one coarse scale k per image (scale_B, 0-based, < K - 1) of latents f (B, Cvae, h, w), carrying the
    gradient of the codes and phis that make it, plus the encoder's straight-through at that scale's resolution (as VQ
    passes the full sum's gradient to f): what the partial-sum loss of the vqvae stage decodes."""
    f_hats = quantizer.residual_quantize(f)[1]
    batch = torch.arange(len(f), device=f.device)
    f_hat_k = torch.stack(f_hats[:-1])[scale_B, batch]  # (B, Cvae, h, w)
    low_k = torch.stack([F.interpolate(F.adaptive_avg_pool2d(f, pn), size=f.shape[-2:], mode='bicubic')
                         for pn in quantizer.patch_nums[:-1]])[scale_B, batch]  # f as scales 1..k can hold it
    return f_hat_k + (low_k - low_k.detach())


def coarse_targets(x: torch.Tensor, scale_B: torch.Tensor, vae) -> torch.Tensor:
    """Each image (B, 3, H, W) at its own scale (scale_B, 0-based): coarse_target per image."""
    return torch.stack([coarse_target(x[b:b + 1], vae.patch_nums[k], vae.downsample)[0]
                        for b, k in enumerate(scale_B.tolist())])


def train_vqvae(args):
    """The multi-scale VQVAE, from scratch (or from --vae_init's), on the reconstruction loss plus VQ's. With
    --vae_coarse_weight, also on a partial-sum loss: one coarse partial sum per image, decoded, against the image at that
    scale (coarse_target) with the reconstruction's shape-weighted error, through the codes, phis and decoder and the
    encoder's straight-through: the coarse scales are to hold a coarse image, shape included, not the background alone."""
    torch.manual_seed(args.seed)
    device = args.device
    train_images = torch.as_tensor(rendered('train', args.n_train, args.seed)[0], device=device)  # uint8 (N, H, W, 3)
    vae = (load_backbone(args.vae_init)[0].float() if args.vae_init else VQVAE(**VAE_KWARGS)).to(device).train()
    opt = torch.optim.Adam(vae.parameters(), lr=args.vae_lr, betas=(0.5, 0.9))
    steps, B = args.vae_steps, args.vae_batch
    rng = np.random.default_rng(args.seed)
    resume = Resumable(args.out, 'vqvae', args.ckpt_every)
    for step in range(resume.restore(vae, opt, rng), steps):
        for g in opt.param_groups:
            g['lr'] = cosine_lr(step, steps, args.vae_lr)
        x = to_input(train_images[torch.from_numpy(rng.integers(0, len(train_images), B)).to(device)])
        f = vae.quant_conv(vae.encoder(x))
        f_hat, vq_loss, _ = vae.quantize(f)
        if args.vae_coarse_weight:
            scale_B = torch.from_numpy(rng.integers(0, len(vae.patch_nums) - 1, B)).to(device)
            f_coarse = coarse_partial_sums(vae.quantize, f.float(), scale_B)
            rec, coarse = vae.decoder(vae.post_quant_conv(torch.cat((f_hat, f_coarse)))).chunk(2)
            coarse_loss = shape_weighted_error(coarse, coarse_targets(x, scale_B, vae))
        else:
            rec, coarse_loss = vae.decoder(vae.post_quant_conv(f_hat)), torch.zeros((), device=device)
        loss = shape_weighted_error(rec, x) + vq_loss + args.vae_coarse_weight * coarse_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 99:  # revive unused codes at the worst-explained encoder outputs (mostly the shape's)
            with torch.no_grad():
                dead = vae.quantize.ema_vocab_hit_SV.sum(0) < 1e-3
                if dead.any():
                    f = vae.quant_conv(vae.encoder(x))
                    f_hats = vae.quantize.residual_quantize(f)[1]
                    flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1, vae.Cvae)  # (B, C, h, w) -> (B*h*w, C)
                    left = flat(f - f_hats[-1]).norm(dim=1)  # what all scales together still miss
                    worst = left.topk(min(int(dead.sum()), left.shape[0])).indices
                    picks = flat(f - f_hats[-2])[worst]  # there, the residual the last scale had to quantize
                    vae.quantize.embedding.weight[dead.nonzero()[:len(picks), 0]] = picks
                    vae.quantize.ema_vocab_hit_SV[:, dead] = 1.0
        if step % args.log_every == 0 or step == steps - 1:
            log('vqvae', step, steps, resume.start, loss=loss.item(), vq=vq_loss.item(), coarse=coarse_loss.item(),
                psnr=psnr(rec.clamp(-1, 1), x), usage=vae.quantize.codebook_usage())
        resume.maybe_save(step + 1, steps, vae, opt, rng)
    save_backbone(args.out, vae.cpu().eval(), VAE_KWARGS, VAR(**VAR_KWARGS), VAR_KWARGS)  # a placeholder VAR until --stage var
    resume.finish()
    write_report(args.out, 'vqvae', {**evaluate_vqvae(args), 'steps': steps, 'seconds': resume.seconds()})


@torch.no_grad()
def evaluate_vqvae(args) -> dict:
    """The saved (fp16-rounded) VQVAE on held-out renders: PSNR, and whether the shape kind survives the tokens."""
    out, device, n = args.out, args.device, args.gate_per_class * shapes.NUM_CLASSES
    vae, _ = load_backbone(out, device=device)
    images, items = rendered('test', n, args.seed)
    x, idx = to_input(images, device), tokenise(vae, images, device)
    rec = torch.cat([vae.idx_to_img([m[i:i + 100] for m in idx]) for i in range(0, len(x), 100)])
    report = {'heldout_psnr_db': round(psnr(rec, x), 2), 'codebook_usage': round(vae.quantize.codebook_usage(), 3),
              'images': n, 'code_perplexity_per_scale': code_perplexity(idx, vae.vocab_size),
              'latent_energy_left_per_scale': latent_energy_left(vae, x)}
    if os.path.exists(os.path.join(out, 'shape_classifier.pth')):
        classifier, labels = shapes.load_shape_classifier(out).to(device), torch.tensor([a['label'] for a in items])
        report['recon_shape_recognised'] = round((classifier(rec).argmax(1).cpu() == labels).float().mean().item(), 3)
    return report


@torch.no_grad()
def tokenise(vae, images_uint8: np.ndarray, device, chunk: int = 500) -> list:
    """(N, H, W, 3) uint8 images -> their token maps, a list of (N, pn*pn) per scale, `chunk` images at a time (the
    float copies of a whole training set would not fit)."""
    return [torch.cat(maps) for maps in zip(*[vae.img_to_idx(to_input(images_uint8[i:i + chunk], device))
                                              for i in range(0, len(images_uint8), chunk)])]


def code_perplexity(idx: list, vocab_size: int) -> list:
    """exp(entropy) of the codes each scale picks in token maps (a list of (N, pn*pn), tokenise), per scale: how many
    of the codebook's codes the scale effectively uses. A scale near 1 adds almost nothing to what the scales before it
    hold."""
    p_SV = torch.stack([torch.bincount(m.flatten(), minlength=vocab_size).float() for m in idx])
    p_SV = p_SV / p_SV.sum(1, keepdim=True)
    entropy_S = -(p_SV * p_SV.clamp_min(1e-12).log()).sum(1)
    return [round(v, 1) for v in entropy_S.exp().tolist()]


@torch.no_grad()
def latent_energy_left(vae, x: torch.Tensor, chunk: int = 500) -> list:
    """||f - f_hat_k||^2 / ||f||^2 after each scale k over images x (N, 3, H, W): how much of the encoder's latent f the
    scales 1..k explain together. Where it barely falls between two scales, the scale between adds almost nothing."""
    left_S, total = 0, 0
    for i in range(0, len(x), chunk):
        f = vae.quant_conv(vae.encoder(x[i:i + chunk])).float()
        left_S = left_S + torch.stack([(f - f_hat).square().sum() for f_hat in vae.quantize.residual_quantize(f)[1]])
        total = total + f.square().sum()
    return [round(v, 3) for v in (left_S / total).tolist()]


def coarse_target(x: torch.Tensor, pn: int, downsample: int) -> torch.Tensor:
    """The image at scale pn: area-downsampled to pn * downsample pixels a side (the pixels pn x pn tokens cover at the
    last scale's density), bicubic back to full size. What a decoded partial sum f_hat_k should look like."""
    small = F.adaptive_avg_pool2d(x, pn * downsample)
    return F.interpolate(small, size=x.shape[-2:], mode='bicubic', align_corners=False).clamp(-1, 1)


def train_decoder(args):
    """Teach the frozen VQVAE's decoder to draw the partial sums f_hat_k (scales 1..k) as the image at scale k.

    MVP's I_sen is Decoder(sum_{t <= kappa} Up(R_t)) (Eq. 7), an image that CLIP is to judge. The vqvae stage trains the
    decoder on full sums only, and its partial sums decode to images that are not coarse versions of the image (wrong
    backgrounds, colours from the shape's latents): the tiny CLIP names the class of the image's own tokens up to
    kappa no better than chance. The encoder, quantizer and codebook stay frozen, so the tokens, and the VAR trained
    on them, are unchanged; the full reconstruction keeps its own loss. The coarse targets are coarse_target()."""
    torch.manual_seed(args.seed)
    device = args.device
    vae, var = load_backbone(args.out, device=device)
    train_images = torch.as_tensor(rendered('train', args.n_train, args.seed)[0], device=device)
    vae.requires_grad_(False)
    trained = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.Adam(trained, lr=args.decoder_lr, betas=(0.5, 0.9))
    steps, B = args.decoder_steps, args.decoder_batch
    rng = np.random.default_rng(args.seed)
    resume = Resumable(args.out, 'decoder', args.ckpt_every)
    K = len(vae.patch_nums)
    for step in range(resume.restore(vae, opt, rng), steps):
        for g in opt.param_groups:
            g['lr'] = cosine_lr(step, steps, args.decoder_lr, warmup=50)
        x = to_input(train_images[torch.from_numpy(rng.integers(0, len(train_images), B)).to(device)])
        with torch.no_grad():
            f_hats = vae.img_to_partial_sums(x)  # K partial sums
            scale_B = torch.from_numpy(rng.integers(0, K - 1, B)).to(device)  # one coarse scale per image
            f_coarse = torch.stack(f_hats[:-1])[scale_B, torch.arange(B, device=device)]  # (B, Cvae, h, w)
            target = coarse_targets(x, scale_B, vae)
        with autocast(device, args.dtype):
            rec, coarse = vae.decoder(vae.post_quant_conv(torch.cat((f_hats[-1], f_coarse)))).float().chunk(2)
        full_loss = shape_weighted_error(rec, x)
        coarse_loss = ((coarse - target).abs() + (coarse - target).square()).mean()
        loss = full_loss + coarse_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == steps - 1:
            log('decoder', step, steps, resume.start, full=full_loss.item(), coarse=coarse_loss.item(),
                psnr=psnr(rec.clamp(-1, 1), x), coarse_psnr=psnr(coarse.clamp(-1, 1), target))
        resume.maybe_save(step + 1, steps, vae, opt, rng)
    save_backbone(args.out, vae.cpu().eval(), VAE_KWARGS, var.cpu(), VAR_KWARGS)
    resume.finish()
    write_report(args.out, 'decoder', {**evaluate_decoder(args), 'steps': steps, 'seconds': resume.seconds()})


@torch.no_grad()
def evaluate_decoder(args) -> dict:
    """The saved VQVAE's partial sums on held-out renders: PSNR against the coarse targets at every scale."""
    out, device, n = args.out, args.device, args.gate_per_class * shapes.NUM_CLASSES
    vae, _ = load_backbone(out, device=device)
    x = to_input(rendered('test', n, args.seed)[0], device)
    report = {'images': n}
    for k, (pn, decoded) in enumerate(zip(vae.patch_nums, decoded_partial_sums(vae, x))):
        report[f'scale{k + 1}_psnr_db'] = round(psnr(decoded, coarse_target(x, pn, vae.downsample)), 2)
    return report


@torch.no_grad()
def decoded_partial_sums(vae, x: torch.Tensor, chunk: int = 100) -> list:
    """Images (N, 3, H, W) -> K images (N, 3, H, W): their own tokens up to scale k, decoded, for k = 1..K."""
    f_hats = [torch.cat(per_scale) for per_scale in zip(*(vae.img_to_partial_sums(x[i:i + chunk])
                                                          for i in range(0, len(x), chunk)))]
    return [torch.cat([vae.fhat_to_img(f_hat[i:i + chunk]) for i in range(0, len(x), chunk)]) for f_hat in f_hats]


def tokens_path(out: str) -> str:
    return os.path.join(out, 'resume', 'var_tokens.pt')


def var_training_tokens(args, vae):
    """The VAR's training set as token maps (a list of (N, pn*pn), tokenise) and labels (N,). The VQVAE is frozen, so
    the set is rendered and tokenised once (about ten minutes on a 2-core CPU) and kept beside the stage's resume state
    until the stage ends: a resumed run starts training at once. The copy is used only for the same --n_train, --seed
    and vqvae.pth."""
    with open(os.path.join(args.out, 'vqvae.pth'), 'rb') as f:
        key = {'n_train': args.n_train, 'seed': args.seed, 'vqvae_sha256': hashlib.sha256(f.read()).hexdigest()}
    path = tokens_path(args.out)
    if os.path.isfile(path):
        saved = torch.load(path, map_location='cpu', weights_only=True)
        if saved['key'] == key:
            return [m.to(args.device).long() for m in saved['idx']], saved['labels'].to(args.device)
    t0 = time.time()
    train_images, train_items = rendered('train', args.n_train, args.seed)
    idx = tokenise(vae, train_images, args.device)
    labels = torch.tensor([a['label'] for a in train_items], device=args.device)
    print(f'[var] rendered and tokenised {len(train_images)} images in {time.time() - t0:.0f}s', flush=True)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_save({'key': key, 'idx': [m.cpu().int() for m in idx], 'labels': labels.cpu()}, path)  # int32: half the bytes
    return idx, labels


def train_var(args):
    torch.manual_seed(args.seed)
    device = args.device
    vae, _ = load_backbone(args.out, device=device)
    idx_all, labels = var_training_tokens(args, vae)
    var = (load_backbone(args.var_init)[1].float() if args.var_init else VAR(**VAR_KWARGS)).to(device).train()
    decay = [p for n, p in var.named_parameters() if p.ndim >= 2 and 'emb' not in n and 'pos' not in n]
    no_decay = [p for n, p in var.named_parameters() if not (p.ndim >= 2 and 'emb' not in n and 'pos' not in n)]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.05}, {'params': no_decay, 'weight_decay': 0.0}],
                            lr=args.var_lr, betas=(0.9, 0.95))
    steps, B = args.var_steps, args.var_batch
    rng = np.random.default_rng(args.seed)
    resume = Resumable(args.out, 'var', args.ckpt_every)
    forward = torch.compile(var) if args.compile else var  # the same weights: `var` is what is saved and evaluated
    for step in range(resume.restore(var, opt, rng), steps):
        for g in opt.param_groups:
            g['lr'] = cosine_lr(step, steps, args.var_lr)
        pick = torch.from_numpy(rng.integers(0, len(labels), B)).to(device)
        idx = [m[pick] for m in idx_all]
        with torch.no_grad():
            x_BLCv = vae.quantize.teacher_forcing_input(idx)
        with autocast(device, args.dtype):
            logits = forward(var.class_condition(labels[pick], drop=True), x_BLCv)
            loss = F.cross_entropy(logits.view(-1, var.vocab_size), torch.cat(idx, dim=1).view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        opt.step()
        if step % args.log_every == 0 or step == steps - 1:
            log('var', step, steps, resume.start, loss=loss.item())
        if step % 1000 == 999 and step < steps - 1:  # the learning curve of the gate, on a few samples
            print(f'[var] step {step + 1}: {class_recognised(vae, var.eval(), args.out, device, per_class=10)}', flush=True)
            var.train()
        resume.maybe_save(step + 1, steps, var, opt, rng)
    save_backbone(args.out, vae.cpu(), VAE_KWARGS, var.cpu().eval(), VAR_KWARGS)
    resume.finish()
    os.remove(tokens_path(args.out))
    write_report(args.out, 'var', {**evaluate_var(args), 'steps': steps, 'seconds': resume.seconds()})


def evaluate_var(args) -> dict:
    """The saved (fp16-rounded) VAR's gates at evaluate.py's sampling settings, and its teacher-forced loss on training
    and held-out images (whether more steps or more data would help)."""
    vae, var = load_backbone(args.out, device=args.device)
    report = class_recognised(vae, var, args.out, args.device, args.gate_per_class, with_fd=True, cfg=args.cfg,
                              top_k=args.top_k, top_p=args.top_p)
    n = var.num_classes * args.gate_per_class
    for name, split, seed in (('train', 'train', args.seed), ('heldout', 'test', 3)):  # the first n the VAR trained on
        images, items = rendered(split, n, seed)
        report[f'ce_{name}_per_scale'] = teacher_forced_ce(vae, var, images, [a['label'] for a in items], args.device)
    return report


@torch.no_grad()
def teacher_forced_ce(vae, var, images: np.ndarray, labels, device) -> list:
    """The VAR's cross-entropy (nats) on the tokens of (N, H, W, 3) uint8 images, given their class and coarser
    scales (as in training, without condition dropout), per scale."""
    labels, sums = torch.tensor(labels, device=device), torch.zeros(len(var.patch_nums))
    for i in range(0, len(images), 250):
        idx = vae.img_to_idx(to_input(images[i:i + 250], device))
        logits = var(var.class_emb(labels[i:i + 250]), vae.quantize.teacher_forcing_input(idx)).float()  # (B, L, V)
        ce_BL = F.cross_entropy(logits.transpose(1, 2), torch.cat(idx, 1), reduction='none')
        for si, ce_Bl in enumerate(ce_BL.split([pn * pn for pn in var.patch_nums], dim=1)):
            sums[si] += ce_Bl.mean(1).sum().cpu()
    return [round(v, 3) for v in (sums / len(images)).tolist()]


@torch.no_grad()
def class_recognised(vae, var, out: str, device, per_class: int = 20, with_fd: bool = False, cfg: float = 1.5,
                     top_k: int = 900, top_p: float = 0.96) -> dict:
    """Class-conditional samples at evaluate.py's and sample.py's settings (mvp.generate_images): the fraction the
    shape classifier names as their class; with_fd, also FD_clip of the samples and of VQVAE reconstructions, both
    against as many held-out renders (the reconstructions' FD is the floor the tokens set)."""
    from fid import ClipFeatures, feature_statistics
    classifier = shapes.load_shape_classifier(out).to(device)
    labels = torch.arange(var.num_classes, device=device).repeat_interleave(per_class)
    images = torch.cat([generate_images(vae, var, None, None, labels=labels[i:i + 250], cfg_scale=cfg, top_k=top_k,
                                        top_p=top_p, seed=i)
                        for i in range(0, len(labels), 250)])  # (N, 3, H, W) in [0, 1]
    recognised = (classifier(images * 2 - 1).argmax(1) == labels).float().mean().item()
    report = {'class_recognised': round(recognised, 3), 'samples': len(labels), 'cfg': cfg, 'top_k': top_k, 'top_p': top_p}
    if with_fd:
        features = ClipFeatures(pretrained=os.path.join(out, 'clip'), device=device)
        reference = rendered('test', len(labels), 1)[0]  # held out, and not the renders reconstructed below
        reference_stats = feature_statistics(features.images(reference))
        x = to_input(rendered('test', len(labels), 2)[0], device)
        recon = torch.cat([vae.reconstruct(x[i:i + 250]) for i in range(0, len(x), 250)]).add(1).mul(0.5)
        samples, reconstructions = to_uint8(images), to_uint8(recon)  # (N, H, W, 3) uint8
        report['fd_clip_samples'] = round(fd_clip(features, samples, reference_stats), 3)
        report['fd_clip_reconstructions'] = round(fd_clip(features, reconstructions, reference_stats), 3)
        report['fd_ratio'] = round(report['fd_clip_samples'] / report['fd_clip_reconstructions'], 2)
        # where FD_clip's gap comes from: the attributes a class leaves free, as the pixel reader sees them
        seen = {name: attribute_distributions(batch) for name, batch in
                (('samples', samples), ('reconstructions', reconstructions), ('renders', reference))}
        report['attribute_tv_samples'] = attribute_tv(seen['samples'], seen['renders'])
        report['attribute_tv_reconstructions'] = attribute_tv(seen['reconstructions'], seen['renders'])
        report['attributes_samples'], report['attributes_renders'] = seen['samples'], seen['renders']
    return report


def train_classifier(args):
    torch.manual_seed(args.seed)
    device = args.device
    train_images, train_items = rendered('train', args.n_train, args.seed + 1)
    train_images = torch.as_tensor(train_images, device=device)
    labels = torch.tensor([a['label'] for a in train_items], device=device)
    model = shapes.ShapeClassifier().to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    steps, B = args.classifier_steps, 64
    rng = np.random.default_rng(args.seed)
    resume = Resumable(args.out, 'classifier', args.ckpt_every)
    for step in range(resume.restore(model, opt, rng), steps):
        for g in opt.param_groups:
            g['lr'] = cosine_lr(step, steps, 2e-3)
        pick = torch.from_numpy(rng.integers(0, len(labels), B)).to(device)
        x = to_input(train_images[pick])
        if step % 2:  # half the batches blurred: generated images are softer than renders
            x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        loss = F.cross_entropy(model(x), labels[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == steps - 1:
            log('classifier', step, steps, resume.start, loss=loss.item())
        resume.maybe_save(step + 1, steps, model, opt, rng)
    os.makedirs(args.out, exist_ok=True)
    torch.save({k: v.half() for k, v in model.state_dict().items()}, os.path.join(args.out, 'shape_classifier.pth'))
    resume.finish()
    write_report(args.out, 'classifier', {**evaluate_classifier(args), 'steps': steps, 'seconds': resume.seconds()})


@torch.no_grad()
def evaluate_classifier(args) -> dict:
    """The saved (fp16-rounded) classifier on gate_per_class x 10 held-out renders (1000 by default)."""
    images, items = rendered('test', args.gate_per_class * shapes.NUM_CLASSES, args.seed + 1)
    model, x = shapes.load_shape_classifier(args.out), to_input(images)
    pred = torch.cat([model(x[i:i + 250]).argmax(1) for i in range(0, len(x), 250)])
    return {'heldout_accuracy': round((pred == torch.tensor([a['label'] for a in items])).float().mean().item(), 3)}


def low_resolution(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Half the batch seen at a lower resolution (area-downsampled to 8-24 px, bicubic back up). A real CLIP knows
    small and blurry photos; the semantic loss shows this one I_sen, decoded from the coarse scales alone."""
    half, size = x.shape[0] // 2, int(rng.choice((8, 12, 16, 24)))
    small = F.interpolate(F.adaptive_avg_pool2d(x[:half], size), size=x.shape[-2:], mode='bicubic', align_corners=False)
    return torch.cat((small.clamp(-1, 1), x[half:]))


@torch.no_grad()
def quarter_as_coarse_decodes(vae, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """A quarter of the batch as the frozen VQVAE draws it from its own tokens up to a coarse scale k (3..K-1, one per
    image), decoded: the kind of image MVP's semantic loss shows CLIP (I_sen, Eq. 7). A real CLIP has seen millions of
    poor, blurry, badly compressed photos and judges such decodes; this tiny one has seen only clean renders, and named
    the class of the image's own tokens up to kappa 13% of the time (chance 10%) before it saw these."""
    quarter, K = x.shape[0] // 4, len(vae.patch_nums)
    f_hats = torch.stack(vae.img_to_partial_sums(x[:quarter]))  # (K, B/4, Cvae, h, w)
    scale_B = torch.from_numpy(rng.integers(2, K - 1, quarter)).to(x.device)  # 0-based 2..K-2: scales 3..K-1
    decoded = vae.fhat_to_img(f_hats[scale_B, torch.arange(quarter, device=x.device)])
    return torch.cat((decoded.float().clamp(-1, 1), x[quarter:]))


def world_merges(tokenizer) -> list:
    """open_clip's BPE merges, in its order, that can apply inside a word of the shapes world's texts: every merge
    whose two halves joined are a piece of such a word. BPE takes the lowest-ranked applicable merge at each step, so
    with these alone it tokenises those words exactly as with all 48,894."""
    pieces = [''.join(tokenizer.byte_encoder[b] for b in w.encode()) + '</w>' for w in shapes.world_words()]
    ranked = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    return [m for m in ranked if any(''.join(m) in piece for piece in pieces)]


def save_clip(model, tokenizer, folder: str):
    """The CLIP in open_clip's local-dir layout (fp16), with a vocabulary of the world's own words. The full one has a
    row of token embedding for each of open_clip's 49,408 tokens, three quarters of the file, of which the world's
    texts use 43; the rest were never trained. This keeps the byte-level tokens, the merges the world's words need
    (world_merges) and the two special tokens, writes those merges as open_clip's own vocabulary file
    (bpe_simple_vocab.txt.gz, which pretrained.load_clip hands to open_clip's tokenizer) and the embedding rows of
    those tokens: on any of the world's texts the model computes exactly what it did."""
    from safetensors.torch import save_file
    merges = world_merges(tokenizer)
    byte_tokens = list(tokenizer.byte_encoder.values())
    vocab = byte_tokens + [t + '</w>' for t in byte_tokens] + [''.join(m) for m in merges] + \
        ['<start_of_text>', '<end_of_text>']  # open_clip's SimpleTokenizer order
    state = model.state_dict()
    state['token_embedding.weight'] = state['token_embedding.weight'][[tokenizer.encoder[t] for t in vocab]]
    cfg = {**CLIP_CFG, 'text_cfg': {**CLIP_CFG['text_cfg'], 'vocab_size': len(vocab)}}
    os.makedirs(folder, exist_ok=True)
    with gzip.open(os.path.join(folder, CLIP_VOCAB), 'wt', encoding='utf-8') as f:
        f.write('\n'.join(['#version: 0.2'] + [' '.join(m) for m in merges]))  # no trailing newline: no empty merge
    with open(os.path.join(folder, 'open_clip_config.json'), 'w') as f:
        json.dump({'model_cfg': cfg, 'preprocess_cfg': {'mean': [0.5] * 3, 'std': [0.5] * 3}}, f, indent=1)
    save_file({k: v.half().contiguous() for k, v in state.items()}, os.path.join(folder, 'open_clip_model.safetensors'))


def train_clip(args):
    import open_clip
    torch.manual_seed(args.seed)
    device = args.device
    vae = load_backbone(args.out, device=device)[0].requires_grad_(False)
    train_images, train_items = rendered('train', args.n_train, args.seed + 2)
    train_images = torch.as_tensor(train_images, device=device)
    model = open_clip.model.CLIP(**CLIP_CFG).to(device).train()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CLIP_CFG['text_cfg']['context_length'])
    opt = torch.optim.AdamW(model.parameters(), lr=args.clip_lr, weight_decay=0.1, betas=(0.9, 0.98))
    steps, B = args.clip_steps, args.clip_batch
    rng = np.random.default_rng(args.seed)
    resume = Resumable(args.out, 'clip', args.ckpt_every)
    for step in range(resume.restore(model, opt, rng), steps):
        for g in opt.param_groups:
            g['lr'] = cosine_lr(step, steps, args.clip_lr)
        pick = rng.integers(0, len(train_items), B)
        # captions mostly, sentences sometimes: the semantic loss asks CLIP about both levels of text
        texts = [shapes.caption(train_items[i]) if rng.random() < 0.75 else shapes.sentence(train_items[i]['label'])
                 for i in pick]
        with autocast(device, args.dtype):
            x = to_input(train_images[torch.from_numpy(pick).to(device)])
            x = quarter_as_coarse_decodes(vae, x, rng)  # a quarter: decoded partial sums
            x = torch.cat((x[:B // 4], low_resolution(x[B // 4:], rng)))  # 3/8 lower resolution, 3/8 as rendered
            img_feats = F.normalize(model.encode_image(x).float(), dim=-1)
            txt_feats = F.normalize(model.encode_text(tokenizer(texts).to(device)).float(), dim=-1)
        loss = contrastive_loss(img_feats, txt_feats, texts, model.logit_scale.exp().clamp(max=100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == steps - 1:
            log('clip', step, steps, resume.start, loss=loss.item(), scale=model.logit_scale.exp().item())
        resume.maybe_save(step + 1, steps, model, opt, rng)
    save_clip(model.cpu().eval(), tokenizer, os.path.join(args.out, 'clip'))
    resume.finish()
    write_report(args.out, 'clip', {**evaluate_clip(args), 'steps': steps, 'seconds': resume.seconds()})


@torch.no_grad()
def evaluate_clip(args, n: int = 100) -> dict:
    """The saved (fp16-rounded) CLIP: top-1 image-to-caption retrieval among n held-out captions; and, on
    gate_per_class x 10 held-out renders, how often it names the class ("a photo of a {class}", of 10) of the image's
    own tokens up to scale k, decoded (what I_sen is at k = kappa), and of the image at scale k itself."""
    from clip_loss import FrozenClip, inter_anchor
    from pretrained import load_clip
    out, device = args.out, args.device
    clip = FrozenClip(*load_clip(os.path.join(out, 'clip'), device=device)).to(device)
    images, items = rendered('test', n, args.seed + 2)
    sims = clip.encode_image(to_input(images, device)) @ clip.encode_text([shapes.caption(a) for a in items]).T  # (n, n)
    report = {'image_to_caption_top1': round((sims.argmax(1).cpu() == torch.arange(n)).float().mean().item(), 3),
              'captions': n}
    vae, _ = load_backbone(out, device=device)
    images, items = rendered('test', args.gate_per_class * shapes.NUM_CLASSES, args.seed)
    x, labels = to_input(images, device), torch.tensor([a['label'] for a in items], device=device)
    sentences = clip.encode_text([shapes.sentence(c) for c in range(shapes.NUM_CLASSES)])  # (10, D)
    names = lambda imgs: round(((clip.encode_image(imgs) @ sentences.T).argmax(1) == labels).float().mean().item(), 3)
    for k, (pn, decoded) in enumerate(zip(vae.patch_nums, decoded_partial_sums(vae, x))):
        report[f'scale{k + 1}_names_class'] = names(decoded)
        report[f'scale{k + 1}_names_class_of_target'] = names(coarse_target(x, pn, vae.downsample))
    report['kappa'] = inter_anchor(0.6, len(vae.patch_nums))
    report['names_class_at_kappa'] = report[f'scale{report["kappa"]}_names_class']
    return report


STAGES = {'classifier': (train_classifier, evaluate_classifier), 'vqvae': (train_vqvae, evaluate_vqvae),
          'decoder': (train_decoder, evaluate_decoder), 'clip': (train_clip, evaluate_clip),
          'var': (train_var, evaluate_var)}  # stage: (train, measure the gates), in the order they run
# the files in --out that a stage's training reads (written by the stages before it), and those it writes
READS = {'decoder': ('backbone.json', 'vqvae.pth'), 'clip': ('backbone.json', 'vqvae.pth'),
         'var': ('backbone.json', 'vqvae.pth', 'clip', 'shape_classifier.pth')}
WRITES = {'classifier': ('shape_classifier.pth',), 'clip': ('clip',), 'vqvae': ('backbone.json', 'vqvae.pth', 'var.pth'),
          'decoder': (), 'var': ('var.pth',)}
POSITIVE = ('n_train', 'vae_steps', 'vae_batch', 'vae_lr', 'decoder_steps', 'decoder_batch', 'decoder_lr', 'var_steps',
            'var_batch', 'var_lr', 'gate_per_class', 'clip_steps', 'clip_batch', 'clip_lr', 'classifier_steps',
            'ckpt_every', 'log_every')


def input_error(args, stages) -> str:
    """What is wrong with the flags or --out for these stages, in one line, or '' (checked before any work)."""
    try:
        parse_device(args.device)
    except ValueError as e:
        return str(e)
    for name in POSITIVE:
        if not getattr(args, name) > 0:
            return f'--{name} must be positive, got {getattr(args, name)}'
    if args.vae_coarse_weight < 0:
        return f'--vae_coarse_weight must be 0 or more, got {args.vae_coarse_weight}'
    for flag, name, model, kwargs in (('vae_init', 'vqvae.pth', 'vqvae', VAE_KWARGS), ('var_init', 'var.pth', 'var', VAR_KWARGS)):
        folder = getattr(args, flag)
        if not folder:
            continue
        if not all(os.path.isfile(os.path.join(folder, f)) for f in ('backbone.json', name)):
            return f'--{flag} {folder}: no backbone.json and {name} there'
        with open(os.path.join(folder, 'backbone.json')) as f:
            if json.load(f).get(model) != json.loads(json.dumps(kwargs)):  # tuples as JSON lists
                return f'--{flag} {folder}: its {model} in backbone.json is not the one this script trains ({kwargs})'
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return f'--out {args.out} is a file, not a folder'
    have = set(os.listdir(args.out)) if os.path.isdir(args.out) else set()
    for stage in stages:
        # --evaluate measures the stage's own files; training reads what the stages before it wrote
        needed = READS.get(stage, ()) + (WRITES[stage] if args.evaluate else ())
        missing = [name for name in needed if name not in have]
        if missing:
            return (f'--stage {stage}{" --evaluate" if args.evaluate else ""}: no {", ".join(missing)} in --out '
                    f'{args.out}; run the stages before it first (order: {", ".join(STAGES)})')
        have.update(WRITES[stage])
    return ''


def main(argv=None):
    p = argparse.ArgumentParser(description='Pretrain the shapes world backbone (VQVAE, VAR, CLIP, shape classifier).',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--stage', default='all', choices=('all', *STAGES))
    p.add_argument('--out', default='checkpoints/shapes')
    p.add_argument('--n_train', type=int, default=100000, help='training images rendered')
    p.add_argument('--vae_steps', type=int, default=8000)
    p.add_argument('--vae_batch', type=int, default=64)
    p.add_argument('--vae_lr', type=float, default=2e-3)
    p.add_argument('--vae_coarse_weight', type=float, default=0.0, help='weight of the vqvae stage\'s partial-sum loss '
                   '(0: the shipped tokenizer\'s training)')
    p.add_argument('--vae_init', default='', help='the vqvae stage starts from this backbone folder\'s VQVAE instead of '
                   'from scratch')
    p.add_argument('--decoder_steps', type=int, default=800)
    p.add_argument('--decoder_batch', type=int, default=32)
    p.add_argument('--decoder_lr', type=float, default=3e-4)
    p.add_argument('--var_steps', type=int, default=6000)
    p.add_argument('--var_batch', type=int, default=256)
    p.add_argument('--var_init', default='', help='the var stage starts from this backbone folder\'s VAR instead of '
                   'from scratch (a VAR for a fine-tuned tokenizer)')
    p.add_argument('--var_lr', type=float, default=1e-3)
    p.add_argument('--gate_per_class', type=int, default=100, help='held-out images (VQVAE, classifier) and samples (VAR) per class for the gates')
    p.add_argument('--cfg', type=float, default=1.5, help='guidance of the VAR gates\' samples (evaluate.py\'s default)')
    p.add_argument('--top_k', type=int, default=900, help='top-k of the VAR gates\' samples (evaluate.py\'s default)')
    p.add_argument('--top_p', type=float, default=0.96, help='top-p of the VAR gates\' samples (evaluate.py\'s default)')
    p.add_argument('--clip_steps', type=int, default=3000)
    p.add_argument('--clip_batch', type=int, default=256)
    p.add_argument('--clip_lr', type=float, default=1e-3)
    p.add_argument('--classifier_steps', type=int, default=1500)
    p.add_argument('--device', default='auto', help='auto (CUDA if available), cpu, cuda, ...')
    p.add_argument('--dtype', default='auto', choices=('auto', 'fp32', 'bf16'), help='autocast of the decoder, VAR and '
                   'CLIP stages; auto: bf16 on CUDA and on CPUs with bf16 matrix units, else fp32')
    p.add_argument('--compile', action='store_true', help='torch.compile the VAR stage\'s transformer (train.py --compile)')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    p.add_argument('--ckpt_every', type=int, default=500, help='save the stage\'s training state every N steps')
    p.add_argument('--log_every', type=int, default=100)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--evaluate', action='store_true', help='train nothing: measure the saved files\' gates again')
    args = p.parse_args(argv)
    stages = tuple(STAGES) if args.stage == 'all' else (args.stage,)
    error = input_error(args, stages)
    if error:
        sys.exit(f'error: {error}')
    args.device = parse_device(args.device)
    if args.device.type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = resolve_dtype(args.dtype, args.device)
    os.makedirs(args.out, exist_ok=True)
    for stage in stages:
        train, evaluate = STAGES[stage]
        if args.evaluate:
            write_report(args.out, stage, evaluate(args))
        else:
            train(args)


if __name__ == '__main__':
    main()
