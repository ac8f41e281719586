"""
Benchmarks, nanoGPT style: one file, no framework. Each benchmark is a function that prints a table and returns
its rows (a list of dicts, one per table row); `--out FILE` appends the table to FILE as markdown.

    python bench.py sampling                       # VAR next-scale sampling, KV cache on vs off (CPU, 1 thread)
    python bench.py sampling --threads 0           # torch's default thread count
    python bench.py sampling --device cuda --out bench.md

Adding a benchmark: write `def name(args) -> List[dict]`, decorate it with @benchmark (its docstring's first line
is the help text); give it its own command-line options with @benchmark(add_args=fn), fn(parser) adding them.
"""
import argparse
import datetime
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from var import VAR
from vqvae import VQVAE

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


def tiny_backbone(device: torch.device, seed: int = 0):
    """Random tiny VAR (depth 4, width 128, 4 heads, vocab 256, Cvae 16, 7 scales up to 8x8) + a matching 64px VQVAE."""
    patch_nums = (1, 2, 3, 4, 5, 6, 8)
    torch.manual_seed(seed)
    vae = VQVAE(vocab_size=256, z_channels=16, ch=32, ch_mult=(1, 1, 2, 2), patch_nums=patch_nums)
    var = VAR(vocab_size=256, z_channels=16, depth=4, width=128, num_heads=4, num_classes=10, patch_nums=patch_nums)
    with torch.no_grad():  # open the residual gates (from-scratch init has them at ~1e-5): a "trained-like" model
        for p in var.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return vae.to(device).eval(), var.to(device).eval()


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
    vae, var = tiny_backbone(device, args.seed)
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


def main():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--device', default='cpu', help='cpu (default) or cuda')
    common.add_argument('--threads', type=int, default=1,
                        help='torch CPU threads (default 1: the models are tiny, and one thread gives stable numbers '
                             'on a shared machine, where more threads than free cores collapse); 0: torch\'s default')
    common.add_argument('--repeats', type=int, default=3, help='timed runs after one warm-up; the median is reported')
    common.add_argument('--seed', type=int, default=0)
    common.add_argument('--out', default=None, help='append the table as markdown to this file')
    parser = argparse.ArgumentParser(description='Benchmarks: bench.py <benchmark> [options]; bench.py <benchmark> -h')
    sub = parser.add_subparsers(dest='name', required=True, metavar='benchmark')
    for name, fn in BENCHMARKS.items():
        p = sub.add_parser(name, parents=[common], help=(fn.__doc__ or '').strip().splitlines()[0])
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
    if args.out:
        stamp = datetime.datetime.now().strftime('%Y-%m-%d %H:%M')
        with open(args.out, 'a') as f:
            f.write(f'\n### {args.name} ({stamp})\n\n{env}\n\n{format_table(rows, markdown=True)}\n')
        print(f'appended to {args.out}')


if __name__ == '__main__':
    main()
