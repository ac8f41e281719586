"""
Benchmarks, nanoGPT style: one file, no framework. Each benchmark is a function that prints a table and returns
its rows (a list of dicts, one per table row); `--out FILE` appends the table to FILE as markdown.

    python -m tools.bench sampling                       # VAR next-scale sampling, KV cache on vs off (CPU, 1 thread)
    python -m tools.bench sampling --threads 0           # torch's default thread count
    python -m tools.bench sampling --device cuda --out bench.md
    python -m tools.bench training                       # one training step's time and peak memory: frozen VAR, MVP,
                                                   # MVP + semantic loss, prefilled prompt, LoRA, full fine-tuning
    python -m tools.bench scaling                        # sampling time vs the number of scales / final map side n
    python -m tools.bench calibration                    # shared/calibration.md's step: this CPU against the slowest

Adding a benchmark: write `def name(args) -> List[dict]`, decorate it with @benchmark (its docstring's first line
is the help text); give it its own command-line options with @benchmark(add_args=fn), fn(parser) adding them
(parser.set_defaults may change a common option's default for that benchmark only). Notes a benchmark puts in
args.notes (a list of strings) are appended below its table to --out.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import time
import types
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from var import VAR
from vqvae import MultiScaleQuantizer, VQVAE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS: Dict[str, Callable] = {}
EXTRA_ARGS: Dict[str, Callable] = {}


def benchmark(fn=None, *, add_args: Optional[Callable] = None):
    def register(f):
        BENCHMARKS[f.__name__] = f
        if add_args is not None:
            EXTRA_ARGS[f.__name__] = add_args
        return f
    return register(fn) if fn is not None else register


# -----------------------------------------------------------------------------
# helpers


def synchronizer(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)


def environment(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'
    return f'torch {torch.__version__}, device {device} ({name}), {torch.get_num_threads()} CPU threads'


def format_table(rows: List[dict], markdown: bool = False) -> str:
    columns = list(rows[0])
    cells = [[str(c) for c in columns]] + [[str(r.get(c, '')) for c in columns] for r in rows]
    if markdown:
        lines = ['| ' + ' | '.join(row) + ' |' for row in cells]
        lines.insert(1, '|' + '|'.join(' --- ' for _ in columns) + '|')
        return '\n'.join(lines)
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    fmt = lambda row: '  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return '\n'.join([fmt(cells[0]), '  '.join('-' * w for w in widths)] + [fmt(row) for row in cells[1:]])


def median(xs):
    return statistics.median(xs)


# -----------------------------------------------------------------------------
# sampling: VAR next-scale prediction with classifier-free guidance, KV cache on vs off


def sampling_args(parser):
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--cfg', type=float, default=1.5)
    parser.add_argument('--top_k', type=int, default=0)
    parser.add_argument('--top_p', type=float, default=0.0)
    parser.add_argument('--depth', type=int, default=0, help='0: a tiny random VAR at 64 px; 16, 20, 24, 30, 36: the '
                                                             'released architecture with random weights (no download)')
    parser.add_argument('--dtype', choices=('auto', 'fp32', 'bf16'), default='auto',
                        help='as sample.py: autocast of the blocks and the decoder; auto: bf16 on CUDA and on CPUs with '
                             'fast bf16 matrix units, else fp32')
    parser.add_argument('--kv', choices=('both', 'on'), default='both', help='time the KV cache on and off, or on only')
    parser.add_argument('--official', default=None, metavar='PATH',
                        help='a checkout of FoundationVision/VAR: also time its sampler on the same weights, in this '
                             'process (fp32, as it runs)')


TINY_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8)


def open_gates(model: nn.Module, std: float = 0.02):
    """Perturb every parameter: from-scratch init has VAR's residual gates at ~1e-5, a "trained-like" model has them open."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * std)


def tiny_backbone(device: torch.device, seed: int = 0, **vqvae_channels):
    """Random frozen tiny VAR (depth 4, width 128, 4 heads, vocab 256, Cvae 16, 7 scales up to 8x8), its gates open,
    and a 64px VQVAE whose channels (ch, ch_mult, num_res_blocks) each benchmark sets."""
    torch.manual_seed(seed)
    vae = VQVAE(vocab_size=256, z_channels=16, patch_nums=TINY_PATCH_NUMS, **vqvae_channels)
    var = VAR(vocab_size=256, z_channels=16, depth=4, width=128, num_heads=4, num_classes=10, patch_nums=TINY_PATCH_NUMS)
    open_gates(var)
    return [m.to(device).eval().requires_grad_(False) for m in (vae, var)]


def official_sampler(path: str, vae: VQVAE, var: VAR):
    """The official VQVAE + VAR (a FoundationVision/VAR checkout at path, imported from there) holding our models'
    weights (the same state dict layout, loaded strictly): its sampler, images in [0, 1], as a function of
    (labels, seed, args)."""
    if not os.path.isfile(os.path.join(path, 'models', 'var.py')):
        raise SystemExit(f'error: --official {path}: not a checkout of FoundationVision/VAR (no models/var.py)')
    sys.path.insert(0, os.path.abspath(path))
    from models.var import VAR as OfficialVAR
    from models.vqvae import VQVAE as OfficialVQVAE
    o_vae = OfficialVQVAE(vocab_size=vae.vocab_size, z_channels=vae.Cvae, ch=vae.encoder.conv_in.out_channels,
                          test_mode=True, share_quant_resi=4, v_patch_nums=vae.patch_nums)
    o_var = OfficialVAR(vae_local=o_vae, num_classes=var.num_classes, depth=var.depth, embed_dim=var.width,
                        num_heads=var.blocks[0].attn.num_heads, norm_eps=1e-6, shared_aln=var.blocks[0].shared_aln,
                        cond_drop_rate=0.1,
                        attn_l2_norm=True, patch_nums=var.patch_nums, flash_if_available=False, fused_if_available=False)
    o_vae.load_state_dict(vae.state_dict(), strict=True)
    o_var.load_state_dict(var.state_dict(), strict=True)
    o_var = o_var.to(next(var.parameters()).device).eval()
    return lambda labels, seed, args: o_var.autoregressive_infer_cfg(len(labels), labels, g_seed=seed, cfg=args.cfg,
                                                                      top_k=args.top_k, top_p=args.top_p)


def timed_sample(vae: VQVAE, var: VAR, cond_BD, args, use_kv_cache: bool, sync, dtype=torch.float32):
    """One sampling run under autocast to dtype, the VQVAE's convolutions in sample.py's layout: (seconds per scale,
    seconds of all scales, seconds of VQVAE decoding, tokens, images in [0, 1])."""
    from device import cast_once, set_conv_layout
    quant = vae.quantize
    marks = []
    original = quant.next_autoregressive_input  # called once at the end of every scale: a timestamp per scale

    def hooked(*a, **kw):
        out = original(*a, **kw)
        sync()
        marks.append(time.perf_counter())
        return out

    quant.next_autoregressive_input = hooked  # on this instance only
    set_conv_layout(vae, dtype)  # as sample.py
    autocast = torch.autocast(cond_BD.device.type, dtype=dtype, enabled=dtype != torch.float32)
    try:
        sync()
        t0 = time.perf_counter()
        with autocast, cast_once(var, vae):  # as mvp.generate_images
            idx = var.generate(vae, cond_BD, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                               use_kv_cache=use_kv_cache)
        sync()
        t1 = time.perf_counter()
    finally:
        del quant.next_autoregressive_input
    with torch.no_grad(), autocast, cast_once(vae):
        images = vae.idx_to_img(idx).float().add(1).mul(0.5)
    sync()
    t2 = time.perf_counter()
    per_scale = [b - a for a, b in zip([t0] + marks[:-1], marks)]
    return per_scale, t1 - t0, t2 - t1, idx, images


