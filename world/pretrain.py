"""
Pretrain the shapes world's backbone from nothing (world/shapes.py), on 2 CPU cores or CUDA: the judge that
scores everything, a multi-scale VQVAE, a tiny CLIP for the semantic loss and a class-conditional VAR. Each stage
measures its gate on held-out renders and the build stops at the first gate that fails.

    python -m world.pretrain                  # judge, vqvae, clip, var; a finished stage is skipped, a stopped one resumes
    python -m world.pretrain --stage vqvae    # one stage again (it reads what the stages before it wrote)
    python -m world.pretrain --stage vqvae --evaluate   # train nothing: measure the saved files' gate again

Writes OUT/judge.pth, backbone.json, vqvae.pth, var.pth, clip/ (open_clip's local-dir layout), all fp16, and
report_<stage>.json with the gate's figures, met or missed.
"""
import argparse
import gzip
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

from clip_loss import FrozenClip, SemanticLoss, contrastive_loss, inter_anchor
from device import DTYPES, auto_dtype, parse_device
from fid import feature_statistics, frechet_distance, inception_score, precision_recall
from mvp import generate_images
from pretrained import CLIP_VOCAB, atomic_save, load_backbone, load_clip, save_backbone, write_json
from update import warmup_cosine_lr
from var import VAR
from vqvae import VQVAE
from world import shapes
from world.shapes import to_input

PATCH_NUMS = (1, 2, 3, 4, 6, 8)  # 8x8 latents of 32 px at 4x downsampling; kappa = floor(0.6 * 6) = 3
KAPPA = inter_anchor(0.6, len(PATCH_NUMS))
VAE_KWARGS = dict(vocab_size=512, z_channels=8, ch=24, ch_mult=(1, 2, 4), num_res_blocks=1, patch_nums=PATCH_NUMS,
                  norm_groups=8)
VAR_KWARGS = dict(vocab_size=512, z_channels=8, depth=4, width=128, num_heads=4, num_classes=shapes.NUM_CLASSES,
                  patch_nums=PATCH_NUMS)
CLIP_CFG = dict(embed_dim=64,
                vision_cfg=dict(image_size=shapes.IMAGE_SIZE, patch_size=4, width=96, layers=3, head_width=32),
                text_cfg=dict(context_length=20, vocab_size=49408, width=64, heads=2, layers=2))
GATES = {'judge': 'G0_met', 'vqvae': 'G1_met', 'clip': 'G2_met', 'var': 'G3_met'}


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


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:  # images in [-1, 1] -> PSNR in dB on the [0, 1] scale
    mse = ((a - b) / 2).square().mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def set_lr(opt, lr: float):
    for group in opt.param_groups:
        group['lr'] = lr


