"""
One training update of what MVP trains: the learning-rate schedule, and how the loss terms' gradients make the step
(--balance; the paper's Eq. 9 is 'sum').
"""
import math

import torch


def warmup_cosine_lr(step: int, total: int, lr: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to min_ratio * lr at step `total`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# How the terms' gradients make one update (--balance): 'sum' is Eq. 9 as written, one clip on the total; 'clip_each'
# clips each term's gradient on its own; 'normalize' rescales each semantic level's gradient to `ratio` times CE's norm,
# so the CLIP losses steer the direction without drowning CE (their raw gradients can dwarf CE's: docs/running.md); a
# level's lambda then only turns it on or off, since the rescaling cancels it.
BALANCES = ('sum', 'clip_each', 'normalize')


def norm_of(grads) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def term_gradients(terms: dict, params, scale=1.0, keep_graph: bool = False, norms_only: bool = False) -> dict:
    """{term: its gradient at params (a list like params), or with norms_only its norm alone}, each term through the
    one shared graph (kept after the last with keep_graph, for a backward of the sum). scale: the grad scaler's
    factor (fp16), divided out again."""
    out, names = {}, list(terms)
    for i, name in enumerate(names):
        keep = keep_graph or i < len(names) - 1
        found = torch.autograd.grad(terms[name] * scale, params, retain_graph=keep, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g / scale for p, g in zip(params, found)]
        out[name] = norm_of(grads) if norms_only else grads  # norms only: no copy of a large model's gradient kept
    return out


def combine(grads: dict, norms: dict, balance: str, grad_clip: float, ratio: float):
    """One update direction from the terms' gradients and their norms (BALANCES) -> (gradient list, whether a clip
    bound)."""
    if balance == 'clip_each':
        factors = {name: torch.clamp(grad_clip / (n + 1e-6), max=1.0) for name, n in norms.items()}
        bound = any(bool(n > grad_clip) for n in norms.values())
    elif balance == 'normalize':
        factors = {name: (1.0 if name == 'ce' else ratio * norms['ce'] / (n + 1e-12)) for name, n in norms.items()}
        bound = False
    else:
        factors, bound = {name: 1.0 for name in grads}, False
    total = [sum(factors[name] * grads[name][i] for name in grads) for i in range(len(next(iter(grads.values()))))]
    return total, bound


def optimizer_step(terms: dict, optimizer, scaler, params, grad_clip: float, balance: str = 'sum', ratio: float = 0.1,
                   record: bool = False, reduce=None):
    """Backward (through the grad scaler for fp16), balance, clip, step -> (the update's gradient norm before the
    global clip, record).
    record: {'grad_<term>': each term's gradient norm at the trainable parameters, 'clipped': whether a clip bound},
    taken from each term's own backward (the logged steps only, in the 'sum' balance: it costs a backward per term).
    reduce: averages a gradient list over DDP's processes, where the gradients were taken term by term."""
    optimizer.zero_grad(set_to_none=True)
    # the scaler's factor as a tensor: scale() also sets the scaler up, which unscale_ needs (fp16)
    scale = scaler.scale(torch.ones((), device=params[0].device)) if scaler.is_enabled() else 1.0
    if balance == 'sum':
        norms = term_gradients(terms, params, scale, keep_graph=True, norms_only=True) if record else {}
        scaler.scale(sum(terms.values())).backward()  # Eq. 9
        bound = False
    else:
        grads = term_gradients(terms, params, scale)
        if reduce is not None:
            grads = {name: reduce(g) for name, g in grads.items()}
        norms = {name: norm_of(g) for name, g in grads.items()}
        total, bound = combine(grads, norms, balance, grad_clip, ratio)
        for p, g in zip(params, total):
            p.grad = (g * scale).to(p.dtype)  # scaled again: unscale_ below checks it for inf / NaN as it does a backward's
    scaler.unscale_(optimizer)
    clip_at = float('inf') if balance == 'clip_each' else grad_clip
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_at)
    scaler.step(optimizer)
    scaler.update()
    if not record:
        return grad_norm, {}
    row = {f'grad_{name}': n.item() for name, n in norms.items()}
    row['clipped'] = bound or (balance != 'clip_each' and grad_norm.item() > grad_clip)
    return grad_norm, row