@benchmark(add_args=sampling_args)
def sampling(args) -> List[dict]:
    """VAR sampling speed (tiny random model at 64 px, or --depth): images/s and per-scale time, KV cache on vs off."""
    from device import DTYPES, auto_dtype
    device = torch.device(args.device)
    sync = synchronizer(device)
    dtype = DTYPES.get(args.dtype) or auto_dtype(device)
    if args.official and not args.depth:  # the official VQVAE has the released channel multipliers only
        raise SystemExit('error: --official needs --depth (a released architecture)')
    if args.depth:
        vae, var = released_backbone(device, args.depth, args.seed)
    else:
        vae, var = tiny_backbone(device, args.seed, ch=32, ch_mult=(1, 1, 2, 2))
    label = torch.arange(args.batch, device=device) % var.num_classes
    cond = var.class_condition(label).detach()
    modes = (True, False) if args.kv == 'both' else (True,)
    print(f'sampling: batch {args.batch}, cfg {args.cfg}, top_k {args.top_k}, top_p {args.top_p}, autocast '
          f'{str(dtype).replace("torch.", "")}; VAR depth {var.depth} width {var.width}, vocab {var.vocab_size}, '
          f'patch_nums {var.patch_nums} (L={var.L}), VQVAE -> {vae.image_size}px, random weights; warm-up + median of '
          f'{args.repeats}')
    for kv in modes:  # warm-up
        timed_sample(vae, var, cond, args, kv, sync, dtype)
    runs = {kv: [] for kv in modes}
    for _ in range(args.repeats):  # interleaved, so that a noisy neighbour hurts both modes alike
        for kv in modes:
            runs[kv].append(timed_sample(vae, var, cond, args, kv, sync, dtype))
    results, tokens = {}, {}
    for kv in modes:
        results[kv] = dict(per_scale=[median(r[0][si] for r in runs[kv]) for si in range(len(var.patch_nums))],
                           scales=median(r[1] for r in runs[kv]), decode=median(r[2] for r in runs[kv]),
                           total=median(r[1] + r[2] for r in runs[kv]))
        tokens[kv] = runs[kv][0][3]

    ms = lambda s: f'{1e3 * s:.2f}'
    columns = {True: 'KV on', False: 'KV off'}
    rows = []
    for si, pn in enumerate(var.patch_nums):
        rows.append({'stage': f'scale {si + 1} ({pn}x{pn})', 'unit': 'ms',
                     **{columns[kv]: ms(results[kv]['per_scale'][si]) for kv in modes}})
    for key, name in (('scales', 'all scales (tokens)'), ('decode', 'VQVAE decode'), ('total', 'total')):
        rows.append({'stage': name, 'unit': 'ms', **{columns[kv]: ms(results[kv][key]) for kv in modes}})
    rows.append({'stage': 'throughput', 'unit': 'images/s',
                 **{columns[kv]: f'{args.batch / results[kv]["total"]:.2f}' for kv in modes}})
    if args.kv == 'both':
        for row in rows:
            row['speed-up'] = f'{float(row["KV off"]) / float(row["KV on"]):.2f}x' if row['unit'] == 'ms' else \
                f'{float(row["KV on"]) / float(row["KV off"]):.2f}x'
    print(format_table(rows))
    if args.kv == 'both':
        same = all(torch.equal(a, b) for a, b in zip(tokens[True], tokens[False]))
        print(f'KV cache speed-up (total): {results[False]["total"] / results[True]["total"]:.2f}x; '
              f'all scales: {results[False]["scales"] / results[True]["scales"]:.2f}x; '
              f'same tokens with and without the cache: {"yes" if same else "NO"}')
    if args.official:
        rows += against_official(args, vae, var, label, cond, sync, dtype)
    return rows


def against_official(args, vae, var, label, cond, sync, dtype) -> List[dict]:
    """The official sampler on the same weights, labels and seed, beside ours in fp32 (the same function: the same
    tokens) and ours at --dtype; interleaved runs (a neighbour slows all three alike), medians."""
    official = official_sampler(args.official, vae, var)

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t0, out
    run_official = lambda: timed(lambda: official(label, args.seed, args))
    run_fp32 = lambda: timed(lambda: timed_sample(vae, var, cond, args, True, sync, torch.float32)[4])
    run_ours = lambda: timed(lambda: timed_sample(vae, var, cond, args, True, sync, dtype)[4])
    run_official(), run_fp32()  # warm-up (ours at dtype was warmed up by sampling())
    times = {'official': [], 'fp32': [], 'ours': []}
    for _ in range(args.repeats):
        t_official, official_images = run_official()
        t_fp32, fp32_images = run_fp32()
        times['official'].append(t_official)
        times['fp32'].append(t_fp32)
        if dtype != torch.float32:
            times['ours'].append(run_ours()[0])
    diff = (official_images - fp32_images).abs().max().item()
    official_s, fp32_s = median(times['official']), median(times['fp32'])
    rows = [{'stage': 'official VAR sampler (fp32)', 'unit': 's', 'KV on': f'{official_s:.2f}', 'speed-up': '1.00x'},
            {'stage': 'ours, fp32', 'unit': 's', 'KV on': f'{fp32_s:.2f}', 'speed-up': f'{official_s / fp32_s:.2f}x'}]
    if dtype != torch.float32:
        ours_s = median(times['ours'])
        rows.append({'stage': f'ours, {str(dtype).replace("torch.", "")} (--dtype {args.dtype})', 'unit': 's',
                     'KV on': f'{ours_s:.2f}', 'speed-up': f'{official_s / ours_s:.2f}x'})
    print(format_table(rows))
    print(f'ours fp32 vs official, same seed: images max |diff| {diff:.2e}')
    args.notes = [f'Against the official code (FoundationVision/VAR at {args.official}), in one process, the same '
                  f'weights, labels and seed; its sampler draws the images and decodes them, as ours does. Ours fp32 '
                  f'vs official: images max |diff| {diff:.2e}.']
    return rows


# -----------------------------------------------------------------------------
# training: the cost of one training step, MVP against other ways of tuning the same frozen VAR

TRAIN_VARIANTS = {  # name (for --variants) -> row label
    'frozen': 'frozen VAR, no prompt (grad to x_BLCv)',
    'mvp': 'MVP frame prompt, CE',
    'mvp_semantic': 'MVP frame prompt, CE + semantic',
    'mvp_semantic_plain': 'MVP frame prompt, CE + semantic, one pass (no recompute)',
    'mvp_semantic_rollout': 'MVP frame prompt, CE + semantic at 0.1 on the free-running rollout',
    'prefilled': 'prefilled prompt, CE',
    'lora': 'LoRA r{rank} on attn qkv + proj, CE',
    'full': 'full fine-tuning, CE',
}
WORKER_TAG = 'BENCH_WORKER_RESULT '  # the line a worker process prints its result on, as JSON
# a random tiny CLIP for the semantic loss: tests/conftest.py's TINY_CLIP_CFG at the VQVAE's 64px
TINY_CLIP_64 = dict(embed_dim=32,
                    vision_cfg=dict(image_size=64, layers=2, width=64, head_width=32, patch_size=8),
                    text_cfg=dict(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))


def training_args(parser):
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--tau', type=int, default=20, help='MVP frame threshold; the prefilled prompt gets as many tokens')
    parser.add_argument('--lora_rank', type=int, default=8)
    parser.add_argument('--warmup', type=int, default=2,
                        help='untimed steps before the timed ones (the first one creates the optimizer state)')
    parser.add_argument('--variants', default=','.join(TRAIN_VARIANTS),
                        help=f'comma-separated subset of: {", ".join(TRAIN_VARIANTS)}')
    parser.add_argument('--in_process', action='store_true',
                        help='run every variant in this process instead of one fresh process each: faster (for tests), '
                             'but on the CPU the peak memory is then n/a')
    parser.add_argument('--compile', action='store_true', help='torch.compile the VAR, as train.py --compile')
    parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)  # internal: run one variant, print JSON
    parser.set_defaults(repeats=10)


def current_rss() -> Optional[int]:
    """This process's resident set size now, in bytes: /proc/self/statm on Linux, else psutil if installed."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')
    except (OSError, ValueError, IndexError):
        try:
            import psutil
            return psutil.Process().memory_info().rss
        except ImportError:
            return None


def reset_peak_rss() -> bool:
    """Set the kernel's high-water mark of this process's RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')
        return True
    except OSError:
        return False


