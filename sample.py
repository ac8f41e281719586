"""
Sample from a VAR tuned with MVP, or from the plain VAR.

    python sample.py --text "a striped red heart on a white background"   # the shipped run of the shapes world
    python sample.py --ckpt runs/t2i/ckpt.pt --text "a red fox sitting in fresh snow"
    python sample.py --ckpt runs/mvp/ckpt.pt --class_id 207,360,387      # class-to-image with the MVP prompts
    python sample.py --ckpt runs/mvp/ckpt.pt --class_id 207 --no_prompt  # the same backbone without them
    python sample.py --ckpt runs/mvp --class_id 207                      # the run's prompt folder: the same images
    python sample.py --ckpt user/mvp-d16 --class_id 207                  # a prompt folder shared on the Hugging Face Hub
    python sample.py --depth 16 --class_id 207,360                       # the released VAR, no checkpoint at all
    python sample.py --ckpt runs/mvp/ckpt.pt --eval_npz samples.npz --per_class 50   # ImageNet protocol, 50 per class

A checkpoint holds only what was trained (the prompts, or the LoRA pairs or the VAR of the Table 3 baselines, and
the text projection) and the run's config; the backbone is rebuilt from that config. --ckpt takes train.py's
ckpt.pt, a prompt folder (prompt.safetensors + config.json, which train.py writes beside ckpt.pt), or the id of a
Hugging Face repo holding those two files (looked up in, or downloaded to, the Hugging Face cache); none of them
is unpickled beyond tensors. --eval_npz writes uint8 images (N, H, W, 3) under `arr_0`, the format of the OpenAI
evaluation suite (guided-diffusion's evaluator) and of fid.py.
"""
import argparse
import os
import sys

import numpy as np
import torch
from tqdm import tqdm

from device import DTYPES, auto_dtype, parse_device, set_conv_layout
from mvp import check_sampling, generate_images, load_run
from pretrained import atomic_write, check_writable, load_backbone, save_grid, save_image, to_uint8

SHIPPED_T2I = 'checkpoints/shapes/mvp_t2i'  # what --text uses without --ckpt


def get_args(argv=None):
    p = argparse.ArgumentParser(description='Sample images from VAR with MVP prompts.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--ckpt', default=None, help=f'an MVP run: a ckpt.pt, a prompt folder or a Hugging Face repo id; '
                   f'without one, the plain backbone (or, for --text, {SHIPPED_T2I})')
    p.add_argument('--backbone', default='released', help='without --ckpt: "released" or a backbone folder')
    p.add_argument('--depth', type=int, default=16, help='without --ckpt: the released VAR depth')
    p.add_argument('--cache_dir', default=None, help='a plain folder of the released .pth files '
                   '(default $MVP_CACHE; none: the Hugging Face cache)')
    p.add_argument('--text', action='append', default=None, help='a caption (text-to-image checkpoint); repeat for more')
    p.add_argument('--class_id', default=None, help='comma-separated class indices (class-to-image)')
    p.add_argument('--no_prompt', action='store_true', help='ignore the trained prompts: the plain VAR')
    p.add_argument('--n', type=int, default=4, help='images per text or class')
    p.add_argument('--cfg', type=float, default=1.5, help='classifier-free guidance at the last scale (grows linearly)')
    p.add_argument('--top_k', type=int, default=900)
    p.add_argument('--top_p', type=float, default=0.96)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='samples.png', help='the PNG grid: one row per text or class')
    p.add_argument('--per_image', default=None, help='also write one PNG per image into this folder')
    p.add_argument('--eval_npz', default=None, help='evaluation mode: write --per_class images of every class to this .npz')
    p.add_argument('--per_class', type=int, default=50, help='evaluation mode: images per class')
    p.add_argument('--num_classes', type=int, default=None, help='evaluation mode: the first N classes (default: all)')
    p.add_argument('--batch_size', type=int, default=25)
    p.add_argument('--device', default='auto', help='auto (CUDA if available), cpu, cuda, cuda:1, ...')
    p.add_argument('--dtype', default='auto', choices=('auto', 'fp32', 'bf16', 'fp16'),
                   help='autocast dtype of sampling; auto: bf16 on CUDA and on CPUs with fast bf16 matrix units, else '
                        'fp32 (fp32: the official code\'s samples, bit for bit)')
    return p.parse_args(argv)


