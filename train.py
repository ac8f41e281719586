"""
MVP fine-tuning of a frozen, pretrained VAR, end to end (MVP paper, Sec. 3 and 4.1).

Only the prompt tokens train (plus, for text-to-image, a projection of CLIP's text features onto VAR's
condition); the VQVAE, the VAR transformer and CLIP stay frozen. (The baselines of MVP's Tables 3-4 train other
things in the same loop, --prompt: a prefilled prompt, LoRA on the attention, or the whole VAR.) The model and its
step live in mvp.py; this file is the training script: flags, data, the loop. One step:
  1. image -> VQVAE token maps R_1..R_K (frozen) -> the teacher-forcing input
  2. VAR forward with the frame prompts added to every scale's input tokens (Eq. 6) -> logits
  3. L = CE(logits, R) + lambda_sen * L_CLIP(I_sen, sentence) + lambda_cap * L_CLIP(I_cap, caption)  (Eq. 7-9)

    python train.py --depth 16 --tau 20 --data /path/to/imagenet --captions captions.jsonl
    python train.py --backbone checkpoints/shapes --data shapes --max_steps 300     # the offline world
    python train.py --backbone checkpoints/shapes --data shapes --t2i               # text-to-image
    python train.py --backbone checkpoints/shapes --data shapes --t2i --prompt lora # Table 3's baselines: LoRA,
    python train.py --backbone checkpoints/shapes --data shapes --t2i --prompt full #   full fine-tuning of the VAR
    torchrun --nproc_per_node 8 train.py --depth 16 --tau 20 --data ...             # several GPUs (DDP)

Every checkpoint writes OUT_DIR/ckpt.pt, to resume from (the trained tensors, optimizer, RNG states, step), and
beside it the run's prompt folder: prompt.safetensors (the trained tensors alone) and config.json (what they are),
which sample.py and world.evaluate load without pickle, from the folder or from a Hugging Face repo.
"""
import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from typing import Optional, Tuple

import torch
from tqdm import tqdm

from clip_loss import TOKENS, SemanticLoss
from data import batches_of_epoch, build_dataset, epoch_loader
from ddp import (Process, check_stop, claim_out_dir, end_process, reduce_mean, rng_states, set_rng_states, setup_process,
                 stop_on_interrupt, watch_loss)
from device import DTYPES, auto_dtype, parse_device
from frame_prompt import PLACEMENTS, FramePrompt
from mvp import (CONFIG_FILE, DEFAULT_LAMBDAS, DEFAULT_TOKENS, MVP, build_run, check_same_architecture,
                 first_scale_fixed, generate_images, init_text_projection, load_checkpoint, load_trained, save_prompt,
                 write_config)
from pretrained import DEFAULT_CLIP, atomic_save, backbone_spec, check_creatable, save_grid
from runlog import log_step, plot_losses, start_log
from update import BALANCES, optimizer_step, warmup_cosine_lr