def peak_rss(after_reset: bool) -> Optional[int]:
    """Peak RSS in bytes: VmHWM since reset_peak_rss() if that worked, else getrusage's ru_maxrss.

    Why not always ru_maxrss: for a process started by exec, Linux's ru_maxrss also holds the peak RSS of the process
    that exec'd it (here the parent bench.py, or a pytest run that has done far more), and it cannot be reset.
    """
    if after_reset:
        try:
            with open('/proc/self/status') as f:
                for line in f:
                    if line.startswith('VmHWM:'):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == 'darwin' else ru * 1024  # bytes on macOS, kilobytes on Linux


def released_backbone(device: torch.device, depth: int, seed: int = 0):
    """The released VQVAE and VAR-d{depth} architectures (pretrained.py's, the layout of the released files) with
    random weights, the VAR's gates open: what a full-size step costs, without a download."""
    from pretrained import RANDOM, load_backbone
    torch.manual_seed(seed)
    vae, var = load_backbone(RANDOM, depth)  # 512 px for d36
    open_gates(var)
    return [m.to(device).eval().requires_grad_(False) for m in (vae, var)]


def random_clip(args, device: torch.device):
    """The semantic loss's frozen CLIP with random weights: open_clip's --clip_model architecture for fullsize (open_clip
    builds it without weights), a tiny one at 64 px for training."""
    import open_clip
    from clip_loss import FrozenClip
    if args.name == 'fullsize':
        model, tokenizer = open_clip.create_model(args.clip_model, pretrained=None), open_clip.get_tokenizer(args.clip_model)
    else:
        model, tokenizer = open_clip.model.CLIP(**TINY_CLIP_64), open_clip.get_tokenizer('ViT-B-32')
    return FrozenClip(model, tokenizer).to(device).eval().requires_grad_(False)


def semantic_chunk(args, vae) -> int:
    """The semantic loss's chunk: --semantic_chunk, else train.py's default (1 image at 256 px and above, else 0)."""
    if getattr(args, 'semantic_chunk', None) is not None:
        return args.semantic_chunk
    return 1 if vae.image_size >= 256 else 0


def largest_batch(fits: Callable[[int], bool], limit: int = 4096) -> int:
    """The largest batch b <= limit with fits(b), for a fits that is monotone (true up to some b, false beyond):
    doubling from 1, then bisection. 0 if not even 1 fits."""
    low, high = 0, 1
    while high <= limit and fits(high):
        low, high = high, 2 * high
    high = min(high, limit + 1)  # low fits, high does not (or is past the limit)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def synthetic_batch(vae, var, batch: int, seed: int, device: torch.device):
    """Random images in [-1, 1] at the VQVAE's size, class labels, and the semantic loss's two texts per image."""
    gen = torch.Generator().manual_seed(seed)
    images = (torch.rand(batch, 3, vae.image_size, vae.image_size, generator=gen) * 2 - 1).to(device)
    labels = (torch.arange(batch) % var.num_classes).to(device)
    texts = ([f'a photo of a class {int(c)}' for c in labels],
             [f'a photo of a class {int(c)}, picture {i}' for i, c in enumerate(labels)], None)
    return images, labels, texts


def semantic_breakdown(vae, var, forward_var, parts, semantic, batch, autocast, sync) -> Dict[str, float]:
    """One MVP + semantic step's loss and backward cut into stages, each timed alone (seconds). The graph is cut at
    the logits and at the two images (detached leaves whose gradients are passed on by hand), so each stage's
    backward runs by itself; the prompt's gradient is the step's."""
    from mvp import conditions
    images, labels, (sentences, captions, _) = batch
    marks = []

    def mark(stage):
        sync()
        marks.append((stage, time.perf_counter()))
    mark('start')
    with torch.no_grad():
        idx = vae.img_to_idx(images)
        x_BLCv = vae.quantize.teacher_forcing_input(idx)
    mark('VQVAE encoding (no grad)')
    with autocast:
        prompt_map, prefix, _ = parts(None)
        logits = forward_var(conditions(var, None, labels, drop=True, cond_drop=0.1), x_BLCv,
                             prompt_1LC=prompt_map, prefix_1PC=prefix)  # (B, L, V)
        ce = F.cross_entropy(logits.view(-1, var.vocab_size), torch.cat(idx, dim=1).view(-1))
    mark('VAR forward + CE')
    logits_leaf = logits.detach().requires_grad_(True)
    with autocast:
        img_sen, img_cap = semantic.decode_sen_cap(logits_leaf, idx[0])
    mark('decode I_sen + I_cap (soft tokens, decoder)')
    sen_leaf, cap_leaf = img_sen.detach().requires_grad_(True), img_cap.detach().requires_grad_(True)
    with autocast:
        loss = semantic.score(semantic.clip.encode_image(sen_leaf), semantic.clip.encode_image(cap_leaf), sentences,
                              captions)['semantic']
    mark('CLIP forward (image tower, contrastive losses)')
    loss.backward()
    mark('CLIP backward')
    torch.autograd.backward([img_sen, img_cap], [sen_leaf.grad, cap_leaf.grad])
    mark('decode backward')
    torch.autograd.backward([ce, logits], [torch.ones_like(ce), logits_leaf.grad])
    mark('VAR backward (CE + semantic)')
    return {stage: t - t_prev for (_, t_prev), (stage, t) in zip(marks, marks[1:])}


def training_worker(args, variant: str, measure_rss: bool = True) -> dict:
    """Build one variant, run warm-up + timed training steps, measure time and memory (RSS only if measure_rss:
    meaningful only in a fresh process that runs nothing else)."""
    from frame_prompt import FramePrompt
    from device import auto_dtype
    from mvp import MVP, build_run, conditions
    from update import optimizer_step
    device = torch.device(args.device)
    dtype = auto_dtype(device)  # as train.py's --dtype auto: bf16 on CUDA and on CPUs with fast bf16 matrix units
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    sync = synchronizer(device)
    vae, var = released_backbone(device, args.depth, args.seed) if args.name == 'fullsize' else \
        tiny_backbone(device, args.seed, ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1)
    if variant not in TRAIN_VARIANTS:
        raise ValueError(f'unknown variant {variant!r}')
    what_trains = 'mvp' if variant.startswith('mvp') else variant  # frozen: nothing (a prompt of none)
    config = dict(prompt=what_trains, tau=args.tau, placement='frame', first_scale='off', placement_seed=0, t2i=False,
                  lora_rank=args.lora_rank)
    vae, var, _, parts = build_run(config, device, need_clip=False, backbone=(vae, var))
    trainable, semantic = list(parts.parameters()), None
    if variant.startswith('mvp_semantic'):  # train.py's defaults: class-to-image's (beta 0.6, both lambdas 1, soft
        from clip_loss import SemanticLoss  # tokens), or text-to-image's loss (both 0.1, the rollout)
        chunk = 0 if variant == 'mvp_semantic_plain' else semantic_chunk(args, vae)
        loss = dict(lambda_sen=0.1, lambda_cap=0.1, tokens='rollout') if variant == 'mvp_semantic_rollout' else {}
        semantic = SemanticLoss(random_clip(args, device), vae, chunk=chunk, **loss)
    # first_scale_fixed: MVP's class-to-image default (first-scale prompt off), as train.py decides it
    model = MVP(vae, var, parts, None, semantic, 0.1, True, dtype, args.compile)
    forward_var = model.var_forward
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0) if trainable else None
    seq_lens = []  # the sequence length the attention sees, read off the first block's input
    hook = var.blocks[0].attn.register_forward_pre_hook(lambda module, inputs: seq_lens.append(inputs[0].shape[1]))

    def step(batch) -> float:
        """train.py's step (its own functions, autocast and grad scaler included) without the data loader; returns
        the time the VQVAE encoding finished. The frozen VAR has no step in train.py (nothing trains): the same
        forward under the same autocast, and a backward to its input, as the floor every tuning method pays."""
        images, labels, (sentences, captions, _) = batch
        idx = model.tokenise(images)
        sync()
        t_encoded = time.perf_counter()
        if variant == 'frozen':
            x_BLCv = vae.quantize.teacher_forcing_input(idx).requires_grad_(True)
            with autocast:
                logits = forward_var(conditions(var, None, labels, drop=True, cond_drop=0.1), x_BLCv)  # (B, L, V)
                ce = F.cross_entropy(logits.view(-1, var.vocab_size), torch.cat(idx, dim=1).view(-1))
            ce.backward()
            return t_encoded
        _, losses = model(idx, labels, sentences, captions)
        optimizer_step(model.objective(losses), optimizer, scaler, trainable, 1.0)
        return t_encoded

    batch = synthetic_batch(vae, var, args.batch, args.seed, device)
    # memory: the growth over what the process holds once everything is built, from before the first step on
    sync()
    rss_before = current_rss() if measure_rss else None
    reset = measure_rss and reset_peak_rss()
    if device.type == 'cuda':
        allocated_before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step(batch)
    times, encode_times = [], []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        t_encoded = step(batch)
        sync()
        times.append(time.perf_counter() - t0)
        encode_times.append(t_encoded - t0)
    hook.remove()
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated(device) - allocated_before
        memory = 'cuda'
    elif not measure_rss:
        peak, memory = None, 'n/a'
    else:
        peak_after = peak_rss(reset)
        peak = None if rss_before is None or peak_after is None else peak_after - rss_before
        memory = 'VmHWM' if reset else 'ru_maxrss'
    result = dict(variant=variant, trainable=sum(p.numel() for p in trainable), var_params=sum(p.numel() for p in var.parameters()),
                  step=median(times), encode=median(encode_times), peak=peak, memory=memory,
                  seq=seq_lens[0] if seq_lens else None, L=var.L, input_grad_values=args.batch * (var.L - var.first_l) * var.Cvae,
                  prompt_tokens=len(FramePrompt(var.patch_nums, var.width, args.tau).index), chunk=semantic_chunk(args, vae))
    if semantic is not None and getattr(args, 'breakdown', False):
        runs = [semantic_breakdown(vae, var, forward_var, parts, semantic, batch, autocast, sync) for _ in range(args.repeats)]
        result['breakdown'] = {stage: median(r[stage] for r in runs) for stage in runs[0]}
    if device.type == 'cuda' and getattr(args, 'max_batch', False):
        del batch
        result['max_batch'] = largest_batch(lambda b: cuda_step_fits(step, synthetic_batch(vae, var, b, args.seed, device)),
                                            args.max_batch_limit)
    return result


