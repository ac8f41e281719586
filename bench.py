"""
Benchmarks, nanoGPT style: one file, no framework. Each benchmark is a function that prints a table and returns
its rows (a list of dicts, one per table row); `--out FILE` appends the table to FILE as markdown.

    python bench.py sampling                       # VAR next-scale sampling, KV cache on vs off (CPU, 1 thread)
    python bench.py sampling --threads 0           # torch's default thread count
    python bench.py sampling --device cuda --out bench.md
    python bench.py training                       # one training step's time and peak memory: frozen VAR, MVP,
                                                   # MVP + semantic loss, prefilled prompt, LoRA, full fine-tuning
    python bench.py scaling                        # sampling time vs the number of scales / final map side n

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
import statistics
import subprocess
import sys
import time
import types
from typing import Callable, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines import PrefilledPrompt, add_lora
from var import VAR
from vqvae import MultiScaleQuantizer, VQVAE

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


def timed_sample(vae: VQVAE, var: VAR, cond_BD, args, use_kv_cache: bool, sync):
    """One sampling run: (seconds per scale, seconds of all scales, seconds of VQVAE decoding, tokens)."""
    quant = vae.quantize
    marks = []
    original = quant.next_autoregressive_input  # called once at the end of every scale: a timestamp per scale

    def hooked(*a, **kw):
        out = original(*a, **kw)
        sync()
        marks.append(time.perf_counter())
        return out

    quant.next_autoregressive_input = hooked  # on this instance only
    try:
        sync()
        t0 = time.perf_counter()
        idx = var.generate(vae, cond_BD, cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                           use_kv_cache=use_kv_cache)
        sync()
        t1 = time.perf_counter()
    finally:
        del quant.next_autoregressive_input
    with torch.no_grad():
        vae.idx_to_img(idx)
    sync()
    t2 = time.perf_counter()
    per_scale = [b - a for a, b in zip([t0] + marks[:-1], marks)]
    return per_scale, t1 - t0, t2 - t1, idx


@benchmark(add_args=sampling_args)
def sampling(args) -> List[dict]:
    """VAR sampling speed (tiny random model, 64px): images/s and per-scale time, KV cache on vs off."""
    device = torch.device(args.device)
    sync = synchronizer(device)
    vae, var = tiny_backbone(device, args.seed, ch=32, ch_mult=(1, 1, 2, 2))
    label = torch.arange(args.batch, device=device) % var.num_classes
    cond = var.class_condition(label).detach()
    print(f'sampling: batch {args.batch}, cfg {args.cfg}, top_k {args.top_k}, top_p {args.top_p}; '
          f'VAR depth {var.depth} width {var.width}, vocab {var.vocab_size}, patch_nums {var.patch_nums} '
          f'(L={var.L}), VQVAE -> {vae.image_size}px; warm-up + median of {args.repeats}')
    for kv in (True, False):  # warm-up
        timed_sample(vae, var, cond, args, kv, sync)
    runs = {True: [], False: []}
    for _ in range(args.repeats):  # interleaved, so that a noisy neighbour hurts both modes alike
        for kv in (True, False):
            runs[kv].append(timed_sample(vae, var, cond, args, kv, sync))
    results, tokens = {}, {}
    for kv in (True, False):
        results[kv] = dict(per_scale=[median(r[0][si] for r in runs[kv]) for si in range(len(var.patch_nums))],
                           scales=median(r[1] for r in runs[kv]), decode=median(r[2] for r in runs[kv]),
                           total=median(r[1] + r[2] for r in runs[kv]))
        tokens[kv] = runs[kv][0][3]
    same = all(torch.equal(a, b) for a, b in zip(tokens[True], tokens[False]))

    ms = lambda s: f'{1e3 * s:.2f}'
    speedup = lambda off, on: f'{off / on:.2f}x'  # time without the cache / time with it
    rows = []
    for si, pn in enumerate(var.patch_nums):
        on, off = results[True]['per_scale'][si], results[False]['per_scale'][si]
        rows.append({'stage': f'scale {si + 1} ({pn}x{pn})', 'unit': 'ms', 'KV on': ms(on), 'KV off': ms(off),
                     'speed-up': speedup(off, on)})
    for key, name in (('scales', 'all scales (tokens)'), ('decode', 'VQVAE decode'), ('total', 'total')):
        on, off = results[True][key], results[False][key]
        rows.append({'stage': name, 'unit': 'ms', 'KV on': ms(on), 'KV off': ms(off), 'speed-up': speedup(off, on)})
    ips_on, ips_off = args.batch / results[True]['total'], args.batch / results[False]['total']
    rows.append({'stage': 'throughput', 'unit': 'images/s', 'KV on': f'{ips_on:.1f}', 'KV off': f'{ips_off:.1f}',
                 'speed-up': f'{ips_on / ips_off:.2f}x'})
    print(format_table(rows))
    print(f'KV cache speed-up (total): {results[False]["total"] / results[True]["total"]:.2f}x; '
          f'all scales: {results[False]["scales"] / results[True]["scales"]:.2f}x; '
          f'same tokens with and without the cache: {"yes" if same else "NO"}')
    return rows


# -----------------------------------------------------------------------------
# training: the cost of one training step, MVP against other ways of tuning the same frozen VAR

TRAIN_VARIANTS = {  # name (for --variants) -> row label
    'frozen': 'frozen VAR, no prompt (grad to x_BLCv)',
    'mvp': 'MVP frame prompt, CE',
    'mvp_semantic': 'MVP frame prompt, CE + semantic',
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


def training_worker(args, variant: str, measure_rss: bool = True) -> dict:
    """Build one variant, run warm-up + timed training steps, measure time and memory (RSS only if measure_rss:
    meaningful only in a fresh process that runs nothing else)."""
    from frame_prompt import FramePrompt
    from model import TunedParts, auto_dtype, conditions, mvp_loss, optimizer_step, teacher_forcing
    device = torch.device(args.device)
    dtype = auto_dtype(device)  # as train.py's --dtype auto: bf16 on CUDA and on CPUs with fast bf16 matrix units
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    sync = synchronizer(device)
    vae, var = tiny_backbone(device, args.seed, ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1)
    gen = torch.Generator().manual_seed(args.seed)
    images = (torch.rand(args.batch, 3, vae.image_size, vae.image_size, generator=gen) * 2 - 1).to(device)
    labels = (torch.arange(args.batch) % var.num_classes).to(device)
    frame = FramePrompt(var.patch_nums, var.width, args.tau)  # MVP's prompt; also the prefilled prompt's token count
    parts, semantic, trainable = None, None, []
    if variant in ('mvp', 'mvp_semantic'):
        parts = TunedParts(frame).to(device)
    elif variant == 'prefilled':
        parts = TunedParts(PrefilledPrompt(len(frame.index), var.width)).to(device)
    elif variant == 'lora':
        trainable = [p for w in add_lora(var, args.lora_rank) for p in (w.lora_A, w.lora_B)]
    elif variant == 'full':
        trainable = list(var.requires_grad_(True).parameters())
    elif variant != 'frozen':
        raise ValueError(f'unknown variant {variant!r}')
    if parts is not None:
        trainable = list(parts.parameters())
    else:
        parts = TunedParts()  # LoRA and full fine-tuning act inside the VAR: no prompt
    if variant == 'mvp_semantic':  # train.py's defaults: beta 0.6, lambda_sen = lambda_cap = 1, soft tokens at T = 1
        import open_clip
        from clip_loss import FrozenClip, SemanticLoss
        clip = FrozenClip(open_clip.model.CLIP(**TINY_CLIP_64), open_clip.get_tokenizer('ViT-B-32'))
        clip = clip.to(device).eval().requires_grad_(False)
        semantic = SemanticLoss(clip, vae)
    texts = ([f'a photo of a class {int(c)}' for c in labels],
             [f'a photo of a class {int(c)}, picture {i}' for i, c in enumerate(labels)], None)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0) if trainable else None
    seq_lens = []  # the sequence length the attention sees, read off the first block's input
    hook = var.blocks[0].attn.register_forward_pre_hook(lambda module, inputs: seq_lens.append(inputs[0].shape[1]))

    def step() -> float:
        """train.py's step (its own functions, autocast and grad scaler included) without the data loader; returns
        the time the VQVAE encoding finished. The frozen VAR has no step in train.py (nothing trains): the same
        forward under the same autocast, and a backward to its input, as the floor every tuning method pays."""
        idx, x_BLCv = teacher_forcing(vae, images)
        sync()
        t_encoded = time.perf_counter()
        if variant == 'frozen':
            x_BLCv.requires_grad_(True)
            with autocast:
                logits = var(conditions(var, None, labels, drop=True, cond_drop=0.1), x_BLCv)  # (B, L, V)
                ce = F.cross_entropy(logits.view(-1, var.vocab_size), torch.cat(idx, dim=1).view(-1))
            ce.backward()
            return t_encoded
        loss, _ = mvp_loss(var, parts, semantic, idx, x_BLCv, labels, texts, 0.1, False, autocast)
        optimizer_step(loss, optimizer, scaler, trainable, 1.0)
        return t_encoded

    # memory: the growth over what the process holds once everything is built, from before the first step on
    sync()
    rss_before = current_rss() if measure_rss else None
    reset = measure_rss and reset_peak_rss()
    if device.type == 'cuda':
        allocated_before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        step()
    hook.remove()
    times, encode_times = [], []
    for _ in range(args.repeats):
        sync()
        t0 = time.perf_counter()
        t_encoded = step()
        sync()
        times.append(time.perf_counter() - t0)
        encode_times.append(t_encoded - t0)
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated(device) - allocated_before
        memory = 'cuda'
    elif not measure_rss:
        peak, memory = None, 'n/a'
    else:
        peak_after = peak_rss(reset)
        peak = None if rss_before is None or peak_after is None else peak_after - rss_before
        memory = 'VmHWM' if reset else 'ru_maxrss'
    return dict(variant=variant, trainable=sum(p.numel() for p in trainable), step=median(times),
                encode=median(encode_times), peak=peak, memory=memory, seq=seq_lens[0] if seq_lens else None,
                L=var.L, input_grad_values=args.batch * (var.L - var.first_l) * var.Cvae,
                prompt_tokens=len(frame.index))


@benchmark(add_args=training_args)
def training(args) -> Optional[List[dict]]:
    """One training step (tiny random VAR, 64px, batch 16): frozen, MVP (+semantic), prefilled, LoRA, full FT."""
    if args.worker:  # inside a worker process
        print(WORKER_TAG + json.dumps(training_worker(args, args.worker)), flush=True)
        return None
    variants = [v.strip() for v in args.variants.split(',') if v.strip()]
    unknown = [v for v in variants if v not in TRAIN_VARIANTS]
    if unknown or not variants:
        raise SystemExit(f'error: unknown --variants {unknown}; choose from {", ".join(TRAIN_VARIANTS)}')
    from model import auto_dtype
    dtype = str(auto_dtype(torch.device(args.device))).replace('torch.', '')
    print(f'training: batch {args.batch}, tau {args.tau}, autocast {dtype} (train.py\'s --dtype auto); VAR depth 4 width 128 (4 heads), vocab 256, Cvae 16, '
          f'patch_nums {TINY_PATCH_NUMS}; VQVAE 64px (ch 16, ch_mult (1, 2, 2, 4)); random weights; '
          f'{"all variants in this process" if args.in_process else "each variant in a fresh process"}, '
          f'{args.warmup} warm-up steps + median of {args.repeats}')
    results = {}
    for v in variants:  # one after the other: never two workers competing for the cores
        if args.in_process:
            results[v] = training_worker(args, v, measure_rss=False)
            continue
        cmd = [sys.executable, os.path.abspath(__file__), 'training', '--worker', v, '--device', args.device,
               '--threads', str(args.threads), '--repeats', str(args.repeats), '--seed', str(args.seed),
               '--batch', str(args.batch), '--tau', str(args.tau), '--lora_rank', str(args.lora_rank),
               '--warmup', str(args.warmup)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        found = [line for line in proc.stdout.splitlines() if line.startswith(WORKER_TAG)]
        if proc.returncode != 0 or not found:
            raise RuntimeError(f'training worker {v!r} failed (exit code {proc.returncode}):\n{proc.stdout}{proc.stderr}')
        results[v] = json.loads(found[-1][len(WORKER_TAG):])

    rows = []
    for v in variants:
        r = results[v]
        rows.append({'variant': TRAIN_VARIANTS[v].format(rank=args.lora_rank), 'trainable params': f'{r["trainable"]:,}',
                     'step time ms': f'{1e3 * r["step"]:.1f}',
                     'peak memory MB': 'n/a' if r['peak'] is None else f'{r["peak"] / 2 ** 20:.1f}',
                     'seq len in attention': r['seq']})
    print(format_table(rows))
    first = next(iter(results.values()))
    notes = [f'Step: what train.py does per batch minus data loading: VQVAE encoding without grad (median '
             f'{1e3 * median(r["encode"] for r in results.values()):.1f} ms of every row), forward, loss, backward, '
             f'gradient clipping and an AdamW step over the trainable parameters, as train.py runs them '
             f'(model.teacher_forcing, model.mvp_loss, model.optimizer_step) under train.py\'s autocast.']
    if 'frozen' in results:
        notes.append(f'Frozen row: nothing trains and there is no optimizer step; the backward pass runs to the input '
                     f'x_BLCv (the VQVAE teacher-forcing input, made to require grad: {first["input_grad_values"]:,} '
                     f'values) through every block, as a prompt at the input needs too.')
    notes.append(f'MVP: {first["prompt_tokens"]} prompt tokens added onto the L = {first["L"]} input tokens (tau '
                 f'{args.tau}); prefilled: as many tokens prepended to the sequence. Semantic: tiny random CLIP at 64px, '
                 f'both images of Eq. 7 decoded by the VQVAE and encoded by CLIP.')
    if 'lora' in results:
        notes.append('LoRA: attn.proj runs as base(x) + B(A(x)); attn.mat_qkv as the merged weight W + BA, because '
                     'var.py calls F.linear(x, mat_qkv.weight) itself, so its backward computes a full 3C x C weight '
                     'gradient per block.')
    if first['memory'] == 'n/a':
        notes.append('Peak memory: n/a on the CPU with --in_process (all variants share one process and its allocator, '
                     'so resident memory cannot be told apart by variant); run without it.')
    elif first['memory'] == 'cuda':
        notes.append('Peak memory: torch.cuda.max_memory_allocated over the warm-up and timed steps minus '
                     'torch.cuda.memory_allocated just before the first step (models, batch and optimizer built): '
                     'activations, gradients, optimizer state and temporaries of training, not the weights.')
    else:
        peak = ('VmHWM in /proc/self/status, the kernel\'s peak-RSS mark, reset to the current RSS just before the first '
                'step by writing 5 to /proc/self/clear_refs; not ru_maxrss, which in an exec\'d process also holds '
                'the peak RSS of its parent') if first['memory'] == 'VmHWM' else \
            'getrusage(RUSAGE_SELF).ru_maxrss, the lifetime peak, which may include the parent\'s peak'
        notes.append(f'Peak memory: peak RSS growth in the variant\'s own fresh process = peak RSS over the warm-up and '
                     f'timed steps ({peak}) minus the RSS just before the first step (/proc/self/statm; models, batch '
                     f'and optimizer built). It counts activations, gradients, optimizer state, temporaries and '
                     f'whatever the allocators keep, not the weights: resident memory, not bytes allocated by torch.')
    print('\n'.join(notes))
    args.notes = notes  # main() appends them below the table to --out
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
    return common


def main():
    parser = argparse.ArgumentParser(description='Benchmarks: bench.py <benchmark> [options]; bench.py <benchmark> -h')
    sub = parser.add_subparsers(dest='name', required=True, metavar='benchmark')
    for name, fn in BENCHMARKS.items():
        p = sub.add_parser(name, parents=[common_options()], help=(fn.__doc__ or '').strip().splitlines()[0])
        if name in EXTRA_ARGS:
            EXTRA_ARGS[name](p)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda but CUDA is not available')
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


if __name__ == '__main__':
    main()
