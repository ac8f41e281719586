"""
Where MVP's prompts go, and the prompt tokens themselves (MVP paper, Sec. 3.1-3.2).

At every scale t the S x S token map gets learnable vectors added to the tokens of its outermost
square frame (4S - 4 tokens; a 1x1 map's frame is its one token). Past a threshold tau the frame
would get expensive, so a scale whose frame has more than tau tokens keeps only four L-shaped
prompts instead: each corner plus a = floor((tau - 4) / 8) tokens along both of its edges, N = 8a + 4
tokens (Sec. 3.2.1). The vectors are scattered into a zero map F_t and added to scale t's input
tokens (Eq. 6): the sequence does not grow.

The ablation placements of the paper's Table 5 use exactly the same number of tokens per scale.
All placements are built from one primitive: the concentric frames ("rings") of the map, each
filled corner-first when only part of it fits (so a frame filled with 8a + 4 tokens *is* the
four L-shapes).

    python frame_prompt.py --tau 20 --width 1024 --out prompt_layout.png
draws every scale's map with its prompt positions and prints the counts.
"""
import argparse
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

PLACEMENTS = ('frame', 'random', 'innermost', 'center_to_outer', 'sub_outermost')
Position = Tuple[int, int]  # (row, column) in an S x S map


def check_tau(tau: int):
    if tau < 4:
        raise ValueError(f'tau must be at least 4 (the four corners), got {tau}')


def frame_budget(S: int, tau: int) -> int:
    """Prompt tokens at an S x S scale: the whole outermost frame, or four L-shapes when that exceeds tau."""
    check_tau(tau)
    frame = 1 if S == 1 else 4 * S - 4
    if frame <= tau:
        return frame
    a = (tau - 4) // 8  # tokens along each edge from each corner
    return 8 * a + 4


def ring(S: int, n: int) -> List[Position]:
    """Frame n of an S x S map (0 = outermost), ordered corner-first: by distance along the frame to its nearest corner."""
    lo, hi = n, S - 1 - n
    cells = [(r, c) for r in range(lo, hi + 1) for c in range(lo, hi + 1) if min(r - lo, c - lo, hi - r, hi - c) == 0]
    corners = [(lo, lo), (lo, hi), (hi, lo), (hi, hi)]
    return sorted(cells, key=lambda p: (min(abs(p[0] - r) + abs(p[1] - c) for r, c in corners), p))