def cuda_step_fits(step, batch) -> bool:
    """Do two steps at this batch run without CUDA running out of memory (the second with the optimizer's state)?"""
    try:
        step(batch)
        step(batch)
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del batch
        torch.cuda.empty_cache()


def worker_command(args, variant: str) -> List[str]:
    """The command that runs one variant in a fresh process (tools.bench <name> --worker <variant> with args' options)."""
    cmd = [sys.executable, '-m', 'tools.bench', args.name, '--worker', variant, '--device', args.device,
           '--threads', str(args.threads), '--repeats', str(args.repeats), '--seed', str(args.seed),
           '--batch', str(args.batch), '--tau', str(args.tau), '--lora_rank', str(args.lora_rank),
           '--warmup', str(args.warmup)] + (['--compile'] if args.compile else [])
    if args.name == 'fullsize':
        cmd += ['--depth', str(args.depth), '--clip_model', args.clip_model, '--max_batch_limit', str(args.max_batch_limit)]
        cmd += (['--breakdown'] if args.breakdown else []) + (['--max_batch'] if args.max_batch else [])
        cmd += ['--semantic_chunk', str(args.semantic_chunk)] if args.semantic_chunk is not None else []
    return cmd


def run_variants(args) -> Optional[Dict[str, dict]]:
    """Every --variants in its own fresh process (or all in this one with --in_process), one after the other: never
    two competing for the cores. None inside a worker process, which prints its result instead."""
    if args.worker:
        print(WORKER_TAG + json.dumps(training_worker(args, args.worker)), flush=True)
        return None
    variants = [v.strip() for v in args.variants.split(',') if v.strip()]
    unknown = [v for v in variants if v not in TRAIN_VARIANTS]
    if unknown or not variants:
        raise SystemExit(f'error: unknown --variants {unknown}; choose from {", ".join(TRAIN_VARIANTS)}')
    results = {}
    for v in variants:
        if args.in_process:
            results[v] = training_worker(args, v, measure_rss=False)
            continue
        proc = subprocess.run(worker_command(args, v), capture_output=True, text=True, cwd=REPO)
        found = [line for line in proc.stdout.splitlines() if line.startswith(WORKER_TAG)]
        if proc.returncode != 0 or not found:
            raise RuntimeError(f'training worker {v!r} failed (exit code {proc.returncode}):\n{proc.stdout}{proc.stderr}')
        results[v] = json.loads(found[-1][len(WORKER_TAG):])
        print(f'  {v}: {results[v]["step"]:.2f} s a step', flush=True)
    return results


def variant_rows(args, results: Dict[str, dict]) -> List[dict]:
    rows = []
    for v, r in results.items():
        row = {'variant': TRAIN_VARIANTS[v].format(rank=args.lora_rank), 'trainable params': f'{r["trainable"]:,}',
               '% of VAR': f'{100 * r["trainable"] / r["var_params"]:.3f}', 'step time ms': f'{1e3 * r["step"]:.1f}',
               'peak memory MB': 'n/a' if r['peak'] is None else f'{r["peak"] / 2 ** 20:.1f}',
               'seq len in attention': r['seq']}
        if 'max_batch' in r:
            row['largest batch that fits'] = r['max_batch']
        rows.append(row)
    return rows


def memory_note(first: dict) -> str:
    if first['memory'] == 'n/a':
        return ('Peak memory: n/a on the CPU with --in_process (all variants share one process and its allocator, so '
                'resident memory cannot be told apart by variant); run without it.')
    if first['memory'] == 'cuda':
        return ('Peak memory: torch.cuda.max_memory_allocated over the warm-up and timed steps minus '
                'torch.cuda.memory_allocated just before the first step (models, batch and optimizer built): '
                'activations, gradients, optimizer state and temporaries of training, not the weights.')
    peak = ('VmHWM in /proc/self/status, the kernel\'s peak-RSS mark, reset to the current RSS just before the first '
            'step by writing 5 to /proc/self/clear_refs; not ru_maxrss, which in an exec\'d process also holds '
            'the peak RSS of its parent') if first['memory'] == 'VmHWM' else \
        'getrusage(RUSAGE_SELF).ru_maxrss, the lifetime peak, which may include the parent\'s peak'
    return (f'Peak memory: peak RSS growth in the variant\'s own fresh process = peak RSS over the warm-up and timed '
            f'steps ({peak}) minus the RSS just before the first step (/proc/self/statm; models, batch and optimizer '
            f'built). It counts activations, gradients, optimizer state, temporaries and whatever the allocators '
            f'keep, not the weights: resident memory, not bytes allocated by torch.')


def step_notes(args, results: Dict[str, dict]) -> List[str]:
    first = next(iter(results.values()))
    notes = [f'Step: what train.py does per batch minus data loading: VQVAE encoding without grad (median '
             f'{1e3 * median(r["encode"] for r in results.values()):.1f} ms of every row), forward, loss, backward, '
             f'gradient clipping and an AdamW step over the trainable parameters, as train.py runs them '
             f'(mvp.MVP.tokenise, mvp.MVP, update.optimizer_step) under train.py\'s autocast'
             f'{" and torch.compile of the VAR" if args.compile else ""}.']
    if 'frozen' in results:
        notes.append(f'Frozen row: nothing trains and there is no optimizer step; the backward pass runs to the input '
                     f'x_BLCv (the VQVAE teacher-forcing input, made to require grad: {first["input_grad_values"]:,} '
                     f'values) through every block, as a prompt at the input needs too.')
    notes.append(f'MVP: {first["prompt_tokens"]} prompt tokens added onto the L = {first["L"]} input tokens (tau '
                 f'{args.tau}); prefilled: as many tokens prepended to the sequence. Semantic: both images of Eq. 7 '
                 f'decoded by the VQVAE and encoded by CLIP, {first.get("chunk") or "all"} image(s) at a time, '
                 f'recomputed in the backward when chunked (train.py\'s --semantic_chunk default); "one pass": the '
                 f'whole batch at once, no recompute.')
    if 'lora' in results:
        notes.append('LoRA: attn.proj runs as base(x) + B(A(x)); attn.mat_qkv as the merged weight W + BA, because '
                     'var.py calls F.linear(x, mat_qkv.weight) itself, so its backward computes a full 3C x C weight '
                     'gradient per block.')
    notes.append(memory_note(first))
    return notes


