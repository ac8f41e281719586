"""
Pretrain the shapes world's tiny backbone from scratch with the project's own code, on the CPU.

MVP tunes a *pretrained* VAR. The released one needs a GPU and ImageNet; this script makes a small stand-in
that runs anywhere: a multi-scale VQVAE, a class-conditional VAR and a CLIP, all on shapes.py's world
(64x64 images, 8x8 latents, scales 1,2,3,4,5,6,8), plus the shape classifier that scores generated images.

    python pretrain.py --stage vqvae       # then var (needs the VQVAE); clip and classifier are independent
    python pretrain.py --stage all         # everything, in order

Writes OUT/backbone.json, vqvae.pth, var.pth (fp16), clip/ (open_clip's local-dir layout), shape_classifier.pth
and report_<stage>.json with the quality gates measured on held-out images:
  VQVAE reconstruction PSNR, VAR samples recognised as their class, CLIP image-to-caption top-1 among 100.
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

import shapes
from clip_loss import contrastive_loss
from pretrained import load_backbone, save_backbone
from var import VAR
from vqvae import VQVAE

IMAGE_SIZE = 64
PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8)
VAE_KWARGS = dict(vocab_size=512, z_channels=16, ch=16, ch_mult=(1, 2, 4, 8), num_res_blocks=1, patch_nums=PATCH_NUMS)
VAR_KWARGS = dict(vocab_size=512, z_channels=16, depth=4, width=128, num_heads=2, num_classes=shapes.NUM_CLASSES,
                  patch_nums=PATCH_NUMS)
CLIP_CFG = dict(embed_dim=64,
                vision_cfg=dict(image_size=IMAGE_SIZE, patch_size=8, width=128, layers=4, head_width=32),
                text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=3))


def rendered(split: str, n: int, seed: int = 0):
    """(images uint8 (N, H, W, 3), the attribute dicts) of a split, rendered once."""
    items = shapes.make_split(split, n, seed)
    return np.stack([shapes.render(a, IMAGE_SIZE) for a in items]), items


def to_input(images_uint8: np.ndarray) -> torch.Tensor:  # (B, H, W, 3) uint8 -> (B, 3, H, W) in [-1, 1]
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1


def cosine_lr(step: int, total: int, lr: float, warmup: int = 100) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:  # images in [-1, 1] -> PSNR in dB on the [0, 1] scale
    mse = ((a - b) / 2).square().mean().item()
    return 10 * math.log10(1 / max(mse, 1e-12))


def log(stage: str, step: int, total: int, t0: float, **values):
    print(f'[{stage}] step {step}/{total} ' + ' '.join(f'{k} {v:.4f}' for k, v in values.items())
          + f' ({time.time() - t0:.0f}s)', flush=True)


def write_report(out: str, stage: str, report: dict):
    with open(os.path.join(out, f'report_{stage}.json'), 'w') as f:
        json.dump(report, f, indent=1)
    print(f'[{stage}] report: {json.dumps(report)}', flush=True)


# -----------------------------------------------------------------------------


def train_vqvae(args):
    torch.manual_seed(args.seed)
    train_images, _ = rendered('train', args.n_train, args.seed)
    vae = VQVAE(**VAE_KWARGS).train()
    opt = torch.optim.Adam(vae.parameters(), lr=args.vae_lr, betas=(0.5, 0.9))
    steps, B, t0 = args.vae_steps, 32, time.time()
    rng = np.random.default_rng(args.seed)
    for step in range(steps):
        for g in opt.param_groups:
            g['lr'] = cosine_lr(step, steps, args.vae_lr)
        x = to_input(train_images[rng.integers(0, len(train_images), B)])
        rec, vq_loss, idx = vae(x)
        # the shape covers 1.5-8% of the image: weight its pixels up, or the background's error swamps it
        border = torch.cat((x[:, :, 0], x[:, :, -1]), dim=2).median(dim=2).values[:, :, None, None]  # (B, 3, 1, 1)
        weight = 1 + 9 * ((x - border).abs().amax(dim=1, keepdim=True) > 0.2).float()  # (B, 1, H, W)
        error = (rec - x).abs() + (rec - x).square()
        loss = (weight * error).mean() / weight.mean() + vq_loss
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
            log('vqvae', step, steps, t0, loss=loss.item(), vq=vq_loss.item(), psnr=psnr(rec.clamp(-1, 1), x),
                usage=vae.quantize.codebook_usage())
    save_backbone(args.out, vae.eval(), VAE_KWARGS, VAR(**VAR_KWARGS), VAR_KWARGS)  # a placeholder VAR until --stage var
    report = {**evaluate_vqvae(args.out, args.seed), 'steps': steps, 'seconds': round(time.time() - t0)}
    write_report(args.out, 'vqvae', report)


@torch.no_grad()
def evaluate_vqvae(out: str, seed: int, n: int = 256) -> dict:
    """The saved (fp16-rounded) VQVAE on n held-out renders: PSNR, and whether the shape kind survives the tokens."""
    vae, _ = load_backbone(out)
    images, items = rendered('test', n, seed)
    x = to_input(images)
    rec = torch.cat([vae.reconstruct(x[i:i + 64]) for i in range(0, len(x), 64)])
    report = {'heldout_psnr_db': round(psnr(rec, x), 2), 'codebook_usage': round(vae.quantize.codebook_usage(), 3)}
    if os.path.exists(os.path.join(out, 'shape_classifier.pth')):
        classifier, labels = shapes.load_shape_classifier(out), torch.tensor([a['label'] for a in items])
        report['recon_shape_recognised'] = round((classifier(rec).argmax(1) == labels).float().mean().item(), 3)
    return report


def train_var(args):
    torch.manual_seed(args.seed)
    vae, _ = load_backbone(args.out)
    train_images, train_items = rendered('train', args.n_train, args.seed)
    labels = torch.tensor([a['label'] for a in train_items])
    t0 = time.time()
    with torch.no_grad():  # the VQVAE is frozen: tokenise the training set once
        idx_all = [torch.cat(maps) for maps in zip(*[vae.img_to_idx(to_input(train_images[i:i + 256]))
                                                    for i in range(0, len(train_images), 256)])]
    print(f'[var] tokenised {len(train_images)} images in {time.time() - t0:.0f}s', flush=True)
    var = VAR(**VAR_KWARGS).train()
    classifier = shapes.load_shape_classifier(args.out)
    decay = [p for n, p in var.named_parameters() if p.ndim >= 2 and 'emb' not in n and 'pos' not in n]
    no_decay = [p for n, p in var.named_parameters() if not (p.ndim >= 2 and 'emb' not in n and 'pos' not in n)]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': 0.05}, {'params': no_decay, 'weight_decay': 0.0}],
                            lr=args.var_lr, betas=(0.9, 0.95))
    steps, B = args.var_steps, 64
    rng = np.random.default_rng(args.seed)
    for step in range(steps):
        for g in opt.param_groups:
            g['lr'] = cosine_lr(step, steps, args.var_lr)
        pick = torch.from_numpy(rng.integers(0, len(labels), B))
        idx = [m[pick] for m in idx_all]
        with torch.no_grad():
            x_BLCv = vae.quantize.teacher_forcing_input(idx)
        logits = var(var.class_condition(labels[pick], drop=True), x_BLCv)
        loss = F.cross_entropy(logits.view(-1, var.vocab_size), torch.cat(idx, dim=1).view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(var.parameters(), 2.0)
        opt.step()
        if step % args.log_every == 0 or step == steps - 1:
            log('var', step, steps, t0, loss=loss.item())
        if step % 1000 == 999 and step < steps - 1:  # the learning curve of the gate, on a few samples
            print(f'[var] step {step + 1}: {class_recognised(vae, var.eval(), classifier, args.seed, per_class=10)}', flush=True)
            var.train()
    var.eval()
    save_backbone(args.out, vae, VAE_KWARGS, var, VAR_KWARGS)
    vae, var = load_backbone(args.out)  # the saved (fp16-rounded) model
    report = class_recognised(vae, var, classifier, args.seed)
    write_report(args.out, 'var', {**report, 'steps': steps, 'seconds': round(time.time() - t0)})


@torch.no_grad()
def class_recognised(vae, var, classifier, seed: int, per_class: int = 20, cfg: float = 1.5) -> dict:
    """The fraction of class-conditional samples that the shape classifier names as their class."""
    labels = torch.arange(var.num_classes).repeat_interleave(per_class)
    correct = 0
    for i in range(0, len(labels), 100):
        idx = var.generate(vae, var.class_emb(labels[i:i + 100]), cfg=cfg, top_k=0, top_p=0.0, seed=seed + i)
        images = vae.idx_to_img(idx)
        correct += (classifier(images).argmax(1) == labels[i:i + 100]).sum().item()
    return {'class_recognised': round(correct / len(labels), 3), 'samples': len(labels), 'cfg': cfg}


def train_classifier(args):
    torch.manual_seed(args.seed)
    train_images, train_items = rendered('train', args.n_train, args.seed + 1)
    test_images, test_items = rendered('test', 1000, args.seed + 1)
    labels = torch.tensor([a['label'] for a in train_items])
    model = shapes.ShapeClassifier().train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    steps, B, t0 = args.classifier_steps, 64, time.time()
    rng = np.random.default_rng(args.seed)
    for step in range(steps):
        for g in opt.param_groups:
            g['lr'] = cosine_lr(step, steps, 2e-3)
        pick = rng.integers(0, len(labels), B)
        x = to_input(train_images[pick])
        if step % 2:  # half the batches blurred: generated images are softer than renders
            x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        loss = F.cross_entropy(model(x), labels[pick])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == steps - 1:
            log('classifier', step, steps, t0, loss=loss.item())
    model.eval()
    os.makedirs(args.out, exist_ok=True)
    torch.save(model.state_dict(), os.path.join(args.out, 'shape_classifier.pth'))
    with torch.no_grad():
        x = to_input(test_images)
        pred = torch.cat([model(x[i:i + 250]).argmax(1) for i in range(0, len(x), 250)])
    acc = (pred == torch.tensor([a['label'] for a in test_items])).float().mean().item()
    write_report(args.out, 'classifier', {'heldout_accuracy': round(acc, 3), 'steps': steps, 'seconds': round(time.time() - t0)})


def train_clip(args):
    import open_clip
    from safetensors.torch import save_file
    torch.manual_seed(args.seed)
    train_images, train_items = rendered('train', args.n_train, args.seed + 2)
    model = open_clip.model.CLIP(**CLIP_CFG).train()
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=CLIP_CFG['text_cfg']['context_length'])
    opt = torch.optim.AdamW(model.parameters(), lr=args.clip_lr, weight_decay=0.1, betas=(0.9, 0.98))
    steps, B, t0 = args.clip_steps, 128, time.time()
    rng = np.random.default_rng(args.seed)
    for step in range(steps):
        for g in opt.param_groups:
            g['lr'] = cosine_lr(step, steps, args.clip_lr)
        pick = rng.integers(0, len(train_items), B)
        # captions mostly, sentences sometimes: the semantic loss asks CLIP about both levels of text
        texts = [shapes.caption(train_items[i]) if rng.random() < 0.75 else shapes.sentence(train_items[i]['label'])
                 for i in pick]
        img_feats = F.normalize(model.encode_image(to_input(train_images[pick])), dim=-1)
        txt_feats = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
        loss = contrastive_loss(img_feats, txt_feats, texts, model.logit_scale.exp().clamp(max=100))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.log_every == 0 or step == steps - 1:
            log('clip', step, steps, t0, loss=loss.item(), scale=model.logit_scale.exp().item())
    model.eval()
    folder = os.path.join(args.out, 'clip')
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, 'open_clip_config.json'), 'w') as f:
        json.dump({'model_cfg': CLIP_CFG, 'preprocess_cfg': {'mean': [0.5] * 3, 'std': [0.5] * 3}}, f, indent=1)
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()},
              os.path.join(folder, 'open_clip_model.safetensors'))
    write_report(args.out, 'clip', {**evaluate_clip(args.out, args.seed), 'steps': steps, 'seconds': round(time.time() - t0)})


@torch.no_grad()
def evaluate_clip(out: str, seed: int, n: int = 100) -> dict:
    """Top-1 image-to-caption retrieval among n held-out captions, with the saved (fp16-rounded) model."""
    from clip_loss import FrozenClip, load_clip
    clip = FrozenClip(*load_clip(os.path.join(out, 'clip')))
    images, items = rendered('test', n, seed + 2)
    sims = clip.encode_image(to_input(images)) @ clip.encode_text([shapes.caption(a) for a in items]).T  # (n, n)
    return {'image_to_caption_top1': round((sims.argmax(1) == torch.arange(n)).float().mean().item(), 3), 'captions': n}


def main(argv=None):
    p = argparse.ArgumentParser(description='Pretrain the shapes world backbone (VQVAE, VAR, CLIP, shape classifier).',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--stage', default='all', choices=('all', 'vqvae', 'var', 'clip', 'classifier'))
    p.add_argument('--out', default='checkpoints/shapes')
    p.add_argument('--n_train', type=int, default=20000, help='training images rendered')
    p.add_argument('--vae_steps', type=int, default=2000)
    p.add_argument('--vae_lr', type=float, default=2e-3)
    p.add_argument('--var_steps', type=int, default=3000)
    p.add_argument('--var_lr', type=float, default=2e-3)
    p.add_argument('--clip_steps', type=int, default=900)
    p.add_argument('--clip_lr', type=float, default=1e-3)
    p.add_argument('--classifier_steps', type=int, default=400)
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: torch default)')
    p.add_argument('--log_every', type=int, default=50)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    stages = ('classifier', 'vqvae', 'var', 'clip') if args.stage == 'all' else (args.stage,)
    for stage in stages:
        {'vqvae': train_vqvae, 'var': train_var, 'clip': train_clip, 'classifier': train_classifier}[stage](args)


if __name__ == '__main__':
    main()