def to_pixels(x_B3HW: torch.Tensor) -> np.ndarray:
    """[-1, 1] images -> (B, H, W, 3) float in [0, 255]: what shapes.train_judge reads, like a render."""
    return ((x_B3HW.float().clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).cpu().numpy()


class Resumable:
    """A stage's training state (model, optimizer, step, RNGs, training seconds so far) in OUT/resume/STAGE.pt every
    `every` steps, written atomically; a rerun of the stage continues from it, and a finished stage deletes it. The
    stage's seconds count every run, not only the last."""

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


def autocast(args):
    """bf16 autocast for the CLIP and VAR stages where --dtype resolved to bf16; the VQVAE always trains in fp32."""
    return torch.autocast(args.device.type, dtype=torch.bfloat16) if args.dtype == torch.bfloat16 else nullcontext()


# -----------------------------------------------------------------------------
# the judge, and G0: what the renders hold at kappa's resolution


def train_judge_stage(args):
    t0 = time.time()
    images, items = shapes.rendered('train', args.judge_n, args.seed + 1)
    judge = shapes.train_judge(images, items, args.judge_epochs, args.seed,
                               log=lambda e, n, loss: log('judge', e, n, t0, loss=loss))
    shapes.save_judge(judge, os.path.join(args.out, 'judge.pth'))
    shapes.picture(shapes.make_split('train', 40, args.seed)).save(os.path.join(args.out, 'renders.png'))
    write_report(args.out, 'judge', {**evaluate_judge(args, (images, items)), 'steps': args.judge_epochs,
                                     'seconds': round(time.time() - t0)})


def evaluate_judge(args, train=None) -> dict:
    """The judge's accuracy per attribute on held-out renders, and G0 (shapes.gate0)."""
    images, items = train or shapes.rendered('train', args.judge_n, args.seed + 1)
    test_images, test_items = shapes.rendered('test', args.gate_n, args.seed + 1)
    judge = shapes.load_judge(args.out)
    return shapes.gate0(images, items, test_images, test_items, judge, args.judge_epochs, args.seed)


# -----------------------------------------------------------------------------
# the VQVAE, and G1: what its tokens hold


def coarse_partial_sums(quantizer, f: torch.Tensor, scale_B: torch.Tensor) -> torch.Tensor:
    """f_hat_k for one coarse scale k per image (scale_B, 0-based, < K - 1) of latents f (B, Cvae, h, w), carrying the
    gradient of the codes and phis that make it, plus the encoder's straight-through at that scale's resolution (as VQ
    passes the full sum's gradient to f)."""
    f_hats = quantizer.residual_quantize(f)[1]
    batch = torch.arange(len(f), device=f.device)
    f_hat_k = torch.stack(f_hats[:-1])[scale_B, batch]  # (B, Cvae, h, w)
    low_k = torch.stack([F.interpolate(F.adaptive_avg_pool2d(f, pn), size=f.shape[-2:], mode='bicubic')
                         for pn in quantizer.patch_nums[:-1]])[scale_B, batch]  # f as scales 1..k can hold it
    return f_hat_k + (low_k - low_k.detach())


def coarse_targets(x: torch.Tensor, scale_B: torch.Tensor, vae) -> torch.Tensor:
    """Each image (B, 3, H, W) as scale k can draw it (scale_B, 0-based): low-passed to the pixels pn x pn tokens cover
    at the last scale's density (as G0's view at kappa), bicubic back up."""
    rows = []
    for b, k in enumerate(scale_B.tolist()):
        small = shapes.low_pass(x[b:b + 1], vae.patch_nums[k] * vae.downsample)
        rows.append(F.interpolate(small, size=x.shape[-2:], mode='bicubic', align_corners=False).clamp(-1, 1))
    return torch.cat(rows)


def reconstruction_error(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return ((rec - x).abs() + (rec - x).square()).mean()


@torch.no_grad()
def refill_dead_codes(vae, x: torch.Tensor):
    """Codes no scale used lately take the residuals the scales together explain worst."""
    dead = vae.quantize.ema_vocab_hit_SV.sum(0) < 1e-3
    if not dead.any():
        return
    f = vae.quant_conv(vae.encoder(x))
    f_hats = vae.quantize.residual_quantize(f)[1]
    flat = lambda t: t.permute(0, 2, 3, 1).reshape(-1, vae.Cvae)  # (B, C, h, w) -> (B*h*w, C)
    worst = flat(f - f_hats[-1]).norm(dim=1).topk(min(int(dead.sum()), len(flat(f)))).indices
    picks = flat(f - f_hats[-2])[worst]  # there, the residual the last scale had to quantize
    vae.quantize.embedding.weight[dead.nonzero()[:len(picks), 0]] = picks
    vae.quantize.ema_vocab_hit_SV[:, dead] = 1.0


def train_vqvae(args):
    """The multi-scale VQVAE on the reconstruction loss, VQ's, and a partial-sum loss: for a share of the batch one
    coarse partial sum per image, decoded, against the image as that scale can draw it, so the coarse scales hold a
    coarse image, the class's silhouette included, not the background alone (as the previous world's tokenizer did:
    docs/shapes_world.md)."""
    torch.manual_seed(args.seed)
    device = args.device
    train_images = torch.as_tensor(shapes.rendered('train', args.n_train, args.seed)[0], device=device)
    vae_kwargs = dict(VAE_KWARGS, ch=args.vae_ch)
    vae = VQVAE(**vae_kwargs).to(device).train()
    opt = torch.optim.Adam(vae.parameters(), lr=args.vae_lr)
    steps, B = args.vae_steps, args.vae_batch
    rng = np.random.default_rng(args.seed)
    resume = Resumable(args.out, 'vqvae', args.ckpt_every)
    for step in range(resume.restore(vae, opt, rng), steps):
        set_lr(opt, warmup_cosine_lr(step, steps, args.vae_lr, 100, 0.05))  # every stage decays to 5%
        x = to_input(train_images[torch.from_numpy(rng.integers(0, len(train_images), B)).to(device)])
        f = vae.quant_conv(vae.encoder(x))
        f_hat, vq_loss, _ = vae.quantize(f)
        n_coarse = max(1, round(B * args.vae_coarse_share))  # the first images of the batch also decode a partial sum
        scale_B = torch.from_numpy(rng.integers(0, len(PATCH_NUMS) - 1, n_coarse)).to(device)
        f_coarse = coarse_partial_sums(vae.quantize, f[:n_coarse], scale_B)
        rec, coarse = vae.decoder(vae.post_quant_conv(torch.cat((f_hat, f_coarse)))).split((B, n_coarse))
        coarse_loss = reconstruction_error(coarse, coarse_targets(x[:n_coarse], scale_B, vae))
        loss = reconstruction_error(rec, x) + vq_loss + args.vae_coarse_weight * coarse_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 99:
            refill_dead_codes(vae, x)
        if step % args.log_every == 0 or step == steps - 1:
            log('vqvae', step, steps, resume.start, loss=loss.item(), vq=vq_loss.item(), coarse=coarse_loss.item(),
                psnr=psnr(rec.clamp(-1, 1), x), usage=vae.quantize.codebook_usage())
        resume.maybe_save(step + 1, steps, vae, opt, rng)
    save_backbone(args.out, vae.cpu().eval(), vae_kwargs, VAR(**VAR_KWARGS), VAR_KWARGS)  # a placeholder VAR until --stage var
    resume.finish()
    write_report(args.out, 'vqvae', {**evaluate_vqvae(args), 'steps': steps, 'seconds': resume.seconds()})


@torch.no_grad()
def decoded_up_to(vae, x: torch.Tensor, k: int, chunk: int = 250) -> torch.Tensor:
    """Images (N, 3, H, W) -> their own tokens up to scale k (1-based), decoded: I_sen's floor at k = kappa."""
    return torch.cat([vae.fhat_to_img(vae.img_to_partial_sums(x[i:i + chunk])[k - 1]).float().clamp(-1, 1)
                      for i in range(0, len(x), chunk)])


@torch.no_grad()
def tokenise(vae, images: np.ndarray, device, chunk: int = 500) -> list:
    """(N, H, W, 3) uint8 images -> their token maps, a list of (N, pn*pn) per scale."""
    return [torch.cat(maps) for maps in zip(*[vae.img_to_idx(to_input(images[i:i + chunk], device))
                                              for i in range(0, len(images), chunk)])]


def evaluate_vqvae(args) -> dict:
    """G1 on held-out renders: PSNR; every attribute the judge reads in the renders kept in the reconstructions; and
    the class named from the decoded own tokens up to kappa by a judge-architecture network trained on such decodes
    of training renders (what the coarse tokens hold, not how blurry they look)."""
    device = args.device
    vae, _ = load_backbone(args.out, device=device)
    judge = shapes.load_judge(args.out).to(device)
    images, items = shapes.rendered('test', args.gate_n, args.seed + 1)
    x = to_input(images, device)
    with torch.no_grad():
        rec = torch.cat([vae.reconstruct(x[i:i + 250]).float().clamp(-1, 1) for i in range(0, len(x), 250)])
    report = {'heldout_psnr_db': round(psnr(rec, x), 2), 'codebook_usage': round(vae.quantize.codebook_usage(), 3),
              'judge_on_renders': shapes.accuracies(judge, x, items),
              'judge_on_reconstructions': shapes.accuracies(judge, rec, items)}
    train_images, train_items = shapes.rendered('train', args.judge_n // 2, args.seed + 3)
    coarse_train = to_pixels(decoded_up_to(vae, to_input(train_images, device), KAPPA))
    coarse_judge = shapes.train_judge(coarse_train, train_items, args.judge_epochs, args.seed).to(device)
    report['kappa'] = KAPPA
    report['own_tokens_at_kappa'] = shapes.accuracies(coarse_judge, decoded_up_to(vae, x, KAPPA), items)
    report['G1_psnr'] = report['heldout_psnr_db'] >= 30
    report['G1_class_at_kappa'] = report['own_tokens_at_kappa']['shape'] >= 0.80
    report['G1_attributes_kept'] = min(report['judge_on_reconstructions'].values()) >= 0.95
    report['G1_met'] = report['G1_psnr'] and report['G1_class_at_kappa'] and report['G1_attributes_kept']
    return report


# -----------------------------------------------------------------------------
# the CLIP the semantic loss uses, and G2


def world_merges(tokenizer) -> list:
    """open_clip's BPE merges, in its order, that can apply inside a word of the world's texts: with these alone BPE
    tokenises those words exactly as with all 48,894 (it takes the lowest-ranked applicable merge at each step)."""
    pieces = [''.join(tokenizer.byte_encoder[b] for b in w.encode()) + '</w>' for w in shapes.world_words()]
    ranked = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    return [m for m in ranked if any(''.join(m) in piece for piece in pieces)]


def save_clip(model, tokenizer, folder: str):
    """The CLIP in open_clip's local-dir layout (fp16), with a vocabulary of the world's own words: byte-level tokens,
    the merges the world's words need (world_merges, written as open_clip's vocabulary file) and the two special
    tokens, and those tokens' embedding rows; on the world's texts the model computes exactly what it did."""
    from safetensors.torch import save_file
    merges = world_merges(tokenizer)
    byte_tokens = list(tokenizer.byte_encoder.values())
    vocab = byte_tokens + [t + '</w>' for t in byte_tokens] + [''.join(m) for m in merges] + \
        ['<start_of_text>', '<end_of_text>']  # open_clip's SimpleTokenizer order
    state = model.state_dict()
    state['token_embedding.weight'] = state['token_embedding.weight'][[tokenizer.encoder[t] for t in vocab]]
    cfg = {**CLIP_CFG, 'text_cfg': {**CLIP_CFG['text_cfg'], 'vocab_size': len(vocab)}}
    part = os.path.normpath(folder) + '.part'  # renamed to `folder` when whole: no reader sees half a CLIP
    shutil.rmtree(part, ignore_errors=True)
    os.makedirs(part)
    with gzip.open(os.path.join(part, CLIP_VOCAB), 'wt', encoding='utf-8') as f:
        f.write('\n'.join(['#version: 0.2'] + [' '.join(m) for m in merges]))  # no trailing newline: no empty merge
    with open(os.path.join(part, 'open_clip_config.json'), 'w') as f:
        json.dump({'model_cfg': cfg, 'preprocess_cfg': {'mean': [0.5] * 3, 'std': [0.5] * 3}}, f, indent=1)
    save_file({k: v.half().contiguous() for k, v in state.items()}, os.path.join(part, 'open_clip_model.safetensors'))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(part, folder)


@torch.no_grad()
def as_coarse_decodes(vae, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Images (B, 3, H, W) as the frozen VQVAE draws them from their own tokens up to a scale from kappa to K - 1
    (one per image): the kind of image the semantic loss shows CLIP (I_sen, Eq. 7). A real CLIP has seen millions of
    poor photos; this one would otherwise see only clean renders."""
    f_hats = torch.stack(vae.img_to_partial_sums(x))  # (K, B, Cvae, h, w)
    scale_B = torch.from_numpy(rng.integers(KAPPA - 1, len(PATCH_NUMS) - 1, len(x))).to(x.device)
    return vae.fhat_to_img(f_hats[scale_B, torch.arange(len(x), device=x.device)]).float().clamp(-1, 1)


def train_clip(args):
    import open_clip
    torch.manual_seed(args.seed)
    device = args.device
    vae = load_backbone(args.out, device=device)[0].requires_grad_(False)
    train_images, train_items = shapes.rendered('train', args.n_train, args.seed + 2)
    train_images = torch.as_tensor(train_images, device=device)
    model = open_clip.model.CLIP(**CLIP_CFG).to(device).train()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CLIP_CFG['text_cfg']['context_length'])
    opt = torch.optim.AdamW(model.parameters(), lr=args.clip_lr, weight_decay=0.1, betas=(0.9, 0.98))
    steps, B = args.clip_steps, args.clip_batch
    rng = np.random.default_rng(args.seed)
    resume = Resumable(args.out, 'clip', args.ckpt_every)
    for step in range(resume.restore(model, opt, rng), steps):
        set_lr(opt, warmup_cosine_lr(step, steps, args.clip_lr, 100, 0.05))  # every stage decays to 5%
        pick = rng.integers(0, len(train_items), B)
        # captions mostly, sentences sometimes: the semantic loss asks CLIP about both levels of text
        texts = [shapes.caption(train_items[i]) if rng.random() < 0.75 else shapes.sentence(train_items[i]['label'])
                 for i in pick]
        x = to_input(train_images[torch.from_numpy(pick).to(device)])
        x = torch.cat((as_coarse_decodes(vae, x[:B // 4], rng), x[B // 4:]))  # a quarter as the VQVAE decodes them
        with autocast(args):
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
    """G2: top-1 image-to-caption retrieval among n held-out captions, right where the caption found names the image's
    own shape, colour, texture and background (a few held-out items share all four and differ only in phrasing, so
    which of their captions is found is a coin flip; the exact caption's share is reported beside it); and how often it
    names the class ("a photo of a {class}", of 10) of held-out images' own tokens up to kappa, decoded (I_sen's
    floor)."""
    device = args.device
    clip = FrozenClip(*load_clip(os.path.join(args.out, 'clip'), device=device)).to(device)
    images, items = shapes.rendered('test', n, args.seed + 2)
    sims = clip.encode_image(to_input(images, device)) @ clip.encode_text([shapes.caption(a) for a in items]).T
    found = sims.argmax(1).cpu()
    values_NA = shapes.targets(items)  # each item's value per attribute: equal rows, captions naming the same things
    same_NN = (values_NA[:, None] == values_NA[None]).all(-1)
    report = {'image_to_caption_top1': round(same_NN[torch.arange(n), found].float().mean().item(), 3),
              'image_to_caption_top1_exact': round((found == torch.arange(n)).float().mean().item(), 3),
              'captions_sharing_their_attributes': int((same_NN.sum(1) > 1).sum()), 'captions': n}
    vae, _ = load_backbone(args.out, device=device)
    images, items = shapes.rendered('test', args.gate_n, args.seed + 1)
    labels = torch.tensor([a['label'] for a in items], device=device)
    sentences = clip.encode_text([shapes.sentence(c) for c in range(shapes.NUM_CLASSES)])  # (10, D)
    names = lambda imgs: round(((clip.encode_image(imgs) @ sentences.T).argmax(1) == labels).float().mean().item(), 3)
    report['names_class_of_renders'] = names(to_input(images, device))
    report['names_class_at_kappa'] = names(decoded_up_to(vae, to_input(images, device), KAPPA))
    report['G2_met'] = report['image_to_caption_top1'] >= 0.90 and report['names_class_at_kappa'] >= 0.70
    return report


# -----------------------------------------------------------------------------
# the VAR, and G3


def var_training_tokens(args, vae):
    """The VAR's training set as token maps (a list of (N, pn*pn)) and labels (N,), tokenised once and kept beside the
    stage's resume state until the stage ends, for the same --n_train, --seed and vqvae.pth."""
    with open(os.path.join(args.out, 'vqvae.pth'), 'rb') as f:
        key = {'n_train': args.n_train, 'seed': args.seed, 'vqvae_sha256': hashlib.sha256(f.read()).hexdigest()}
    path = os.path.join(args.out, 'resume', 'var_tokens.pt')
    if os.path.isfile(path):
        saved = torch.load(path, map_location='cpu', weights_only=True)
        if saved['key'] == key:
            return [m.to(args.device).long() for m in saved['idx']], saved['labels'].to(args.device)
    images, items = shapes.rendered('train', args.n_train, args.seed)
    idx, labels = tokenise(vae, images, args.device), torch.tensor([a['label'] for a in items], device=args.device)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_save({'key': key, 'idx': [m.cpu().int() for m in idx], 'labels': labels.cpu()}, path)
    return idx, labels


def train_var(args):
    torch.manual_seed(args.seed)
    device = args.device
    vae, _ = load_backbone(args.out, device=device)
    with open(os.path.join(args.out, 'backbone.json')) as f:
        vae_kwargs = json.load(f)['vqvae']
    idx_all, labels = var_training_tokens(args, vae)
    var = VAR(**VAR_KWARGS).to(device).train()
    decay = [p for n, p in var.named_parameters() if p.ndim >= 2 and 'emb' not in n and 'pos' not in n]
    no_decay = [p for n, p in var.named_parameters() if not (p.ndim >= 2 and 'emb' not in n and 'pos' not in n)]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.05}, {'params': no_decay, 'weight_decay': 0.0}],
                            lr=args.var_lr, betas=(0.9, 0.95))
    steps, B = args.var_steps, args.var_batch
    rng = np.random.default_rng(args.seed)
    resume = Resumable(args.out, 'var', args.ckpt_every)
    for step in range(resume.restore(var, opt, rng), steps):
        set_lr(opt, warmup_cosine_lr(step, steps, args.var_lr, 100, 0.05))  # every stage decays to 5%
        pick = torch.from_numpy(rng.integers(0, len(labels), B)).to(device)
        idx = [m[pick] for m in idx_all]
        with torch.no_grad():
            x_BLCv = vae.quantize.teacher_forcing_input(idx)
        with autocast(args):
            logits = var(var.class_condition(labels[pick], drop=True), x_BLCv)
            loss = F.cross_entropy(logits.view(-1, var.vocab_size).float(), torch.cat(idx, dim=1).view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        opt.step()
        if step % args.log_every == 0 or step == steps - 1:
            log('var', step, steps, resume.start, loss=loss.item())
        resume.maybe_save(step + 1, steps, var, opt, rng)
    save_backbone(args.out, vae.cpu(), vae_kwargs, var.cpu().eval(), VAR_KWARGS)
    resume.finish()
    os.remove(os.path.join(args.out, 'resume', 'var_tokens.pt'))
    write_report(args.out, 'var', {**evaluate_var(args), 'steps': steps, 'seconds': resume.seconds()})


@torch.no_grad()
def evaluate_var(args) -> dict:
    """G3: class-conditional samples (cfg, top-k, top-p as given) recognised by the judge; FD_judge of the samples
    and of VQVAE reconstructions against held-out renders (the reconstructions' FD is the floor the tokens set);
    IS_judge, precision and recall in the judge's space; and the sentence loss on the untuned VAR's teacher-forced
    I_sen against the guessing level log(batch), with I_sen's first scale the image's own and the predicted one."""
    device = args.device
    vae, var = load_backbone(args.out, device=device)
    judge = shapes.load_judge(args.out).to(device)
    n = args.gate_n
    labels = torch.arange(n, device=device) % shapes.NUM_CLASSES  # interleaved: each of IS's 10 splits holds every class
    samples = torch.cat([generate_images(vae, var, None, None, labels=labels[i:i + 250], cfg_scale=args.cfg,
                                         top_k=args.top_k, top_p=args.top_p, seed=i)
                         for i in range(0, len(labels), 250)]) * 2 - 1  # (N, 3, H, W) in [-1, 1]
    reference = to_input(shapes.rendered('test', len(labels), args.seed + 1)[0], device)
    other = to_input(shapes.rendered('test', len(labels), args.seed + 4)[0], device)  # not the reference renders
    with torch.no_grad():
        rec = torch.cat([vae.reconstruct(other[i:i + 250]).float().clamp(-1, 1) for i in range(0, len(other), 250)])
    (ref_feats, _), (sample_feats, sample_logits), (rec_feats, _) = (shapes.judged(judge, x)
                                                                      for x in (reference, samples, rec))
    fd = lambda feats: round(frechet_distance(*feature_statistics(feats), *feature_statistics(ref_feats)), 3)
    precision, recall = precision_recall(ref_feats, sample_feats)
    report = {'samples': len(labels), 'cfg': args.cfg, 'top_k': args.top_k, 'top_p': args.top_p,
              'class_recognised': round(float((sample_logits.argmax(1) == labels.cpu().numpy()).mean()), 3),
              'fd_judge_samples': fd(sample_feats), 'fd_judge_reconstructions': fd(rec_feats),
              'is_judge': round(inception_score(sample_logits)[0], 2),
              'precision': round(precision, 3), 'recall': round(recall, 3)}
    report['fd_ratio'] = round(report['fd_judge_samples'] / max(report['fd_judge_reconstructions'], 1e-9), 2)
    (report['sentence_loss_own_first_map'], report['sentence_loss_predicted_first_map'],
     report['guessing_level']) = sentence_loss(args, vae, var)
    report['G3_recognised'] = report['class_recognised'] >= 0.90
    report['G3_fd'] = report['fd_ratio'] <= 1.5
    # the gate on class-to-image's path, the one the sentence "a photo of a {class}" is made for
    report['G3_sentence_level'] = report['sentence_loss_own_first_map'] < 0.8 * report['guessing_level']
    report['G3_met'] = report['G3_recognised'] and report['G3_fd'] and report['G3_sentence_level']
    return report


@torch.no_grad()
def sentence_loss(args, vae, var, batch: int = 16, batches: int = 10):
    """The sentence level of Eq. 8 on the untuned VAR's teacher-forced I_sen (soft tokens at T = 1, train.py's
    default), over batches of held-out renders, in train.py's two ways: with the image's own first-scale map, as
    class-to-image training decodes it, and with the predicted one, as text-to-image's; and log(batch): a level near
    it has no signal for MVP to follow."""
    clip = FrozenClip(*load_clip(os.path.join(args.out, 'clip'), device=args.device)).to(args.device)
    semantic = SemanticLoss(clip, vae, beta=0.6, lambda_sen=1.0, lambda_cap=0.0)
    images, items = shapes.rendered('test', batch * batches, args.seed + 5)
    own_first, predicted_first = [], []
    for i in range(0, len(items), batch):
        part = items[i:i + batch]
        idx = vae.img_to_idx(to_input(images[i:i + batch], args.device))
        labels = torch.tensor([a['label'] for a in part], device=args.device)
        logits = var(var.class_emb(labels), vae.quantize.teacher_forcing_input(idx)).float()
        texts = [shapes.sentence(a['label']) for a in part], [shapes.caption(a) for a in part]
        own_first.append(semantic(logits, *texts, idx[0])['sen'].item())
        predicted_first.append(semantic(logits, *texts)['sen'].item())
    return round(float(np.mean(own_first)), 3), round(float(np.mean(predicted_first)), 3), round(math.log(batch), 3)


# -----------------------------------------------------------------------------


STAGES = {'judge': (train_judge_stage, evaluate_judge), 'vqvae': (train_vqvae, evaluate_vqvae),
          'clip': (train_clip, evaluate_clip), 'var': (train_var, evaluate_var)}  # in the order they run
READS = {'judge': (), 'vqvae': ('judge.pth',), 'clip': ('judge.pth', 'backbone.json', 'vqvae.pth', 'var.pth'),
         'var': ('judge.pth', 'backbone.json', 'vqvae.pth', 'var.pth', 'clip')}  # (vqvae writes a placeholder VAR)
WRITES = {'judge': ('judge.pth',), 'vqvae': ('backbone.json', 'vqvae.pth', 'var.pth'), 'clip': ('clip',),
          'var': ('var.pth',)}
POSITIVE = ('n_train', 'judge_n', 'judge_epochs', 'gate_n', 'vae_ch', 'vae_steps', 'vae_batch', 'vae_lr', 'clip_steps',
            'clip_batch', 'clip_lr', 'var_steps', 'var_batch', 'var_lr', 'ckpt_every', 'log_every')


def input_error(args, stages) -> str:
    """What is wrong with the flags or --out for these stages, in one line, or '' (checked before any work)."""
    try:
        parse_device(args.device)
    except ValueError as e:
        return str(e)
    for name in POSITIVE:
        if not getattr(args, name) > 0:
            return f'--{name} must be positive, got {getattr(args, name)}'
    if args.gate_n % shapes.NUM_CLASSES:
        return f'--gate_n must be a multiple of {shapes.NUM_CLASSES} (the same number of samples per class), got {args.gate_n}'
    if not 0 < args.vae_coarse_share <= 1:
        return f'--vae_coarse_share must be in (0, 1], got {args.vae_coarse_share}'
    if args.vae_coarse_weight < 0:
        return f'--vae_coarse_weight must be 0 or more, got {args.vae_coarse_weight}'
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        return f'--out {args.out} is a file, not a folder'
    have = set(os.listdir(args.out)) if os.path.isdir(args.out) else set()
    for stage in stages:
        needed = READS[stage] + (WRITES[stage] if args.evaluate else ())
        missing = [name for name in needed if name not in have]
        if missing:
            return (f'--stage {stage}{" --evaluate" if args.evaluate else ""}: no {", ".join(missing)} in --out '
                    f'{args.out}; run the stages before it first (order: {", ".join(STAGES)})')
        have.update(WRITES[stage])
    return ''


def finished(out: str, stage: str) -> dict:
    """The stage's report if it trained to the end, else {}."""
    path = os.path.join(out, f'report_{stage}.json')
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        report = json.load(f)
    return report if 'steps' in report else {}


def main(argv=None):
    p = argparse.ArgumentParser(description='Pretrain the shapes world\'s backbone (judge, VQVAE, CLIP, VAR).',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--stage', default='all', choices=('all', *STAGES))
    p.add_argument('--out', default='checkpoints/shapes')
    p.add_argument('--n_train', type=int, default=50000, help='training renders of the VQVAE, CLIP and VAR stages')
    p.add_argument('--judge_n', type=int, default=20000, help='training renders of the judge (and of G0\'s and G1\'s '
                   'networks: G1 trains on half as many decodes)')
    p.add_argument('--judge_epochs', type=int, default=15)
    p.add_argument('--gate_n', type=int, default=1000, help='held-out renders (and samples) each gate measures')
    p.add_argument('--vae_steps', type=int, default=6000)
    p.add_argument('--vae_batch', type=int, default=32)
    p.add_argument('--vae_lr', type=float, default=1e-3)
    p.add_argument('--vae_ch', type=int, default=24, help='the VQVAE\'s base width (channels ch, 2ch, 4ch)')
    p.add_argument('--vae_coarse_weight', type=float, default=0.2, help='weight of the partial-sum loss')
    p.add_argument('--vae_coarse_share', type=float, default=0.25, help='share of a batch that also decodes a partial sum')
    p.add_argument('--clip_steps', type=int, default=2000)
    p.add_argument('--clip_batch', type=int, default=256)
    p.add_argument('--clip_lr', type=float, default=1e-3)
    p.add_argument('--var_steps', type=int, default=3000)
    p.add_argument('--var_batch', type=int, default=128)
    p.add_argument('--var_lr', type=float, default=1e-3)
    p.add_argument('--cfg', type=float, default=1.5, help='guidance of G3\'s samples')
    p.add_argument('--top_k', type=int, default=0, help='top-k of G3\'s samples (0: all)')
    p.add_argument('--top_p', type=float, default=0.96, help='top-p of G3\'s samples')
    p.add_argument('--device', default='auto', help='auto (CUDA if available), cpu, cuda, ...')
    p.add_argument('--dtype', default='auto', choices=('auto', 'fp32', 'bf16'), help='autocast of the CLIP and VAR '
                   'stages; auto: bf16 on CUDA and on CPUs with bf16 matrix units, else fp32')
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    p.add_argument('--ckpt_every', type=int, default=250, help='save the stage\'s training state every N steps')
    p.add_argument('--log_every', type=int, default=100)
    p.add_argument('--keep_going', action='store_true', help='run the next stage even where a gate failed')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--evaluate', action='store_true', help='train nothing: measure the saved files\' gates again')
    args = p.parse_args(argv)
    stages = tuple(STAGES) if args.stage == 'all' else (args.stage,)
    error = input_error(args, stages)
    if error:
        sys.exit(f'error: {error}')
    args.device = parse_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = DTYPES[args.dtype] if args.dtype != 'auto' else \
        (torch.bfloat16 if auto_dtype(args.device) == torch.bfloat16 else torch.float32)
    os.makedirs(args.out, exist_ok=True)
    for stage in stages:
        train, evaluate = STAGES[stage]
        report = finished(args.out, stage) if args.stage == 'all' and not args.evaluate else {}
        if report:
            print(f'[{stage}] finished earlier (report_{stage}.json)', flush=True)
        elif args.evaluate:
            report = evaluate(args)
            write_report(args.out, stage, report)
        else:
            train(args)
            report = finished(args.out, stage)
        if not report.get(GATES[stage]) and not args.keep_going and stage != stages[-1]:
            sys.exit(f'[{stage}] gate {GATES[stage][:2]} missed (report_{stage}.json): the build stops here '
                     f'(--keep_going runs on)')


if __name__ == '__main__':
    main()