def autocast_name(args) -> str:  # train.py's --dtype auto on this device, as the headers print it
    from device import auto_dtype
    return str(auto_dtype(torch.device(args.device))).replace('torch.', '')


def step_table(args, header: str, per_image: bool = False):
    """The step benchmarks' common part: the header, every variant (run_variants) and the printed table:
    (results, rows), or None inside a worker process."""
    if not args.worker:
        print(header)
    results = run_variants(args)
    if results is None:
        return None
    rows = variant_rows(args, results)
    if per_image:
        for row, r in zip(rows, results.values()):
            row['peak MB per image'] = 'n/a' if r['peak'] is None else f'{r["peak"] / 2 ** 20 / args.batch:.0f}'
    print(format_table(rows))
    return results, rows


@benchmark(add_args=training_args)
def training(args) -> Optional[List[dict]]:
    """One training step (tiny random VAR, 64px, batch 16): frozen, MVP (+semantic), prefilled, LoRA, full FT."""
    header = (f'training: batch {args.batch}, tau {args.tau}, autocast {autocast_name(args)} (train.py\'s --dtype '
              f'auto); VAR depth 4 width 128 (4 heads), vocab 256, Cvae 16, patch_nums {TINY_PATCH_NUMS}; VQVAE 64px '
              f'(ch 16, ch_mult (1, 2, 2, 4)); random weights; '
              f'{"all variants in this process" if args.in_process else "each variant in a fresh process"}, '
              f'{args.warmup} warm-up steps + median of {args.repeats}')
    table = step_table(args, header)
    if table is None:
        return None
    results, rows = table
    args.raw = results
    args.notes = step_notes(args, results)  # main() appends them below the table to --out
    print('\n'.join(args.notes))
    return rows


def fullsize_args(parser):
    training_args(parser)
    parser.add_argument('--depth', type=int, default=16, help='a released VAR depth: 16, 20, 24, 30 (256 px) or 36 (512 px)')
    parser.add_argument('--clip_model', default=None, help='open_clip architecture of the semantic loss (default: '
                                                           'train.py\'s, ViT-B-16), built with random weights')
    parser.add_argument('--breakdown', action='store_true', help='also time the stages of the MVP + semantic step')
    parser.add_argument('--max_batch', action='store_true', help='CUDA: also find the largest batch that fits, per variant')
    parser.add_argument('--max_batch_limit', type=int, default=1024)
    parser.add_argument('--semantic_chunk', type=int, default=None, help='the semantic loss\'s chunk (train.py\'s '
                                                                      '--semantic_chunk; default: as train.py)')
    parser.set_defaults(batch=2, repeats=2, warmup=1)


@benchmark(add_args=fullsize_args)
def fullsize(args) -> Optional[List[dict]]:
    """One training step at the released sizes (random weights, released layout, 256 px; 512 px for d36)."""
    from pretrained import DEFAULT_CLIP, DEPTHS
    if args.depth not in DEPTHS:
        raise SystemExit(f'error: --depth {args.depth}: the released depths are {", ".join(map(str, DEPTHS))}')
    args.clip_model = args.clip_model or DEFAULT_CLIP[0]
    if args.max_batch and args.device != 'cuda':
        raise SystemExit('error: --max_batch needs --device cuda (on the CPU, memory does not run out, it swaps)')
    header = (f'fullsize: VAR-d{args.depth} ({"512" if args.depth == 36 else "256"} px), batch {args.batch}, tau '
              f'{args.tau}, CLIP {args.clip_model}, autocast {autocast_name(args)}, compile '
              f'{"on" if args.compile else "off"}; random weights in the released layout; each variant in a fresh '
              f'process, {args.warmup} warm-up step(s) + median of {args.repeats}')
    table = step_table(args, header, per_image=True)
    if table is None:
        return None
    results, rows = table
    args.raw = results
    notes = step_notes(args, results)
    breakdowns = {v: r['breakdown'] for v, r in results.items() if 'breakdown' in r}
    for v, stages in breakdowns.items():
        total = sum(stages.values())
        notes.append(f'Breakdown of "{TRAIN_VARIANTS[v]}" (median of {args.repeats}; the graph cut at the logits and '
                     f'the images, so the decoder and CLIP run once on the whole batch, without recompute; no '
                     f'optimizer step): ' + '; '.join(f'{k} {v_:.2f} s ({100 * v_ / total:.0f}%)'
                                                                   for k, v_ in stages.items()) + '.')
    print('\n'.join(notes))
    args.notes = notes
    return rows


# -----------------------------------------------------------------------------
# scaling: sampling time vs the number of scales and the final map size


SCALING_PREFIXES = ((1, 2), (1, 2, 3, 4), (1, 2, 3, 4, 5, 6), (1, 2, 3, 4, 5, 6, 8), (1, 2, 3, 4, 5, 6, 8, 10),
                    (1, 2, 3, 4, 5, 6, 8, 10, 13))


def scaling_args(parser):
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--cfg', type=float, default=1.5)
    parser.set_defaults(repeats=5)


@benchmark(add_args=scaling_args)
def scaling(args) -> List[dict]:
    """VAR sampling time (KV cache on) vs the number of scales / final map side n, beside the O(n^4) bound."""
    device = torch.device(args.device)
    sync = synchronizer(device)
    print(f'scaling: token generation only (no VQVAE decoder; a quantizer stands in for the VQVAE), KV cache on, '
          f'batch {args.batch}, cfg {args.cfg}; VAR depth 4 width 128 (4 heads), vocab 256, Cvae 16, random weights, '
          f'one model per patch_nums; warm-up + median of {args.repeats}')
    label = torch.arange(args.batch, device=device) % 10
    setups = []
    for patch_nums in SCALING_PREFIXES:
        torch.manual_seed(args.seed)
        var = VAR(vocab_size=256, z_channels=16, depth=4, width=128, num_heads=4, num_classes=10, patch_nums=patch_nums)
        open_gates(var)
        var = var.to(device).eval()
        # var.generate only uses vqvae.quantize (codebook lookup, upsample + phi, next scale's input)
        stub = types.SimpleNamespace(quantize=MultiScaleQuantizer(256, 16, patch_nums).to(device).eval())
        setups.append((var, stub, var.class_condition(label).detach()))

    def run(var, stub, cond) -> float:
        sync()
        t0 = time.perf_counter()
        var.generate(stub, cond, cfg=args.cfg, seed=args.seed, use_kv_cache=True)
        sync()
        return time.perf_counter() - t0

    for s in setups:  # warm-up
        run(*s)
    runs = [[] for _ in setups]
    for _ in range(args.repeats):  # interleaved, so that a noisy neighbour hurts every size alike
        for i, s in enumerate(setups):
            runs[i].append(run(*s))
    times = [median(r) for r in runs]

    rows = []
    for i, patch_nums in enumerate(SCALING_PREFIXES):
        n, L = patch_nums[-1], sum(pn * pn for pn in patch_nums)
        n0, L0 = SCALING_PREFIXES[0][-1], sum(pn * pn for pn in SCALING_PREFIXES[0])
        exponent = '' if i == 0 else f'{math.log(times[i] / times[i - 1]) / math.log(n / SCALING_PREFIXES[i - 1][-1]):.2f}'
        rows.append({'patch_nums': ','.join(map(str, patch_nums)), 'scales K': len(patch_nums), 'n': n, 'tokens L': L,
                     'time ms': f'{1e3 * times[i]:.2f}', 'time (x row 1)': f'{times[i] / times[0]:.2f}',
                     'n^4 (x row 1)': f'{(n / n0) ** 4:.1f}', 'L (x row 1)': f'{L / L0:.1f}',
                     'local exponent': exponent})
    print(format_table(rows))
    notes = ['n^4: the VAR paper\'s bound on the work of generating an n x n token map (Appendix B, Lemma B.2: the sum '
             'over the scales of the squared token count so far), normalised to row 1. L: the number of tokens, what '
             'the per-token work (the linear layers) grows with, ~n^2 for a fixed scale schedule. Local exponent: '
             'log(t_i / t_(i-1)) / log(n_i / n_(i-1)), the measured growth as a power of n between rows (the bound: 4).']
    print('\n'.join(notes))
    args.notes = notes
    return rows