def get_args(argv=None):
    p = argparse.ArgumentParser(description='MVP: tune multi-scale frame prompts of a frozen VAR.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group('backbone')
    g.add_argument('--backbone', default='released', help='"released" (the official weights), "released-random" (their '
                                                          'architecture, random weights: a smoke test at full size) '
                                                          'or a backbone folder')
    g.add_argument('--depth', type=int, default=16, help='released VAR depth: 16, 20, 24, 30 or 36')
    g.add_argument('--cache_dir', default=None, help='a plain folder of the released .pth files '
                   '(default $MVP_CACHE; none: the Hugging Face cache)')
    g = p.add_argument_group('prompts')
    g.add_argument('--prompt', default='mvp', choices=('mvp', 'prefilled', 'lora', 'full'),
                   help='what trains: MVP\'s frame prompts; the baselines: the prefilled prompt (Table 4), LoRA on the '
                   'attention (Table 3) or the whole VAR transformer (full fine-tuning, Table 3)')
    g.add_argument('--lora_rank', type=int, default=8, help='--prompt lora: rank of every attn.mat_qkv and attn.proj update')
    g.add_argument('--tau', type=int, default=20, help='a scale whose frame exceeds tau tokens gets four L-shapes')
    g.add_argument('--placement', default='frame', choices=PLACEMENTS, help='prompt positions (Table 5 ablation)')
    g.add_argument('--placement_seed', type=int, default=0, help='seed of the random placement')
    g.add_argument('--first_scale', default='auto', choices=('auto', 'on', 'off'),
                   help='prompt the 1x1 first scale; auto: off for class-to-image, on for text-to-image (Table 6)')
    g.add_argument('--t2i', action='store_true', help='text-to-image: the caption replaces the class as condition')
    g = p.add_argument_group('semantic loss')
    g.add_argument('--beta', type=float, default=0.6, help='kappa = floor(beta * K): the scale of I_sen')
    g.add_argument('--lambda_sen', type=float, default=None, help='weight of the sentence loss (0: off); default: '
                   'the task\'s (DEFAULT_LAMBDAS: 1 for class-to-image, 0.1 for text-to-image)')
    g.add_argument('--lambda_cap', type=float, default=None, help='weight of the caption loss (0: off); default: '
                   'the task\'s (DEFAULT_LAMBDAS)')
    g.add_argument('--soft_temperature', type=float, default=1.0, help='softmax temperature of the soft tokens')
    g.add_argument('--tokens', default=None, choices=TOKENS, help='how I_sen and I_cap\'s token maps are made '
                   'differentiable: soft, straight-through gumbel or argmax, or a free-running rollout (clip_loss.py); '
                   'default: the task\'s (DEFAULT_TOKENS: soft for class-to-image, rollout for text-to-image)')
    g.add_argument('--balance', default='sum', choices=BALANCES,
                   help='how the losses\' gradients make an update: sum (Eq. 9, one clip on the total), clip_each (each '
                        'loss\'s gradient clipped to --grad_clip on its own) or normalize (each CLIP level\'s gradient '
                        'rescaled to --semantic_ratio x cross-entropy\'s norm)')
    g.add_argument('--semantic_ratio', type=float, default=0.1, help='--balance normalize: each CLIP level\'s gradient '
                   'norm as a fraction of cross-entropy\'s')
    g.add_argument('--semantic_chunk', type=int, default=None,
                   help='decode and embed I_sen / I_cap this many images at a time, recomputed in the backward (the '
                        'same loss and gradient, the memory of N images instead of 2 x batch, one more decoder + CLIP '
                        'forward); 0: all at once, no recompute; default: 1 at 256 px and above, else 0')
    g.add_argument('--clip_model', default=None, help=f'open_clip model name or model folder (default {DEFAULT_CLIP[0]}, '
                   'or the backbone folder\'s clip/)')
    g.add_argument('--clip_pretrained', default=DEFAULT_CLIP[1],
                   help='open_clip pretrained tag or checkpoint file; "none": random weights (a smoke test)')
    g = p.add_argument_group('data')
    g.add_argument('--data', default=None, help='ImageNet-style folder (DATA/train/<class>/*) or "shapes" (the '
                   'offline world)')
    g.add_argument('--captions', default=None, help='JSONL of {"path": ..., "caption": ...} (paths relative to --data)')
    g.add_argument('--class_names', default=None, help='class names, one per line in sorted folder order')
    g.add_argument('--shapes_n', type=int, default=5000, help='training images of the shapes world')
    g.add_argument('--num_workers', type=int, default=None,
                   help='DataLoader workers per process; default: min(8, CPU cores / processes on this machine) '
                        '(tools.bench dataloader measures what one worker decodes)')
    g = p.add_argument_group('optimisation')
    g.add_argument('--batch_size', type=int, default=16, help='per process')
    g.add_argument('--max_steps', type=int, default=5000)
    g.add_argument('--lr', type=float, default=1e-3)
    g.add_argument('--min_lr_ratio', type=float, default=0.1, help='cosine decay to lr * this')
    g.add_argument('--warmup_steps', type=int, default=100)
    g.add_argument('--weight_decay', type=float, default=0.0)
    g.add_argument('--grad_clip', type=float, default=1.0)
    g.add_argument('--cond_drop', type=float, default=0.1, help='probability of the null condition (for CFG)')
    g.add_argument('--seed', type=int, default=0)
    g = p.add_argument_group('system')
    g.add_argument('--device', default='auto', help='auto, cpu, cuda, cuda:1, ...')
    g.add_argument('--dtype', default='auto', choices=('auto', 'fp32', 'bf16', 'fp16'), help='autocast dtype; auto: bf16 on '
                   'CUDA if supported, else fp16; on the CPU bf16 where it has bf16 matrix units, else fp32')
    g.add_argument('--compile', action='store_true', help='torch.compile the VAR transformer')
    g = p.add_argument_group('output')
    g.add_argument('--out_dir', default='runs/mvp')
    g.add_argument('--resume', default=None, help='a checkpoint to continue from, or "auto" for OUT_DIR/ckpt.pt if present')
    g.add_argument('--log_every', type=int, default=10)
    g.add_argument('--ckpt_every', type=int, default=500)
    g.add_argument('--sample_every', type=int, default=500, help='write a small sample grid every N steps (0: never)')
    args = p.parse_args(argv)
    if args.first_scale == 'auto':
        args.first_scale = 'on' if args.t2i else 'off'
    task = 'text-to-image' if args.t2i else 'class-to-image'
    args.lambda_sen = DEFAULT_LAMBDAS[task][0] if args.lambda_sen is None else args.lambda_sen
    args.lambda_cap = DEFAULT_LAMBDAS[task][1] if args.lambda_cap is None else args.lambda_cap
    args.tokens = args.tokens or DEFAULT_TOKENS[task]
    if args.num_workers is None:
        args.num_workers = min(8, max(1, (os.cpu_count() or 1) // int(os.environ.get('LOCAL_WORLD_SIZE', 1))))
    check_args(args)
    return args


def check_args(args):
    """Flags whose values no run can use: one line naming the flag, before anything is built or written."""
    at_least = {'batch_size': 1, 'max_steps': 1, 'log_every': 1, 'ckpt_every': 1, 'sample_every': 0, 'num_workers': 0,
                'warmup_steps': 0, 'shapes_n': 1, 'semantic_chunk': 0, 'lora_rank': 1, 'lambda_sen': 0, 'lambda_cap': 0,
                'weight_decay': 0, 'lr': 0}  # lr 0: a run that trains nothing, the untuned model in a run's clothes
    for name, low in at_least.items():
        if getattr(args, name) is not None and getattr(args, name) < low:  # None: a default decided later
            raise ValueError(f'--{name} must be at least {low}, got {getattr(args, name)}')
    for name in ('soft_temperature', 'grad_clip', 'semantic_ratio'):
        if not getattr(args, name) > 0:
            raise ValueError(f'--{name} must be positive, got {getattr(args, name)}')
    for name in ('cond_drop', 'min_lr_ratio'):
        if not 0 <= getattr(args, name) <= 1:
            raise ValueError(f'--{name} must lie in [0, 1], got {getattr(args, name)}')
    parse_device(args.device)
    if args.captions and args.data == 'shapes':
        raise ValueError('--captions is for an image folder (--data DIR); the shapes world has its own captions')
    if args.captions and not os.path.isfile(args.captions):
        raise ValueError(f'--captions {args.captions}: no such file')


# -----------------------------------------------------------------------------
# data, and the loop's plumbing


def find_resume(args) -> Tuple[Optional[dict], Optional[str]]:
    """The checkpoint to continue from, if any; its settings must match the ones asked for."""
    path = os.path.join(args.out_dir, 'ckpt.pt') if args.resume == 'auto' else args.resume
    if not path or (args.resume == 'auto' and not os.path.isfile(path)):
        return None, None
    ckpt = load_checkpoint(path)
    check_same_architecture(ckpt['config'], vars(args), path)
    return ckpt, path


def training_data(args, world: int):
    """The dataset and its steps per epoch, checked against the backbone before anything heavy is built."""
    image_size, num_classes = backbone_spec(args.backbone, args.depth)
    dataset = build_dataset(args, image_size)
    if not args.t2i and len(dataset.class_names) > num_classes:  # class ids past the backbone's are not classes
        raise ValueError(f'--data {args.data} has {len(dataset.class_names)} classes, but the backbone\'s VAR knows '
                         f'{num_classes} (MVP trains no class embeddings): use --t2i, where captions replace classes')
    steps_per_epoch = len(batches_of_epoch(len(dataset), args.batch_size, 0, args.seed, 0, world))
    if steps_per_epoch == 0:
        raise ValueError(f'{len(dataset)} images cannot fill one batch of {args.batch_size} x {world} processes')
    return dataset, steps_per_epoch


def restore(ckpt: dict, path: str, parts, optimizer, scaler, proc: Process, args) -> int:
    """Load a checkpoint's trained tensors, optimizer, scaler and RNG states; returns its step."""
    load_trained(parts, ckpt['parts'], path, vars(args))
    optimizer.load_state_dict(ckpt['optimizer'])
    scaler.load_state_dict(ckpt['scaler'])
    set_rng_states(proc, ckpt['rng'], path)
    return ckpt['step']


def save_checkpoint(path: str, step: int, run_config: dict, parts, optimizer, scaler, proc: Process):
    """ckpt.pt (to resume from) and, beside it, the prompt folder (what to share: no optimizer, no pickle)."""
    rng = rng_states(proc)
    if proc.master:
        trained = parts.state_dict()
        atomic_save({'config': run_config, 'step': step, 'parts': trained, 'optimizer': optimizer.state_dict(),
                     'scaler': scaler.state_dict(), 'rng': rng}, path)
        save_prompt(os.path.dirname(path), run_config, trained)


def start_run(args, parts, var, dataset, proc: Process, dtype, step: int) -> Tuple[dict, Optional[str]]:
    """The run's config (its flags and trainable-parameter count, as its prompt folder records them), written to
    OUT_DIR/config.json with a summary printed, and the log to append to (the first process's alone)."""
    run_config = {**vars(args), 'trainable_parameters': sum(p.numel() for p in parts.parameters()),
                  'var_parameters': sum(p.numel() for p in var.parameters()),  # (LoRA pairs are not the VAR's)
                  'autocast': str(dtype).removeprefix('torch.')}  # what --dtype auto chose on this machine
    if not proc.master:
        return run_config, None
    os.makedirs(args.out_dir, exist_ok=True)
    write_config(run_config, os.path.join(args.out_dir, CONFIG_FILE))
    print(json.dumps(vars(args), indent=1))
    tokens = parts.prompt.counts() if isinstance(parts.prompt, FramePrompt) else \
        parts.prompt.tokens.shape[1] if parts.prompt is not None else 'none'
    n_trainable, n_var = run_config['trainable_parameters'], run_config['var_parameters']
    print(f'trainable parameters: {n_trainable:,} ({100 * n_trainable / n_var:.3f}% of the VAR\'s {n_var:,}); '
          f'prompt tokens per scale: {tokens}')
    print(f'data: {len(dataset):,} images; device {proc.device}, autocast {dtype}, world size {proc.world}'
          + (f'; resuming at step {step}' if step else ''))
    return run_config, start_log(args.out_dir, step)


def main(argv=None):
    args = get_args(argv)
    proc = setup_process(args.device, args.seed)
    dtype = DTYPES.get(args.dtype) or auto_dtype(proc.device)
    check_creatable(args.out_dir, '--out_dir')
    ckpt, resume_path = find_resume(args)
    dataset, steps_per_epoch = training_data(args, proc.world)
    with claim_out_dir(args.out_dir, proc) or nullcontext():  # one run per folder, held until the run ends
        run(args, proc, dtype, ckpt, resume_path, dataset, steps_per_epoch)


def run(args, proc: Process, dtype, ckpt, resume_path, dataset, steps_per_epoch: int):
    """The run in the folder it holds: the models, a resumed state, the training loop, the loss plot."""
    semantic_on = args.lambda_sen > 0 or args.lambda_cap > 0
    vae, var, clip, parts = build_run(vars(args), proc.device, need_clip=semantic_on)
    if args.t2i:
        init_text_projection(parts.text_cond, clip, var, dataset)
    chunk = args.semantic_chunk if args.semantic_chunk is not None else (1 if vae.image_size >= 256 else 0)
    semantic = SemanticLoss(clip, vae, args.beta, args.lambda_sen, args.lambda_cap, args.soft_temperature,
                            args.tokens, chunk) if semantic_on else None
    if args.compile:  # the gradient record and --balance take several backwards through one compiled graph, which
        torch._functorch.config.donated_buffer = False  # a compiled backward refuses while it donates its buffers
    trainable = list(parts.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler(proc.device.type, enabled=dtype == torch.float16)
    step = restore(ckpt, resume_path, parts, optimizer, scaler, proc, args) if ckpt is not None else 0
    tuned = torch.nn.parallel.DistributedDataParallel(
        parts, device_ids=[proc.device.index] if proc.device.type == 'cuda' else None) if proc.ddp else parts
    model = MVP(vae, var, tuned, clip, semantic, args.cond_drop, first_scale_fixed(vars(args)), dtype, args.compile)
    no_sync = tuned.no_sync if proc.ddp and args.balance != 'sum' else nullcontext
    run_config, log_path = start_run(args, parts, var, dataset, proc, dtype, step)
    save = lambda path, at_step: save_checkpoint(path, at_step, run_config, parts, optimizer, scaler, proc)
    lr_at = lambda s: warmup_cosine_lr(s, args.max_steps, args.lr, args.warmup_steps, args.min_lr_ratio)
    sample_conditions = dict(texts=[dataset[i][3] for i in range(min(8, len(dataset)))]) if args.t2i else \
        dict(labels=torch.arange(min(8, var.num_classes), device=proc.device))
    watch_2 = torch.tensor([-1.0, 0.0], device=proc.device)  # (first non-finite step or -1, its loss)
    check_every = [args.log_every, args.ckpt_every] + ([args.sample_every] if args.sample_every else [])
    # on a terminal a progress bar; sent to a file, one plain line per logged step (log_step)
    bar = tqdm(total=args.max_steps, initial=step, disable=not proc.master or not sys.stderr.isatty(), dynamic_ncols=True)
    t0 = time.time()
    # Ctrl-C: the loop saves and stops at the next step; an error ends the progress bar's line before it is printed
    with bar, stop_on_interrupt() as interrupted:
        while step < args.max_steps:
            for images, labels, sentences, captions in epoch_loader(dataset, args.batch_size, args.seed, args.num_workers,
                                                                    step, steps_per_epoch, proc.rank, proc.world,
                                                                    pin_memory=proc.device.type == 'cuda'):
                images, labels = images.to(proc.device, non_blocking=True), labels.to(proc.device, non_blocking=True)
                idx = model.tokenise(images)
                with no_sync():  # term-by-term gradients are averaged over the processes by hand (reduce_mean)
                    _, losses = model(idx, labels, sentences, captions)
                terms = model.objective(losses)
                loss = sum(terms.values())  # Eq. 9
                watch_loss(watch_2, loss, step)
                if proc.ddp or interrupted or any((step + 1) % every == 0 for every in check_every) \
                        or step + 1 == args.max_steps:  # else no host-GPU sync here
                    check_stop(watch_2, interrupted, step, args.out_dir, proc, save, bar)
                for group in optimizer.param_groups:
                    group['lr'] = lr_at(step)
                logged = (step + 1) % args.log_every == 0 or step + 1 == args.max_steps
                grad_norm, record = optimizer_step(terms, optimizer, scaler, trainable, args.grad_clip, args.balance,
                                                   args.semantic_ratio, record=logged and proc.master,
                                                   reduce=reduce_mean if proc.ddp else None)
                step += 1
                bar.update(1)
                if proc.master and logged:
                    log_step(log_path, step, loss, losses, grad_norm, record, lr_at(step - 1), t0, bar)
                if proc.master and args.sample_every and step % args.sample_every == 0:
                    grid = generate_images(vae, var, parts, clip, seed=args.seed, **sample_conditions)
                    save_grid(grid, os.path.join(args.out_dir, 'samples', f'step_{step:06d}.png'))
                if step % args.ckpt_every == 0 or step == args.max_steps:
                    save(os.path.join(args.out_dir, 'ckpt.pt'), step)
                if step >= args.max_steps:
                    break
    if proc.master:
        plot_losses(log_path, os.path.join(args.out_dir, 'losses.png'), guess=math.log(args.batch_size),
                    grad_clip=args.grad_clip)
        print(f'done: {step} steps in {time.time() - t0:.1f}s; checkpoint {os.path.join(args.out_dir, "ckpt.pt")}')
    end_process(proc)


def error_line(error: BaseException) -> str:
    """The one line a user sees for an error. One raised in a DataLoader worker arrives with the worker's traceback in
    its message ("Caught ValueError in DataLoader worker process 0. Original Traceback ..."): its last line is the error."""
    lines = str(error).strip().splitlines()
    if len(lines) > 1 and lines[0].startswith('Caught ') and 'DataLoader worker' in lines[0]:
        return lines[-1].split(': ', 1)[-1]
    return str(error)


if __name__ == '__main__':
    try:
        main()
    except (ValueError, OSError) as e:  # OSError: a missing file, a refused connection, a full disk (WriteError)
        sys.exit(f'error: {error_line(e)}')
    except KeyboardInterrupt:  # before the training loop: nothing trained, nothing to save
        sys.exit('interrupted before the first step: nothing was saved')