def load_models(args, device):
    if args.text and not args.ckpt:  # the shipped text-to-image run of the shapes world
        if not os.path.isdir(SHIPPED_T2I):
            raise ValueError('--text needs a text-to-image checkpoint (--ckpt from train.py --t2i)')
        args.ckpt = SHIPPED_T2I
    if args.ckpt:
        return load_run(args.ckpt, device, cache_dir=args.cache_dir)
    vae, var = load_backbone(args.backbone, args.depth, args.cache_dir, device)
    return {'t2i': False}, vae, var, None, None  # no trained parts: the plain VAR


def check_args(args):
    for name in ('n', 'per_class', 'batch_size'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name} must be at least 1, got {getattr(args, name)}')
    check_sampling(args.cfg, args.top_k, args.top_p)
    if args.text is not None and any(not t.strip() for t in args.text):
        raise ValueError('--text is empty: give a caption, e.g. --text "a striped red heart on a white background"')
    if args.text is None and args.class_id is None and args.eval_npz is None:
        raise ValueError('nothing to sample: pass --text, --class_id or --eval_npz')
    if args.eval_npz:
        check_writable(args.eval_npz, '--eval_npz', create=False)
    else:
        check_writable(args.out, '--out', create=True)
    if args.per_image:
        check_writable(os.path.join(args.per_image, 'x.png'), '--per_image', create=True)


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    device = parse_device(args.device)
    config, vae, var, clip, parts = load_models(args, device)
    if args.no_prompt and config.get('prompt') in ('lora', 'full'):
        raise ValueError(f'--no_prompt: {args.ckpt} was trained with --prompt {config["prompt"]}, which changes the VAR '
                         f'itself; sample the plain backbone with --backbone {config["backbone"]} instead')
    if args.text is not None and not config['t2i']:
        raise ValueError(f'{args.ckpt} is a class-to-image checkpoint: use --class_id, or a checkpoint from train.py --t2i')
    if (args.class_id is not None or args.eval_npz) and config['t2i']:
        raise ValueError(f'{args.ckpt} is a text-to-image checkpoint: use --text')
    dtype = DTYPES.get(args.dtype) or auto_dtype(device)
    set_conv_layout(vae, dtype)
    settings = dict(cfg_scale=args.cfg, top_k=args.top_k, top_p=args.top_p, use_prompt=not args.no_prompt and bool(args.ckpt),
                    dtype=dtype)

    if args.eval_npz:
        num_classes = args.num_classes or var.num_classes
        labels = torch.arange(num_classes).repeat_interleave(args.per_class)
        chunks = []
        for start in tqdm(range(0, len(labels), args.batch_size), desc='sampling'):
            batch = labels[start:start + args.batch_size].to(device)
            images = generate_images(vae, var, parts, clip, labels=batch, seed=args.seed + start, **settings)
            chunks.append(to_uint8(images))
        arr = np.concatenate(chunks)  # (N, H, W, 3) uint8
        atomic_write(args.eval_npz, lambda tmp: np.savez(tmp, arr_0=arr, labels=labels.numpy()), suffix='.npz')
        print(f'wrote {arr.shape[0]} images of {num_classes} classes to {args.eval_npz}')
        return

    if args.text is not None:
        rows = [generate_images(vae, var, parts, clip, texts=[t] * args.n, seed=args.seed, **settings) for t in args.text]
        names = args.text
    else:
        try:
            class_ids = [int(c) for c in args.class_id.split(',')]
        except ValueError:
            raise ValueError(f'--class_id takes comma-separated integers, got {args.class_id!r}') from None
        bad = [c for c in class_ids if not 0 <= c < var.num_classes]
        if bad:
            raise ValueError(f'class ids {bad} are outside 0..{var.num_classes - 1}')
        rows = [generate_images(vae, var, parts, clip, labels=torch.full((args.n,), c, device=device), seed=args.seed,
                                **settings) for c in class_ids]
        names = [f'class{c}' for c in class_ids]
    images = torch.cat(rows)
    save_grid(images, args.out, nrow=args.n)
    print(f'wrote {args.out}')
    if args.per_image:
        os.makedirs(args.per_image, exist_ok=True)
        for row, name in enumerate(names):
            for i in range(args.n):
                slug = ''.join(ch if ch.isalnum() else '_' for ch in name)[:60]  # the row number keeps names apart
                save_image(images[row * args.n + i], os.path.join(args.per_image, f'{row:03d}_{slug}_{i}.png'))


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError) as e:  # OSError: FileNotFoundError, ConnectionError, a disk that fills up
        sys.exit(f'error: {e}')