# -----------------------------------------------------------------------------
# dataloader: what train.py's DataLoader delivers from a folder of JPEGs, against what a step consumes


def dataloader_args(parser):
    parser.add_argument('--folder', default=None,
                        help='an ImageNet-style folder (FOLDER/train/<class>/<images>); default: synthetic JPEGs')
    parser.add_argument('--images', type=int, default=256, help='synthetic JPEGs to write (and read)')
    parser.add_argument('--source_size', default='500x375', help='synthetic JPEG size WxH (about ImageNet\'s typical)')
    parser.add_argument('--size', type=int, default=256, help='final image size (256; 512 for d36)')
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--workers', default='0,1,2', help='comma-separated num_workers to time')
    parser.add_argument('--step_s', type=float, default=None,
                        help='seconds a training step takes at --batch (tools.bench fullsize): how many workers keep up')
    parser.set_defaults(repeats=1)


def synthetic_jpegs(folder: str, n: int, width: int, height: int, seed: int = 0):
    """n photo-like JPEGs (smooth colour fields plus grain, quality 90) in 10 class folders of FOLDER/train."""
    from PIL import Image
    gen = torch.Generator().manual_seed(seed)
    for i in range(n):
        coarse = torch.rand(1, 3, 6, 8, generator=gen)
        field = F.interpolate(coarse, size=(height, width), mode='bicubic', align_corners=False)[0]
        pixels = (field + 0.08 * torch.randn(3, height, width, generator=gen)).clamp(0, 1)
        os.makedirs(os.path.join(folder, 'train', f'class{i % 10}'), exist_ok=True)
        Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).astype('uint8')).save(
            os.path.join(folder, 'train', f'class{i % 10}', f'{i:06d}.jpg'), quality=90)


@benchmark(add_args=dataloader_args)
def dataloader(args) -> List[dict]:
    """train.py's DataLoader on JPEGs at 256 px: images/s by num_workers, against what a step consumes."""
    import tempfile
    from data import FolderDataset
    from data import epoch_loader
    workers = [int(w) for w in args.workers.split(',')]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.folder
        if root is None:
            width, height = (int(v) for v in args.source_size.split('x'))
            root = tmp
            synthetic_jpegs(root, args.images, width, height, args.seed)
        dataset = FolderDataset(root, 'train', args.size, train=True, seed=args.seed)
        steps = len(dataset) // args.batch
        print(f'dataloader: {len(dataset)} images ({args.source_size if args.folder is None else args.folder}) -> '
              f'{args.size} px (resize the short side to 1.125x with Lanczos, random crop: data.py), batch {args.batch}, '
              f'{steps} batches; {os.cpu_count()} CPU cores; each worker count: one untimed pass, then median of '
              f'{args.repeats}')
        rows = []
        for num_workers in workers:
            def one_pass() -> float:
                loader = epoch_loader(dataset, args.batch, args.seed, num_workers, 0, steps,
                                      pin_memory=args.device == 'cuda')
                t0 = time.perf_counter()
                for images, *_ in loader:
                    assert images.shape == (args.batch, 3, args.size, args.size)
                return time.perf_counter() - t0  # worker start-up included, as train.py pays it once an epoch
            one_pass()  # the page cache warm, as for a dataset read before
            seconds = median(one_pass() for _ in range(args.repeats))
            rate = steps * args.batch / seconds
            row = {'num_workers': num_workers, 'images/s': f'{rate:.1f}'}
            if args.step_s:
                row['steps/s it feeds'] = f'{rate / args.batch:.2f}'
                row['keeps up with a step'] = 'yes' if rate >= args.batch / args.step_s else 'no'
            rows.append(row)
    print(format_table(rows))
    single = float(rows[0]['images/s']) if workers[0] == 0 else None
    notes = []
    if single:
        notes.append(f'One process decodes {single:.0f} images/s here; a step of batch B taking T seconds consumes B/T, '
                     f'so it needs about B / (T x {single:.0f}) workers, each on a core of its own.')
    if args.step_s:
        notes.append(f'A step: {args.step_s} s at batch {args.batch} = {args.batch / args.step_s:.1f} images/s.')
    print('\n'.join(notes))
    args.notes = notes
    return rows


# -----------------------------------------------------------------------------
# device: every CUDA figure the README lacks, in one command, each part within its own time budget

DEVICE_PARTS = {  # part -> its budget in seconds (480 in all: a lent GPU's 15 minutes hold the machine's start too)
    'cuda_tests': 40, 'train_d16': 90, 'steps_d16': 95, 'steps_d30': 50, 'max_batch_d16': 60, 'semantic_chunk': 45,
    'compile': 60, 'sampling_d16': 40}
DEVICE_NEEDS = ('numpy', 'PIL', 'scipy', 'tqdm', 'open_clip', 'safetensors', 'huggingface_hub', 'pytest')
PEAK_BF16_FLOPS = {'H200': 989e12, 'H100': 989e12, 'A100': 312e12, 'L40S': 362e12, 'L4': 121e12, 'A10': 125e12}
STEP_VARIANTS_D16 = 'frozen,mvp,mvp_semantic,mvp_semantic_rollout,prefilled,lora,full'


def device_args(parser):
    parser.add_argument('--out_dir', default='docs/device', help='where <device>.json and <device>.md go')
    parser.add_argument('--official', default=None, metavar='PATH', help='a checkout of FoundationVision/VAR carried '
                        'along: its sampler beside ours, and the parity tests')
    parser.add_argument('--dry_run', action='store_true', help='tiny sizes on the CPU, the same parts and files (the '
                        'test suite runs this); CUDA-only parts are recorded as skipped')
    parser.add_argument('--parts', default=','.join(DEVICE_PARTS), help='comma-separated subset of the parts')


def missing_packages() -> List[str]:
    import importlib.util
    return [name for name in DEVICE_NEEDS if importlib.util.find_spec(name) is None]


def run_within(cmd: List[str], seconds: float, env: Optional[dict] = None) -> dict:
    """A command with a time limit: {'rc', 'seconds', 'timed_out', 'tail'} (the last lines of its output). On the
    limit its whole process group goes (fullsize's workers, train.py's data workers), so nothing it started keeps the
    GPU busy for the next part; a budget already spent times out at once."""
    t0 = time.time()
    if seconds < 1:
        return {'rc': None, 'seconds': 0.0, 'timed_out': True, 'tail': 'not started: the part\'s budget was spent'}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, **(env or {})}, start_new_session=True)
    try:
        output, timed_out = proc.communicate(timeout=seconds)[0], False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, timed_out = proc.communicate()[0], True
    return {'rc': None if timed_out else proc.returncode, 'seconds': round(time.time() - t0, 1), 'timed_out': timed_out,
            'tail': '\n'.join((output or '').strip().splitlines()[-8:])}


def part_status(records) -> str:
    """done when every run of a part ended well; timeout when one ran out of the budget; else failed."""
    records = list(records)
    if all(r.get('rc') == 0 for r in records):
        return 'done'
    return 'timeout' if any(r.get('timed_out') for r in records) else 'failed'


def bench_json(name: str, flags: List[str], seconds: float, folder: str, tag: str) -> dict:
    """bench.py NAME FLAGS in its own process within `seconds`: the run's record, with its JSON ('result') if it ended."""
    path = os.path.join(folder, f'{tag}.json')
    record = run_within([sys.executable, '-m', 'tools.bench', name, *flags, '--json', path], seconds)
    if record['rc'] == 0 and os.path.isfile(path):
        with open(path) as f:
            record['result'] = json.load(f)
    return record