def scale_positions(S: int, budget: int, placement: str, rng: np.random.Generator) -> List[Position]:
    """`budget` positions of an S x S map for one placement design (MVP Sec. 3.2 and the Table 5 ablation)."""
    innermost = (S - 1) // 2  # index of the central frame
    if placement == 'frame':  # ours: the outermost frame, corner-first (L-shapes when cut by tau)
        order = [0]
    elif placement == 'innermost':  # from the center outward
        order = list(range(innermost, -1, -1))
    elif placement == 'center_to_outer':  # concentric frames from the center, skipping every other one
        order = list(range(innermost, -1, -2)) + list(range(innermost - 1, -1, -2))
    elif placement == 'sub_outermost':  # the second frame first, then outward to the outermost
        order = [1, 0] if innermost >= 1 else [0]
    elif placement == 'random':
        flat = rng.choice(S * S, size=budget, replace=False)
        return sorted((int(i) // S, int(i) % S) for i in flat)
    else:
        raise ValueError(f'unknown placement {placement!r}; choose from {PLACEMENTS}')
    cells = [p for n in order for p in ring(S, n)]
    return sorted(cells[:budget])


def prompt_positions(patch_nums: Sequence[int], tau: int = 20, placement: str = 'frame', first_scale: bool = False,
                     seed: int = 0) -> List[List[Position]]:
    """Per scale, the (row, col) positions that get a prompt token. The first scale (the class token) only if first_scale."""
    check_tau(tau)
    rng = np.random.default_rng(seed)
    positions = []
    for si, S in enumerate(patch_nums):
        budget = frame_budget(S, tau) if (si > 0 or first_scale) else 0
        positions.append(scale_positions(S, budget, placement, rng))
    return positions


class FramePrompt(nn.Module):
    """MVP's prompt tokens: one learnable vector per prompt position, as an additive map F (1, L, C) (Eq. 6)."""

    def __init__(self, patch_nums: Sequence[int], width: int, tau: int = 20, placement: str = 'frame',
                 first_scale: bool = False, seed: int = 0):
        super().__init__()
        self.patch_nums, self.width, self.tau, self.placement = tuple(patch_nums), width, tau, placement
        self.positions = prompt_positions(patch_nums, tau, placement, first_scale, seed)
        flat, begin = [], 0
        for S, cells in zip(self.patch_nums, self.positions):
            flat += [begin + r * S + c for r, c in cells]
            begin += S * S
        self.L = begin
        self.register_buffer('index', torch.tensor(flat, dtype=torch.long), persistent=False)  # (N,) into the sequence
        # Zero init: F = 0, so before the first step the model is exactly the pretrained VAR, and tuning
        # starts from its quality instead of from a random perturbation. The gradient at zero is not zero
        # (it is dLoss/dx at those positions), so the prompts still learn from the first step.
        self.tokens = nn.Parameter(torch.zeros(len(flat), width))  # (N, C)

    def counts(self) -> List[int]:
        return [len(cells) for cells in self.positions]

    def forward(self) -> torch.Tensor:  # the prompt map F: (1, L, C), zero away from the prompt positions
        return self.tokens.new_zeros(self.L, self.width).index_add(0, self.index, self.tokens).unsqueeze(0)


def draw_layout(patch_nums: Sequence[int], tau: int, placements: Sequence[str], first_scale: bool, seed: int, cell: int = 12):
    """A PIL image: one row per placement, one grid per scale, prompt positions filled."""
    from PIL import Image, ImageDraw
    gap, label_w, top = 10, 120, 16
    column = [max(S * cell, 56) + gap for S in patch_nums]  # room for the "SxS: n" label above small maps
    width = label_w + sum(column)
    row_h = max(patch_nums) * cell + gap + top
    img = Image.new('RGB', (width, row_h * len(placements) + 4), 'white')
    draw = ImageDraw.Draw(img)
    for row, placement in enumerate(placements):
        positions = prompt_positions(patch_nums, tau, placement, first_scale, seed)
        y0 = row * row_h + top
        draw.text((4, y0 + 4), placement, fill='black')
        x0 = label_w
        for S, cells, step in zip(patch_nums, positions, column):
            draw.text((x0, y0 - 13), f'{S}x{S}: {len(cells)}', fill='black')
            chosen = set(cells)
            for r in range(S):
                for c in range(S):
                    box = (x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell - 1, y0 + (r + 1) * cell - 1)
                    draw.rectangle(box, fill=(214, 69, 65) if (r, c) in chosen else (232, 232, 232), outline=(160, 160, 160))
            x0 += step
    return img


def main(argv=None):
    parser = argparse.ArgumentParser(description='Draw and count MVP frame-prompt positions per scale.')
    parser.add_argument('--tau', type=int, default=20, help='max prompt tokens per scale before the frame becomes four L-shapes')
    parser.add_argument('--patch_nums', default='1,2,3,4,5,6,8,10,13,16', help='the scales, comma-separated')
    parser.add_argument('--width', type=int, default=1024, help='transformer width (1024 for VAR-d16), for the parameter count')
    parser.add_argument('--first_scale', action='store_true', help='also prompt the 1x1 first scale (text-to-image)')
    parser.add_argument('--placement', default='frame', help=f'one of {PLACEMENTS}, or "all" for one row each')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random placement')
    parser.add_argument('--out', default='prompt_layout.png', help='where to write the picture')
    args = parser.parse_args(argv)
    try:
        patch_nums = [int(s) for s in args.patch_nums.split(',')]
        placements = PLACEMENTS if args.placement == 'all' else (args.placement,)
        for placement in placements:
            counts = [len(c) for c in prompt_positions(patch_nums, args.tau, placement, args.first_scale, args.seed)]
            total = sum(counts)
            print(f'{placement:>16}: tokens per scale {counts}, total {total}, '
                  f'trainable parameters {total * args.width:,} (width {args.width})')
        draw_layout(patch_nums, args.tau, placements, args.first_scale, args.seed).save(args.out)
    except ValueError as e:
        raise SystemExit(f'error: {e}')
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
