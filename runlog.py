"""
A run's log.jsonl (one JSON row per logged step, train.py writes it): writing and reading its rows, and losses.png
drawn from them with PIL alone, no plotting library.
"""
import json
import math
import os
import time
from typing import Optional

from PIL import Image, ImageDraw


def log_row(line: str) -> Optional[dict]:
    """A row of log.jsonl, or None for a blank or torn line (a kill or a full disk can leave the last one half-written)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and 'step' in row else None


def start_log(out_dir: str, step: int) -> str:
    """OUT_DIR/log.jsonl: a new run starts it empty; a resumed one drops the rows past its checkpoint."""
    path = os.path.join(out_dir, 'log.jsonl')
    if os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if (row := log_row(line)) is not None and row['step'] <= step]
        with open(path, 'w') as f:
            f.writelines(kept)
    return path


def log_step(log_path: str, step: int, loss, losses: dict, grad_norm, record: dict, lr: float, t0: float, bar):
    """A row of log.jsonl: the losses, the gradient norm before the clip, each loss's own gradient norm (grad_ce,
    grad_sen, grad_cap: of the weighted terms, lambda included) and whether the clip bound."""
    row = {'step': step, 'loss': loss.item(), **{k: v.item() for k, v in losses.items()}, 'grad_norm': grad_norm.item(),
           **record, 'lr': lr, 'time': round(time.time() - t0, 2)}
    with open(log_path, 'a') as f:
        f.write(json.dumps(row) + '\n')
    shown = {k: f'{v:.4f}' for k, v in row.items() if k in ('loss', 'ce', 'sen', 'cap')}
    if bar.disable:
        print(f'step {step}/{bar.total}: ' + ', '.join(f'{k} {v}' for k, v in shown.items()) +
              f', {row["time"]:.0f}s', flush=True)
    else:
        bar.set_postfix(shown)


GRAD_KEYS = ('grad_ce', 'grad_sen', 'grad_cap')  # each loss's own gradient norm, as log_step records them
GRAD_COLOURS = {'grad_ce': (40, 90, 200), 'grad_sen': (220, 120, 20), 'grad_cap': (40, 160, 70)}


def plot_losses(log_path: str, png_path: str, keys=('loss', 'ce', 'sen', 'cap'), guess: Optional[float] = None,
                grad_clip: Optional[float] = None):
    """A small line plot of the logged losses, one panel per loss (no plotting library needed), and a last panel with
    each loss's gradient norm on a log scale. Dashed lines: `guess` in the CLIP losses' panels, log(batch size), what
    a contrastive loss pays for guessing; `grad_clip` in the gradients' panel."""
    with open(log_path) as f:
        rows = [row for line in f if (row := log_row(line)) is not None]
    finite = lambda k: [(r['step'], r[k]) for r in rows if math.isfinite(r.get(k, math.nan))]  # a skipped fp16 step
    panels = [(k, {k: finite(k)}, (guess, 'log B') if k in ('sen', 'cap') else None) for k in keys if finite(k)]
    grads = {k: [(r['step'], math.log10(max(r[k], 1e-12))) for r in rows if math.isfinite(r.get(k, math.nan))]
             for k in GRAD_KEYS}
    if any(grads.values()):
        clip_line = (math.log10(grad_clip), 'clip') if grad_clip else None
        panels.append(('log10 gradient norm: ce blue, sen orange, cap green', {k: v for k, v in grads.items() if v},
                       clip_line))
    if not panels:
        return
    W, H, pad = 360, 200, 30
    img = Image.new('RGB', (W * len(panels), H), 'white')
    draw = ImageDraw.Draw(img)
    smax = max(max(r['step'] for r in rows), 1)
    for i, (title, series, line_at) in enumerate(panels):
        draw_panel(draw, i * W, W, H, pad, smax, title, series, line_at)
    img.save(png_path)


def draw_panel(draw, x0: int, W: int, H: int, pad: int, smax: int, title: str, series: dict, line_at):
    """One panel: each series {key: [(step, value)]} as a line (GRAD_COLOURS, else blue); line_at, (value, name) or
    None, dashed in red."""
    line_at, line_name = line_at or (None, None)
    values = [v for pts in series.values() for _, v in pts] + ([line_at] if line_at is not None else [])
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1e-6
    y_of = lambda v: H - pad - (v - lo) / (hi - lo) * (H - 2 * pad)
    draw.rectangle((x0 + pad, pad, x0 + W - pad, H - pad), outline=(180, 180, 180))
    if line_at is not None:
        for x in range(x0 + pad, x0 + W - pad, 8):
            draw.line([(x, y_of(line_at)), (min(x + 4, x0 + W - pad), y_of(line_at))], fill=(200, 60, 60), width=1)
        draw.text((x0 + W - pad - 70, y_of(line_at) - 12), f'{line_name} = {line_at:.2f}', fill=(200, 60, 60))
    for key, pts in series.items():
        xy = [(x0 + pad + (s / smax) * (W - 2 * pad), y_of(v)) for s, v in pts]
        if len(xy) > 1:
            draw.line(xy, fill=GRAD_COLOURS.get(key, (40, 90, 200)), width=2)
    last = f'  (last {next(iter(series.values()))[-1][1]:.4f})' if len(series) == 1 else ''
    draw.text((x0 + pad, 8), title + last, fill='black')
    draw.text((x0 + 2, pad - 4), f'{hi:.3g}', fill='gray')
    draw.text((x0 + 2, H - pad - 6), f'{lo:.3g}', fill='gray')
    draw.text((x0 + W - pad - 30, H - pad + 6), f'step {smax}', fill='gray')