def mfu(raw: dict, batch: int, device_name: str) -> Optional[float]:
    """Model FLOPs utilisation of a step, bf16 dense peak: the VAR's matrix work only, 2 x params x tokens for the
    forward and as much for the input gradient, 2 more for weight gradients when the whole VAR trains (attention
    scores, the VQVAE and CLIP uncounted, so it reads low for the semantic rows)."""
    peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in device_name), None)
    if peak is None or not raw.get('step'):
        return None
    per_token = (6 if raw['trainable'] >= raw['var_params'] else 4) * raw['var_params']
    return per_token * raw['L'] * batch / raw['step'] / peak


def add_throughput(result: dict, batch: int, device_name: str):
    """A step table's rows get images/s and MFU, from the raw figures of the same variants (in the same order)."""
    for row, raw in zip(result.get('rows', []), (result.get('raw') or {}).values()):
        raw['mfu'] = mfu(raw, batch, device_name)
        row['images/s'] = f'{batch / raw["step"]:.1f}'
        row['MFU (bf16 peak)'] = 'n/a' if raw['mfu'] is None else f'{100 * raw["mfu"]:.1f}%'


def step_part(variants: str, depth: int, extra: List[str], dry: bool, seconds: float, folder: str, tag: str) -> dict:
    """A step table: bench.py fullsize at the released size on the GPU; the tiny `training` benchmark in a dry run."""
    if dry:
        return bench_json('training', ['--variants', variants, '--batch', '2', '--repeats', '1', '--warmup', '1',
                                       '--in_process', *extra], seconds, folder, tag)
    return bench_json('fullsize', ['--device', 'cuda', '--depth', str(depth), '--variants', variants, '--batch', '16',
                                   '--repeats', '3', '--warmup', '2', *extra], seconds, folder, tag)


def train_part(dry: bool, seconds: float, folder: str) -> dict:
    """train.py end to end with CE + both semantic losses: 20 steps straight, and 10 + 10 resumed; the loss finite,
    the checkpoint written, the resumed prompt against the straight one."""
    t0 = time.time()
    if dry:
        base = ['--backbone', 'checkpoints/shapes', '--data', 'shapes', '--shapes_n', '64', '--batch_size', '4']
        steps = 2
    else:
        data = os.path.join(folder, 'jpegs')
        synthetic_jpegs(data, 160, 320, 256)
        base = ['--backbone', 'released-random', '--depth', '16', '--clip_pretrained', 'none', '--data', data,
                '--batch_size', '8']
        steps = 20
    base += ['--sample_every', '0', '--log_every', '1', '--ckpt_every', str(steps // 2), '--device', 'cpu' if dry else 'cuda']
    runs = {}
    for name, extra in (('straight', ['--max_steps', str(steps)]), ('first_half', ['--max_steps', str(steps // 2)]),
                        ('resumed', ['--max_steps', str(steps), '--resume', 'auto'])):
        out = os.path.join(folder, 'train_straight' if name == 'straight' else 'train_resumed')
        runs[name] = run_within([sys.executable, 'train.py', *base, *extra, '--out_dir', out],
                                seconds - (time.time() - t0))
        if runs[name]['rc'] != 0:
            return {'status': part_status([runs[name]]), 'runs': runs}
    ckpts = {k: torch.load(os.path.join(folder, f'train_{k}', 'ckpt.pt'), map_location='cpu', weights_only=True)
             for k in ('straight', 'resumed')}
    with open(os.path.join(folder, 'train_straight', 'log.jsonl')) as f:
        log = [json.loads(line) for line in f if line.strip()]
    a, b = (ckpts[k]['parts']['prompt.tokens'].float() for k in ('straight', 'resumed'))
    return {'status': 'done', 'runs': runs, 'steps': ckpts['straight']['step'], 'last_row': log[-1],
            'losses_finite': all(math.isfinite(r['loss']) for r in log), 'resume_exact': bool(torch.equal(a, b)),
            'resume_max_abs_diff': (a - b).abs().max().item()}


def device_part(part: str, args, dry: bool, seconds: float, folder: str) -> dict:
    """One part of the device check -> its record: 'status' done / failed / timeout / skipped, and its figures."""
    cuda_only = {'max_batch_d16': 'the largest batch is found by running out of CUDA memory',
                 'semantic_chunk': 'the chunk only changes memory, which the CPU does not run out of',
                 'compile': 'torch.compile builds its kernels for minutes on the CPU'}
    if dry and part in cuda_only:
        return {'status': 'skipped', 'note': f'dry run: {cuda_only[part]}'}
    if part == 'cuda_tests':
        if dry:
            return {'status': 'skipped', 'note': 'dry run: tests/test_cuda.py skips itself without CUDA'}
        tests = ['tests/test_cuda.py'] + (['tests/test_official_parity.py'] if args.official else [])
        record = run_within([sys.executable, '-m', 'pytest', '-q', *tests], seconds,
                            env={'VAR_OFFICIAL': args.official} if args.official else None)
        return {**record, 'status': part_status([record])}
    if part == 'train_d16':
        return train_part(dry, seconds, folder)
    if part in ('steps_d16', 'steps_d30', 'max_batch_d16', 'compile'):
        variants, depth, extra = {'steps_d16': (STEP_VARIANTS_D16, 16, []),
                                  'steps_d30': ('mvp_semantic,prefilled', 30, []),
                                  'max_batch_d16': ('mvp_semantic,prefilled', 16, ['--max_batch', '--repeats', '1']),
                                  'compile': ('mvp_semantic', 16, ['--compile'])}[part]
        if dry and part == 'steps_d16':
            variants = 'mvp,mvp_semantic'  # the tiny table's time is the suite's
        record = step_part(variants, depth, extra, dry, seconds, folder, part)
    elif part == 'semantic_chunk':
        record = {'chunks': {}}
        t0 = time.time()
        for chunk in ('1', '4', '8'):
            record['chunks'][chunk] = step_part('mvp_semantic', 16, ['--semantic_chunk', chunk], dry,
                                                seconds - (time.time() - t0), folder, f'chunk{chunk}')
        return {**record, 'status': part_status(record['chunks'].values())}
    elif part == 'sampling_d16':
        record = {'runs': {}}
        t0 = time.time()
        settings = [('b2_fp32', ['--batch', '2', '--dtype', 'fp32'])] if dry else \
            [(f'b{b}_{d}', ['--batch', str(b), '--dtype', d, '--depth', '16', '--device', 'cuda'])
             for b in (1, 64) for d in ('fp32', 'bf16')]
        for tag, flags in settings:
            official = ['--official', args.official] if args.official and not dry and 'fp32' in tag else []
            record['runs'][tag] = bench_json('sampling', [*flags, '--kv', 'on', '--repeats', '1' if dry else '3',
                                                          *official], seconds - (time.time() - t0), folder, f'sampling_{tag}')
        return {**record, 'status': part_status(record['runs'].values())}
    else:
        raise ValueError(part)
    return {**record, 'status': part_status([record])}


def device_markdown(report: dict) -> str:
    """The check's record as one Markdown page: each part's status and time, then its table."""
    lines = [f'# Device check: {report["device"]}', '', f'`{report["command"]}` on {report["date"]}; {report["env"]}.',
             f'{report["seconds"]:.0f} s in all.', '', '| part | status | seconds (budget) | note |', '|---|---|---|---|']
    for part, r in report['parts'].items():
        lines.append(f'| {part} | {r["status"]} | {r.get("seconds", "–")} ({DEVICE_PARTS[part]}) | {r.get("note", "")} |')
    for part, r in report['parts'].items():
        tables = [(part, r)] if 'result' in r else [(f'{part}: {k}', v) for k, v in {**r.get('chunks', {}),
                                                                                    **r.get('runs', {})}.items()]
        for title, t in tables:
            if 'result' in t:
                lines += ['', f'## {title}', '', format_table(t['result']['rows'], markdown=True)]
    train = report['parts'].get('train_d16', {})
    if train.get('status') == 'done':
        lines += ['', '## train_d16', '', f'{train["steps"]} steps, losses finite: {train["losses_finite"]}; last row: '
                  f'{json.dumps(train["last_row"])}; resumed at half way, the prompt equals the straight run\'s: '
                  f'{train["resume_exact"]} (largest difference {train["resume_max_abs_diff"]:.3g}).']
    return '\n'.join(lines) + '\n'


def write_device_report(report: dict, out_dir: str, slug: str):
    with open(os.path.join(out_dir, f'{slug}.json'), 'w') as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out_dir, f'{slug}.md'), 'w') as f:
        f.write(device_markdown(report))


@benchmark(add_args=device_args)
def device(args) -> Optional[List[dict]]:
    """Every CUDA figure in one command (tests, train.py at d16, step tables, largest batch, chunks, compile, sampling)."""
    missing = missing_packages()
    if missing:
        raise SystemExit(f'error: this machine lacks {", ".join(missing)}: bring them as wheels (docs/device.md)')
    parts = [p.strip() for p in args.parts.split(',') if p.strip()]
    unknown = [p for p in parts if p not in DEVICE_PARTS]
    if unknown or not parts:
        raise SystemExit(f'error: unknown --parts {unknown}; choose from {", ".join(DEVICE_PARTS)}')
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit('error: no CUDA device here: the device check runs on a GPU (--dry_run: tiny, on the CPU)')
    if args.official and not os.path.isfile(os.path.join(args.official, 'models', 'var.py')):
        raise SystemExit(f'error: --official {args.official} is not a checkout of FoundationVision/VAR (no models/var.py)')
    device_name = 'cpu (dry run)' if args.dry_run else torch.cuda.get_device_name(0)
    args.out_dir = os.path.abspath(args.out_dir)  # the parts run in the repository's folder
    os.makedirs(args.out_dir, exist_ok=True)
    work = os.path.join(args.out_dir, 'work')  # the parts' own files; the record is the .json and .md beside it
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    t0 = time.time()
    report = {'device': device_name, 'date': datetime.datetime.now().strftime('%Y-%m-%d %H:%M'),
              'command': 'python -m tools.bench device ' + ' '.join(sys.argv[2:]), 'env': environment(torch.device('cpu'
              if args.dry_run else 'cuda')), 'parts': {}}
    slug = ''.join(c if c.isalnum() else '_' for c in device_name).strip('_')
    for part in parts:
        started = time.time()
        print(f'{part} (budget {DEVICE_PARTS[part]} s) ...', flush=True)
        try:
            record = device_part(part, args, args.dry_run, DEVICE_PARTS[part], work)
            for r in ([record] if 'result' in record else list(record.get('chunks', {}).values())):
                add_throughput(r.get('result', {}), 2 if args.dry_run else 16, device_name)
        except Exception as e:  # one broken part must not lose the others' figures
            first_line = (str(e).strip().splitlines() or [''])[0][:300]
            record = {'status': 'failed', 'note': f'{type(e).__name__}: {first_line}'}
        record.setdefault('seconds', round(time.time() - started, 1))
        if record['status'] == 'timeout':
            record['note'] = f'budget of {DEVICE_PARTS[part]} s spent: skipped the rest of this part'
        report['parts'][part] = record
        report['seconds'] = round(time.time() - t0, 1)
        write_device_report(report, args.out_dir, slug)  # after every part: a machine taken away keeps what was done
        print(f'{part}: {record["status"]} in {record["seconds"]} s', flush=True)
    shutil.rmtree(work, ignore_errors=True)
    print(f'wrote {os.path.join(args.out_dir, slug)}.json and .md in {report["seconds"]:.0f} s')
    return None


# -----------------------------------------------------------------------------
# calibration: shared/calibration.md's step, to place this machine against the slowest CPU kind here

def calibration_args(parser):
    parser.add_argument('--sizes', default='4x128x128,6x192x128',
                        help='depth x width x batch, comma-separated (default: calibration.md\'s rows)')
    parser.set_defaults(threads=2, repeats=3)


@benchmark(add_args=calibration_args)
def calibration(args) -> List[dict]:
    """One fp32 AdamW step of a VAR on random tokens at scales 1-8, as shared/calibration.md measures it."""
    device = torch.device(args.device)
    sync = synchronizer(device)
    patch_nums = (1, 2, 3, 4, 6, 8)
    print(f'calibration: fp32, vocab 1024, Cvae 16, 10 classes, scales {patch_nums}, random tokens; '
          f'CPU kernels {torch.backends.cpu.get_cpu_capability()}; the minimum of {args.repeats} steps after a warm-up')
    rows = []
    for size in args.sizes.split(','):
        depth, width, batch = (int(v) for v in size.split('x'))
        torch.manual_seed(args.seed)
        var = VAR(vocab_size=1024, z_channels=16, depth=depth, width=width, num_classes=10,
                  patch_nums=patch_nums).to(device).train()
        opt = torch.optim.AdamW(var.parameters(), lr=1e-4)
        labels = torch.randint(0, 10, (batch,), device=device)
        x_BLCv = torch.randn(batch, var.L - var.first_l, 16, device=device)
        target_BL = torch.randint(0, 1024, (batch, var.L), device=device)

        def step() -> float:
            sync()
            t = time.perf_counter()
            logits_BLV = var(var.class_condition(labels), x_BLCv)
            F.cross_entropy(logits_BLV.flatten(0, 1), target_BL.flatten()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            return time.perf_counter() - t

        step()
        seconds = min(step() for _ in range(args.repeats))
        params = sum(p.numel() for p in var.parameters())
        rows.append({'VAR': f'depth {depth}, width {width}', 'parameters': f'{params / 1e6:.2f}M', 'batch': batch,
                     's/step': f'{seconds:.2f}', '3,000 steps': f'{3000 * seconds / 60:.0f} min'})
    print(format_table(rows))
    return rows


# -----------------------------------------------------------------------------


def common_options() -> argparse.ArgumentParser:
    """The options every benchmark has. A new parser for every benchmark: argparse shares a parent's option objects
    among its children, so one benchmark's set_defaults (e.g. of --repeats) would change them all."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--device', default='cpu', help='cpu (default) or cuda')
    common.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads (default 1: the models are tiny, and one thread gives stable numbers '
                             'on a shared machine, where more threads than free cores collapse); 0: torch\'s default')
    common.add_argument('--repeats', type=int, default=3, help='timed runs after the warm-up; the median is reported')
    common.add_argument('--seed', type=int, default=0)
    common.add_argument('--out', default=None, help='append the table as markdown to this file')
    common.add_argument('--json', default=None, help='also write the rows, the notes and the raw figures to this file')
    return common


def main():
    parser = argparse.ArgumentParser(description='Benchmarks: python -m tools.bench <benchmark> [options]; python -m tools.bench <benchmark> -h')
    sub = parser.add_subparsers(dest='name', required=True, metavar='benchmark')
    for name, fn in BENCHMARKS.items():
        p = sub.add_parser(name, parents=[common_options()], help=(fn.__doc__ or '').strip().splitlines()[0])
        if name in EXTRA_ARGS:
            EXTRA_ARGS[name](p)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from device import parse_device
    try:
        device = parse_device(args.device)
    except ValueError as e:
        parser.error(str(e))
    env = environment(device)
    print(env)
    rows = BENCHMARKS[args.name](args)
    if args.out and rows:
        stamp = datetime.datetime.now().strftime('%Y-%m-%d %H:%M')
        with open(args.out, 'a') as f:
            f.write(f'\n### {args.name} ({stamp})\n\n{env}\n\n{format_table(rows, markdown=True)}\n')
            for note in getattr(args, 'notes', []):  # what a benchmark prints below its table, if it says
                f.write(f'\n{note}\n')
        print(f'appended to {args.out}')
    if args.json and rows:
        with open(args.json, 'w') as f:
            json.dump({'name': args.name, 'env': env, 'rows': rows, 'notes': getattr(args, 'notes', []),
                       'raw': getattr(args, 'raw', None)}, f, indent=1)


if __name__ == '__main__':
    main()
