"""
The MVP core on tiny random models, fp32 on the CPU, offline:
  - frame_prompt.py: prompt geometry (frame / L-shapes / ablation placements), FramePrompt, the CLI;
  - var.py: the additive prompt map (Eq. 6) and the prefilled baseline (Table 4) in forward and generate;
  - clip_loss.py: soft token maps, the two decoded images of Eq. 7, the contrastive loss, L_semantic (Eq. 8),
    FrozenClip; pretrained.load_clip and the offline check of the CLIP weights;
  - gradients: with every network frozen, CE and L_semantic reach the prompt tokens and nothing else.

    python -m pytest -q tests/test_mvp_core.py

Expected counts and positions are written out from the paper's rule (Sec. 3.2.1), not from the code's.
"""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import clip_loss  # noqa: E402
from clip_loss import SemanticLoss, contrastive_loss, inter_anchor, soft_token_maps  # noqa: E402
from conftest import COUNT_CONNECTIONS, TINY_CLIP_CFG, offline_hub_env, write_hf_cache  # noqa: E402
from baselines import PrefilledPrompt  # noqa: E402
from frame_prompt import PLACEMENTS, FramePrompt, prompt_positions  # noqa: E402
from pretrained import load_clip  # noqa: E402

VAR_PN = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)  # VAR's 256px scales
TAUS = (4, 12, 20, 28)


# -----------------------------------------------------------------------------
# helpers written from the paper, independent of frame_prompt.py

def paper_count(S, tau):
    """Sec. 3.2.1: the outermost frame (4S - 4 tokens; one token for 1x1), or 8a + 4 with a = floor((tau - 4) / 8)."""
    frame = 1 if S == 1 else 4 * S - 4
    return frame if frame <= tau else 8 * ((tau - 4) // 8) + 4


def border(S):
    return {(r, c) for r in range(S) for c in range(S) if r in (0, S - 1) or c in (0, S - 1)}


def l_shapes(S, a):
    """Four L-shapes: each corner and a cells along both of its edges."""
    cells = set()
    for r0, dr in ((0, 1), (S - 1, -1)):
        for c0, dc in ((0, 1), (S - 1, -1)):
            for k in range(a + 1):
                cells.add((r0 + k * dr, c0))
                cells.add((r0, c0 + k * dc))
    return cells


def depth(S, r, c):  # which concentric frame (0 = outermost) a cell is in
    return min(r, c, S - 1 - r, S - 1 - c)


def tiny_batch(vae, var, B=2, seed=1, encode=False):
    """Token maps (random, or with encode those of random images: slower), the teacher-forcing input, class conditions."""
    g = torch.Generator().manual_seed(seed)
    if encode:
        idx = vae.img_to_idx(torch.rand(B, 3, vae.image_size, vae.image_size, generator=g) * 2 - 1)
    else:
        idx = [torch.randint(0, vae.vocab_size, (B, pn * pn), generator=g) for pn in vae.patch_nums]
    x = vae.quantize.teacher_forcing_input(idx)
    cond = var.class_condition(torch.arange(B) % var.num_classes)
    return idx, x, cond


def scale_rows(prompt):
    """Per scale, the rows of prompt.tokens that belong to it."""
    rows, begin = [], 0
    for n in prompt.counts():
        rows.append(slice(begin, begin + n))
        begin += n
    return rows


def run_cli(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, 'frame_prompt.py'), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


# -----------------------------------------------------------------------------
# geometry

EXPECTED_COUNTS = {  # without the first scale; from the rule above, worked by hand
    4: [0, 4, 4, 4, 4, 4, 4, 4, 4, 4],
    12: [0, 4, 8, 12, 12, 12, 12, 12, 12, 12],
    20: [0, 4, 8, 12, 16, 20, 20, 20, 20, 20],
    28: [0, 4, 8, 12, 16, 20, 28, 28, 28, 28],
}


@pytest.mark.parametrize('tau', TAUS)
@pytest.mark.parametrize('first_scale', [False, True])
def test_counts_per_scale(tau, first_scale):
    counts = [len(p) for p in prompt_positions(VAR_PN, tau, 'frame', first_scale)]
    expected = [paper_count(S, tau) if (si > 0 or first_scale) else 0 for si, S in enumerate(VAR_PN)]
    assert counts == expected
    assert counts == [int(first_scale)] + EXPECTED_COUNTS[tau][1:]


def test_counts_tau20_totals():
    assert sum(map(len, prompt_positions(VAR_PN, 20))) == 140
    assert sum(map(len, prompt_positions(VAR_PN, 20, first_scale=True))) == 141
    assert prompt_positions(VAR_PN, 20, first_scale=True)[0] == [(0, 0)]


L_8x8_TAU20 = {(0, 0), (0, 1), (0, 2), (1, 0), (2, 0),
               (0, 7), (0, 6), (0, 5), (1, 7), (2, 7),
               (7, 0), (7, 1), (7, 2), (6, 0), (5, 0),
               (7, 7), (7, 6), (7, 5), (6, 7), (5, 7)}
L_16x16_TAU20 = {(0, 0), (0, 1), (0, 2), (1, 0), (2, 0),
                 (0, 15), (0, 14), (0, 13), (1, 15), (2, 15),
                 (15, 0), (15, 1), (15, 2), (14, 0), (13, 0),
                 (15, 15), (15, 14), (15, 13), (14, 15), (13, 15)}


def test_l_shapes_explicit():
    pos = dict(zip(VAR_PN, prompt_positions(VAR_PN, 20)))
    assert len(L_8x8_TAU20) == len(L_16x16_TAU20) == 20
    assert set(pos[8]) == L_8x8_TAU20 and len(pos[8]) == 20
    assert set(pos[16]) == L_16x16_TAU20 and len(pos[16]) == 20
    assert set(pos[10]) == l_shapes(10, 2) and set(pos[13]) == l_shapes(13, 2)


@pytest.mark.parametrize('tau', TAUS)
def test_frames_below_threshold_are_borders_above_are_l_shapes(tau):
    a = (tau - 4) // 8
    for S, cells in zip(VAR_PN, prompt_positions(VAR_PN, tau, first_scale=True)):
        assert len(cells) == len(set(cells))
        if S == 1:
            assert cells == [(0, 0)]
        elif 4 * S - 4 <= tau:
            assert set(cells) == border(S), (S, tau)
        else:
            assert set(cells) == l_shapes(S, a), (S, tau)


def test_tau4_is_the_four_corners():
    for S, cells in zip(VAR_PN, prompt_positions(VAR_PN, 4)):
        if S >= 2:  # S = 2: the border is the four corners too
            assert set(cells) == {(0, 0), (0, S - 1), (S - 1, 0), (S - 1, S - 1)}, S


def test_bad_tau_and_placement_raise():
    for tau in (3, 0, -1):
        with pytest.raises(ValueError):
            prompt_positions(VAR_PN, tau)
        with pytest.raises(ValueError):
            FramePrompt(VAR_PN, 8, tau=tau)
    with pytest.raises(ValueError):
        prompt_positions(VAR_PN, 20, placement='diagonal')
    with pytest.raises(ValueError):
        FramePrompt(VAR_PN, 8, placement='outermost')


def test_cli_bad_tau_is_one_line_error():
    res = run_cli('--tau', '3')
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:'), res.stderr
    assert 'Traceback' not in res.stderr and 'tau' in lines[0]


@pytest.mark.parametrize('tau', TAUS)
@pytest.mark.parametrize('first_scale', [False, True])
def test_placements_same_budget_unique_inside(tau, first_scale):
    reference = [len(p) for p in prompt_positions(VAR_PN, tau, 'frame', first_scale)]
    for placement in PLACEMENTS:
        positions = prompt_positions(VAR_PN, tau, placement, first_scale, seed=3)
        assert [len(p) for p in positions] == reference, placement
        for S, cells in zip(VAR_PN, positions):
            assert len(set(cells)) == len(cells), (placement, S)
            assert all(0 <= r < S and 0 <= c < S for r, c in cells), (placement, S)


def test_random_placement_seeded():
    a = prompt_positions(VAR_PN, 20, 'random', seed=0)
    b = prompt_positions(VAR_PN, 20, 'random', seed=0)
    c = prompt_positions(VAR_PN, 20, 'random', seed=1)
    assert a == b
    assert a != c
    assert not all(set(cells) <= border(S) for S, cells in zip(VAR_PN, a) if S >= 6)  # not just the frame


def test_innermost_contains_center():
    for S, cells in zip(VAR_PN, prompt_positions(VAR_PN, 20, 'innermost')):
        if S < 2:
            continue
        m = S // 2
        center = {(m, m)} if S % 2 else {(m - 1, m - 1), (m - 1, m), (m, m - 1), (m, m)}
        assert center <= set(cells), S
        # filled from the center outward: every cell more central than the outermost one used is used
        d_min = min(depth(S, r, c) for r, c in cells)
        assert {(r, c) for r in range(S) for c in range(S) if depth(S, r, c) > d_min} <= set(cells), S


def test_sub_outermost_avoids_the_outermost_frame():
    big_enough = 0
    for S, cells in zip(VAR_PN, prompt_positions(VAR_PN, 20, 'sub_outermost')):
        if S < 3:
            continue
        n_ring1 = 1 if S == 3 else 4 * (S - 2) - 4
        ring1 = {(r, c) for r in range(S) for c in range(S) if depth(S, r, c) == 1}
        if n_ring1 >= len(cells):
            big_enough += 1
            assert all(depth(S, r, c) == 1 for r, c in cells), S
        else:  # the second frame is taken whole, the rest comes from the outermost
            assert ring1 <= set(cells), S
            assert all(depth(S, r, c) <= 1 for r, c in cells), S
    assert big_enough == 4  # 8x8, 10x10, 13x13, 16x16 at tau 20


def test_center_to_outer_skips_a_frame_13x13():
    pos = dict(zip(VAR_PN, prompt_positions(VAR_PN, 20, 'center_to_outer')))
    cells = pos[13]
    assert len(cells) == 20
    per_frame = {}
    for r, c in cells:
        per_frame[depth(13, r, c)] = per_frame.get(depth(13, r, c), 0) + 1
    # frames 6 (center, 1 cell), 4 (5x5 ring, 16 cells), then 3 cells of frame 2; frame 5 = N-1 skipped
    assert per_frame == {6: 1, 4: 16, 2: 3}
    assert (6, 6) in cells


def test_frame_prompt_map_is_exact():
    width = 6
    fp = FramePrompt(VAR_PN, width, tau=20)
    L = sum(S * S for S in VAR_PN)
    assert fp.L == L
    assert fp.counts() == EXPECTED_COUNTS[20]
    assert fp.tokens.shape == (140, width)
    assert sum(p.numel() for p in fp.parameters()) == 140 * width
    assert sum(p.numel() for p in FramePrompt(VAR_PN, 1024, tau=20).parameters()) == 140 * 1024
    assert sum(p.numel() for p in FramePrompt(VAR_PN, 1024, tau=20, first_scale=True).parameters()) == 141 * 1024
    with torch.no_grad():
        fp.tokens.copy_(torch.randn(140, width) + 3.0)  # no token is (near) zero
    Fmap = fp()
    assert Fmap.shape == (1, L, width)
    flat, begin = [], 0  # sequence index of every prompt position, in the order of the positions
    for S, cells in zip(VAR_PN, fp.positions):
        flat += [begin + r * S + c for r, c in cells]
        begin += S * S
    mask = torch.zeros(L, dtype=torch.bool)
    mask[flat] = True
    assert torch.equal(Fmap[0, ~mask], torch.zeros(L - 140, width))
    assert (Fmap[0, mask] != 0).all()
    assert torch.equal(Fmap[0, flat], fp.tokens.detach())
    # scale 8x8 (begin offset 1+4+9+16+25+36 = 91): corner (0, 7) is sequence position 91 + 7
    assert (Fmap[0, 91 + 7] != 0).all() and (Fmap[0, 91 + 3] == 0).all()


def test_cli_draws_png(tmp_path):
    from PIL import Image
    out = tmp_path / 'layout.png'
    res = run_cli('--tau', '20', '--out', str(out))
    assert res.returncode == 0, res.stderr
    assert '[0, 4, 8, 12, 16, 20, 20, 20, 20, 20]' in res.stdout and 'total 140' in res.stdout
    with Image.open(out) as img:
        assert img.format == 'PNG'
        pixels = np.asarray(img.convert('RGB'))
    # every prompt cell is a filled 12x12 box with a 1-pixel outline: 10x10 red pixels inside
    red = int((pixels == np.array([214, 69, 65], dtype=np.uint8)).all(-1).sum())
    assert red == 140 * 10 * 10


# -----------------------------------------------------------------------------
# var.py with the prompt map and the prefilled baseline

def attention_lengths(var):
    """Record the sequence length entering the first block's attention."""
    seen = []
    handle = var.blocks[0].attn.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    return seen, handle


def test_zero_prompt_is_the_plain_model(tiny_vae, tiny_var):
    idx, x, cond = tiny_batch(tiny_vae, tiny_var, B=3)
    fp = FramePrompt(tiny_var.patch_nums, tiny_var.width, tau=4, first_scale=True)
    with torch.no_grad():
        plain = tiny_var(cond, x)
        seen, handle = attention_lengths(tiny_var)
        prompted = tiny_var(cond, x, prompt_1LC=fp())
        handle.remove()
    assert prompted.shape == (3, tiny_var.L, tiny_var.vocab_size)
    assert seen == [tiny_var.L]  # the sequence does not grow
    assert torch.equal(prompted, plain)
    a = tiny_var.generate(tiny_vae, cond, seed=5)
    b = tiny_var.generate(tiny_vae, cond, seed=5, prompt_1LC=fp().detach())
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize('first_scale', [False, True])
def test_prompt_changes_only_later_scales(tiny_vae, tiny_var, first_scale):
    idx, x, cond = tiny_batch(tiny_vae, tiny_var, B=2)
    fp = FramePrompt(tiny_var.patch_nums, tiny_var.width, tau=20, first_scale=first_scale)
    with torch.no_grad():
        fp.tokens.normal_(0, 0.5)
        plain = tiny_var(cond, x)
        prompted = tiny_var(cond, x, prompt_1LC=fp())
    for si, (b, e) in enumerate(tiny_var.begin_ends):
        if si == 0 and not first_scale:
            assert torch.equal(prompted[:, b:e], plain[:, b:e])
        else:
            assert not torch.allclose(prompted[:, b:e], plain[:, b:e], atol=1e-4), si


def test_prompt_at_one_scale_is_block_causal(tiny_vae, tiny_var):
    idx, x, cond = tiny_batch(tiny_vae, tiny_var, B=2)
    fp = FramePrompt(tiny_var.patch_nums, tiny_var.width, tau=20, first_scale=True)
    rows = scale_rows(fp)
    with torch.no_grad():
        plain = tiny_var(cond, x)
        for k in range(len(tiny_var.patch_nums)):
            fp.tokens.zero_()
            fp.tokens[rows[k]] = torch.randn(fp.counts()[k], tiny_var.width) * 0.5
            prompted = tiny_var(cond, x, prompt_1LC=fp())
            for si, (b, e) in enumerate(tiny_var.begin_ends):
                if si < k:
                    assert torch.equal(prompted[:, b:e], plain[:, b:e]), (k, si)
                else:
                    assert not torch.allclose(prompted[:, b:e], plain[:, b:e], atol=1e-4), (k, si)


def test_prefilled_prompt_grows_the_sequence(tiny_vae, tiny_var):
    idx, x, cond = tiny_batch(tiny_vae, tiny_var, B=2)
    P = 7
    torch.manual_seed(3)
    p1, p2 = PrefilledPrompt(P, tiny_var.width), PrefilledPrompt(P, tiny_var.width)
    assert p1().shape == (1, P, tiny_var.width) and sum(t.numel() for t in p1.parameters()) == P * tiny_var.width
    with torch.no_grad():
        p1.tokens.mul_(20)  # make the prefix matter at the tiny model's scale
        p2.tokens.mul_(20)
        plain = tiny_var(cond, x)
        seen, handle = attention_lengths(tiny_var)
        l1 = tiny_var(cond, x, prefix_1PC=p1())
        handle.remove()
        l2 = tiny_var(cond, x, prefix_1PC=p2())
    assert l1.shape == (2, tiny_var.L, tiny_var.vocab_size)
    assert seen == [tiny_var.L + P]
    b, e = tiny_var.begin_ends[0]  # the first scale sees the prefix, so its logits move
    assert not torch.allclose(l1[:, b:e], plain[:, b:e], atol=1e-4)
    assert not torch.allclose(l1[:, b:e], l2[:, b:e], atol=1e-4)


def test_prefix_attention_mask(tiny_var):
    """Every position sees the whole prefix; the prefix sees only itself; the sequence stays block-causal."""
    P, L = 3, tiny_var.L
    x = torch.zeros(2, L, tiny_var.width)
    seq, bias = tiny_var.prepend_prefix(x, torch.ones(1, P, tiny_var.width))
    assert seq.shape == (2, P + L, tiny_var.width) and bias.shape == (1, 1, P + L, P + L)
    assert torch.equal(seq[:, :P], torch.ones(2, P, tiny_var.width)) and torch.equal(seq[:, P:], x)
    bias = bias[0, 0]
    assert (bias[:, :P] == 0).all()
    assert torch.isneginf(bias[:P, P:]).all()
    scale = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(tiny_var.patch_nums)])
    visible = scale[:, None] >= scale[None, :]
    assert torch.equal(bias[P:, P:] == 0, visible) and torch.isneginf(bias[P:, P:][~visible]).all()


@pytest.mark.parametrize('kind', ['prompt', 'prefix'])
def test_generate_matches_teacher_forcing(tiny_vae, tiny_var, kind):
    """Greedy sampling without guidance picks, at every scale, the argmax of the teacher-forced logits
    computed from its own samples; with and without the KV cache."""
    cond = tiny_var.class_condition(torch.tensor([1, 3]))
    torch.manual_seed(4)
    kw = {}
    if kind == 'prompt':
        fp = FramePrompt(tiny_var.patch_nums, tiny_var.width, tau=20, first_scale=True)
        with torch.no_grad():
            fp.tokens.normal_(0, 0.5)
        kw['prompt_1LC'] = fp().detach()
    else:
        kw['prefix_1PC'] = PrefilledPrompt(5, tiny_var.width)().detach() * 20
    with torch.no_grad():
        cached = tiny_var.generate(tiny_vae, cond, cfg=0.0, top_k=1, seed=0, **kw)
        uncached = tiny_var.generate(tiny_vae, cond, cfg=0.0, top_k=1, seed=0, use_kv_cache=False, **kw)
        logits = tiny_var(cond, tiny_vae.quantize.teacher_forcing_input(cached), **kw)
    assert all(torch.equal(u, v) for u, v in zip(cached, uncached))
    assert torch.equal(logits.argmax(-1), torch.cat(cached, dim=1))


# -----------------------------------------------------------------------------
# gradients: only the prompts learn

def frozen(tiny_var, tiny_vae, tiny_clip):
    for m in (tiny_var, tiny_vae, tiny_clip):
        m.requires_grad_(False)
    return [p for m in (tiny_var, tiny_vae, tiny_clip) for p in m.parameters()]


SENTENCES = ['a photo of a cat', 'a photo of a dog']
CAPTIONS = ['a small red cat on a white floor', 'a large blue dog in the grass']


def test_ce_and_semantic_each_reach_only_the_prompt(tiny_vae, tiny_var, tiny_clip):
    backbone = frozen(tiny_var, tiny_vae, tiny_clip)
    idx, x, cond = tiny_batch(tiny_vae, tiny_var, B=2)
    fp = FramePrompt(tiny_var.patch_nums, tiny_var.width, tau=20, first_scale=True)  # zero init
    semantic = SemanticLoss(tiny_clip, tiny_vae, beta=0.6)
    for name in ('ce', 'semantic'):
        fp.tokens.grad = None
        logits = tiny_var(cond, x, prompt_1LC=fp())
        if name == 'ce':
            loss = F.cross_entropy(logits.reshape(-1, tiny_var.vocab_size), torch.cat(idx, dim=1).reshape(-1))
        else:
            loss = semantic(logits, SENTENCES, CAPTIONS)['semantic']
        loss.backward()
        grad = fp.tokens.grad
        assert grad is not None and torch.isfinite(grad).all(), name
        assert (grad.norm(dim=1) > 0).all(), name  # every prompt token learns, from the zero init on
        assert all(p.grad is None for p in backbone), name


def test_sentence_loss_cannot_reach_scales_after_kappa(tiny_vae, tiny_var, tiny_clip):
    frozen(tiny_var, tiny_vae, tiny_clip)
    idx, x, cond = tiny_batch(tiny_vae, tiny_var, B=2)
    fp = FramePrompt(tiny_var.patch_nums, tiny_var.width, tau=20, first_scale=True)
    rows = scale_rows(fp)
    grads = {}
    for name, lam_sen, lam_cap in (('sen', 1.0, 0.0), ('cap', 0.0, 1.0)):
        loss_fn = SemanticLoss(tiny_clip, tiny_vae, beta=0.6, lambda_sen=lam_sen, lambda_cap=lam_cap)
        fp.tokens.grad = None
        loss_fn(tiny_var(cond, x, prompt_1LC=fp()), SENTENCES, CAPTIONS)['semantic'].backward()
        grads[name] = fp.tokens.grad.clone()
    kappa = inter_anchor(0.6, len(tiny_var.patch_nums))
    assert kappa == 2
    for si, r in enumerate(rows):
        if si < kappa:
            assert (grads['sen'][r].norm(dim=1) > 0).all(), si
        else:  # I_sen uses scales 1..kappa only, and attention is block-causal
            assert torch.equal(grads['sen'][r], torch.zeros_like(grads['sen'][r])), si
        assert (grads['cap'][r].norm(dim=1) > 0).all(), si  # the caption loss reaches every scale


# -----------------------------------------------------------------------------
# semantic loss

def peaked_logits(idx_list, V):
    return F.one_hot(torch.cat(idx_list, dim=1), V).float() * 1e4  # (B, L, V)


def test_soft_token_maps_peaked_is_the_codebook(tiny_vae, tiny_var):
    idx, _, _ = tiny_batch(tiny_vae, tiny_var, B=2)
    codebook = tiny_vae.quantize.embedding.weight.detach()
    maps = soft_token_maps(peaked_logits(idx, tiny_vae.vocab_size), codebook, tiny_vae.patch_nums)
    assert len(maps) == len(tiny_vae.patch_nums)
    for si, pn in enumerate(tiny_vae.patch_nums):
        assert maps[si].shape == (2, tiny_vae.Cvae, pn, pn)
        for b in range(2):
            for r in range(pn):
                for c in range(pn):
                    assert torch.allclose(maps[si][b, :, r, c], codebook[idx[si][b, r * pn + c]], atol=1e-6)


def test_decode_sen_cap_matches_the_vqvae(tiny_vae, tiny_var, tiny_clip):
    idx, _, _ = tiny_batch(tiny_vae, tiny_var, B=2, encode=True)  # real tokens of images
    loss = SemanticLoss(tiny_clip, tiny_vae, beta=0.6)
    kappa = loss.kappa
    with torch.no_grad():
        img_sen, img_cap = loss.decode_sen_cap(peaked_logits(idx, tiny_vae.vocab_size))
        ref_cap = tiny_vae.idx_to_img(idx)
        ref_sen = tiny_vae.fhat_to_img(tiny_vae.quantize.idx_to_fhat(idx[:kappa]))
    assert img_cap.shape == img_sen.shape == (2, 3, tiny_vae.image_size, tiny_vae.image_size)
    assert torch.allclose(img_cap, ref_cap, atol=1e-4)
    assert torch.allclose(img_sen, ref_sen, atol=1e-4)
    assert not torch.allclose(img_sen, img_cap, atol=1e-3)  # the coarse image really is a different image
    with torch.no_grad():
        only_cap = SemanticLoss(tiny_clip, tiny_vae, beta=0.6, lambda_sen=0).decode_sen_cap(
            peaked_logits(idx, tiny_vae.vocab_size))
    assert only_cap[0] is None and torch.allclose(only_cap[1], ref_cap, atol=1e-4)


def test_inter_anchor():
    assert inter_anchor(0.6, 10) == 6
    assert inter_anchor(0.6, 4) == 2
    for beta, K in ((0.05, 10), (0.0, 10), (1.0, 10), (0.2, 4), (1.0, 4)):
        with pytest.raises(ValueError):
            inter_anchor(beta, K)


def test_semantic_loss_rejects_bad_beta(tiny_vae, tiny_clip):
    with pytest.raises(ValueError):
        SemanticLoss(tiny_clip, tiny_vae, beta=1.0)
    with pytest.raises(ValueError):
        SemanticLoss(tiny_clip, tiny_vae, beta=0.1)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_contrastive_matched_beats_shuffled():
    feats = unit(4, 16)
    texts = ['a', 'b', 'c', 'd']
    scale = torch.tensor(20.0)
    matched = contrastive_loss(feats, feats, texts, scale)
    shuffled = contrastive_loss(feats, feats[[1, 2, 3, 0]], texts, scale)
    assert matched < shuffled
    assert matched < math.log(4) < shuffled


def test_contrastive_duplicates_are_positives():
    # two identical images with two identical texts: the target is (1/2, 1/2) and the loss sits at its floor,
    # the target's entropy log 2, whatever the logit scale
    u = unit(1, 16).expand(2, -1)
    for s in (1.0, 10.0, 100.0):
        assert torch.allclose(contrastive_loss(u, u, ['x', 'x'], torch.tensor(s)), torch.tensor(math.log(2)), atol=1e-6)
    # ['a', 'a', 'b'] with matching features u, u, w: closed form with the spread target
    u, w = unit(2, 16, seed=1)
    feats = torch.stack([u, u, w])
    s = 5.0
    c = float(u @ w)
    e = math.exp(s * (c - 1))
    expected = (2 * math.log(2 + e) + math.log(1 + 2 * e)) / 3  # both directions alike: the matrix is symmetric
    got = contrastive_loss(feats, feats, ['a', 'a', 'b'], torch.tensor(s))
    assert abs(float(got) - expected) < 1e-5
    # the targets come from the strings: give the two 'a' texts different features and the spread target
    # (1/2, 1/2 over both) gives a different value from a one-hot diagonal target
    img, txt = unit(3, 16, seed=4), unit(3, 16, seed=5)
    logits = (s * img @ txt.T).tolist()

    def ce(rows, target):
        return sum(-sum(t * (x - math.log(sum(math.exp(y) for y in row))) for t, x in zip(trow, row))
                   for row, trow in zip(rows, target)) / len(rows)

    spread = [[0.5, 0.5, 0], [0.5, 0.5, 0], [0, 0, 1]]
    onehot = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    transposed = [list(col) for col in zip(*logits)]
    by_hand = (ce(logits, spread) + ce(transposed, spread)) / 2
    diagonal = (ce(logits, onehot) + ce(transposed, onehot)) / 2
    assert abs(by_hand - diagonal) > 1e-3
    assert abs(float(contrastive_loss(img, txt, ['a', 'a', 'b'], torch.tensor(s))) - by_hand) < 1e-5
    assert abs(float(contrastive_loss(img, txt, ['a', 'c', 'b'], torch.tensor(s))) - diagonal) < 1e-5


def test_contrastive_symmetric():
    img, txt = unit(5, 16, seed=2), unit(5, 16, seed=3)
    texts = list('abcde')
    scale = torch.tensor(7.0)
    assert torch.allclose(contrastive_loss(img, txt, texts, scale), contrastive_loss(txt, img, texts, scale), atol=1e-6)


def test_lambda_switches(tiny_vae, tiny_var, tiny_clip):
    B = 2
    logits = torch.randn(B, tiny_var.L, tiny_var.vocab_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        both = SemanticLoss(tiny_clip, tiny_vae, beta=0.6)(logits, SENTENCES, CAPTIONS)
        no_sen = SemanticLoss(tiny_clip, tiny_vae, beta=0.6, lambda_sen=0, lambda_cap=1.5)(logits, SENTENCES, CAPTIONS)
        no_cap = SemanticLoss(tiny_clip, tiny_vae, beta=0.6, lambda_sen=0.5, lambda_cap=0)(logits, SENTENCES, CAPTIONS)
    assert float(no_sen['sen']) == 0 and float(no_sen['cap']) > 0
    assert torch.allclose(no_sen['semantic'], 1.5 * no_sen['cap'])
    assert float(no_cap['cap']) == 0 and float(no_cap['sen']) > 0
    assert torch.allclose(no_cap['semantic'], 0.5 * no_cap['sen'])
    # the single-term runs compute the same terms as the run with both
    assert torch.allclose(both['sen'], no_cap['sen'], atol=1e-5)
    assert torch.allclose(both['cap'], no_sen['cap'], atol=1e-5)
    assert torch.allclose(both['semantic'], both['sen'] + both['cap'])


def test_frozen_clip_text_cache(tiny_clip):
    calls = []
    tower = tiny_clip.model.encode_text

    def counting(tokens, *a, **k):
        calls.append(tokens.shape[0])
        return tower(tokens, *a, **k)

    tiny_clip.model.encode_text = counting  # this instance only
    first = tiny_clip.encode_text(['a cat', 'a dog'])
    assert calls == [1, 1]  # one text at a time
    again = tiny_clip.encode_text(['a dog', 'a cat', 'a cat'])
    assert calls == [1, 1]  # all cached: the tower did not run
    assert torch.equal(again, first[[1, 0, 0]])
    more = tiny_clip.encode_text(['a cat', 'a bird'])
    assert calls == [1, 1, 1]  # only the new string
    assert torch.allclose(more.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(first.norm(dim=-1), torch.ones(2), atol=1e-5)
    fresh = F.normalize(tower(tiny_clip.tokenizer(['a bird'])).float(), dim=-1)
    assert torch.allclose(more[1], fresh[0], atol=1e-6)


def test_text_features_do_not_depend_on_what_else_was_encoded(tiny_clip):
    """A resumed run starts with an empty cache: a text's features must be the same bits whatever was encoded with it
    or before it, under bf16 autocast too (on AVX2 CPUs the last rows of a batch round differently)."""
    texts = [f'a {c} {s} on a {b} background' for c in ('red', 'green', 'blue') for s in ('star', 'circle', 'cross')
             for b in ('white', 'black', 'gray', 'navy', 'pink')]
    alone = []
    for text in texts:
        tiny_clip.text_cache.clear()
        alone.append(tiny_clip.encode_text([text])[0])
    tiny_clip.text_cache.clear()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        together = tiny_clip.encode_text(texts[::-1])
    assert together.dtype == torch.float32 and torch.equal(together.flip(0), torch.stack(alone))


def test_text_cache_is_bounded(tiny_clip, monkeypatch):
    monkeypatch.setattr(clip_loss, 'TEXT_CACHE_SIZE', 3)
    feats = tiny_clip.encode_text(['a', 'b', 'c', 'd', 'e'])
    assert feats.shape[0] == 5 and len(tiny_clip.text_cache) == 3


def test_frozen_clip_image_any_size_differentiable(tiny_clip):
    for H, W in ((16, 16), (32, 32), (40, 24)):
        img = (torch.rand(2, 3, H, W) * 2 - 1).requires_grad_(True)
        feats = tiny_clip.encode_image(img)
        assert feats.shape == (2, TINY_CLIP_CFG['embed_dim'])
        assert torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)
        feats[:, 0].sum().backward()
        assert img.grad is not None and img.grad.abs().sum() > 0, (H, W)


def test_load_clip_needs_a_config(tmp_path):
    folder = tmp_path / 'not_clip'
    folder.mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(folder))):
        load_clip(str(folder))


def test_load_clip_local_dir(tmp_path):
    import open_clip
    from safetensors.torch import save_file
    torch.manual_seed(7)
    saved = open_clip.model.CLIP(**TINY_CLIP_CFG).eval()
    folder = tmp_path / 'tiny_clip'
    folder.mkdir()
    (folder / 'open_clip_config.json').write_text(json.dumps({'model_cfg': TINY_CLIP_CFG, 'preprocess_cfg': {}}))
    save_file(saved.state_dict(), str(folder / 'open_clip_model.safetensors'))
    model, tokenizer = load_clip(str(folder))
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
    tokens = tokenizer(['a photo of a cat', 'a dog'])
    img = torch.rand(2, 3, 32, 32)
    saved.requires_grad_(False)  # frozen too: torch's attention then takes the same (fast) path, bit for bit
    with torch.no_grad():
        assert torch.equal(model.encode_text(tokens), saved.encode_text(tokens))
        assert torch.equal(model.encode_image(img), saved.encode_image(img))
    assert torch.equal(model.logit_scale, saved.logit_scale)


def test_load_clip_folder_without_weights_raises(tmp_path):
    (tmp_path / 'open_clip_config.json').write_text(json.dumps({'model_cfg': TINY_CLIP_CFG, 'preprocess_cfg': {}}))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_clip(str(tmp_path))


def test_load_clip_folder_as_pretrained(tmp_path):
    """A local-dir folder passed as `pretrained` is loaded from the folder (model_name is then ignored)."""
    import open_clip
    from safetensors.torch import save_file
    torch.manual_seed(8)
    saved = open_clip.model.CLIP(**TINY_CLIP_CFG).eval().requires_grad_(False)
    (tmp_path / 'open_clip_config.json').write_text(json.dumps({'model_cfg': TINY_CLIP_CFG, 'preprocess_cfg': {}}))
    save_file(saved.state_dict(), str(tmp_path / 'open_clip_model.safetensors'))
    model, _ = load_clip('ViT-B-16', str(tmp_path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), saved.state_dict().values()))
    assert all(not p.requires_grad for p in model.parameters())


CLIP_SCRIPT = COUNT_CONNECTIONS + '''
import json, sys, time
sys.path.insert(0, {root!r})
import pretrained
result = {{}}
start = time.perf_counter()
try:
    pretrained.{call}
except ConnectionError as e:
    result['error'] = str(e)
result['seconds'] = time.perf_counter() - start
result['connections'] = len(connections)
print(json.dumps(result))
'''


def run_clip_script(call, env):  # in a fresh process: huggingface_hub reads HF_HOME & co. when it is imported
    result = subprocess.run([sys.executable, '-c', CLIP_SCRIPT.format(root=REPO, call=call)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_clip_weights_offline_fail_fast_with_one_line(tmp_path):
    """Nothing cached, the Hub refusing connections: one line within 10 s, not open_clip's minute of retries."""
    result = run_clip_script("load_clip('ViT-B-16', 'openai')", offline_hub_env(tmp_path))
    assert result['seconds'] < 10.0, result
    msg = result['error']
    assert '\n' not in msg and 'timm/vit_base_patch16_clip_224.openai' in msg and 'open_clip_model.safetensors' in msg
    assert str(tmp_path / 'hub') in msg, msg  # the Hugging Face cache the weights belong in


def test_clip_weights_in_the_hf_cache_need_no_network(tmp_path):
    write_hf_cache(tmp_path, 'timm/vit_base_patch16_clip_224.openai', {'open_clip_model.safetensors': b'weights'})
    result = run_clip_script("check_clip_weights_reachable('ViT-B-16', 'openai')", offline_hub_env(tmp_path))
    assert 'error' not in result and result['connections'] == 0, result  # no request at all


def test_the_image_first_scale_replaces_the_predicted_one(tiny_clip, tiny_vae):
    """With first_idx_Bl, I_sen and I_cap no longer depend on the first scale's logits (class-to-image: no prompt acts
    on them), still depend on every later scale's, and show the given first-scale tokens."""
    torch.manual_seed(0)
    semantic = SemanticLoss(tiny_clip, tiny_vae, beta=0.6)
    L, V = sum(p * p for p in tiny_vae.patch_nums), tiny_vae.vocab_size
    logits = torch.randn(2, L, V)
    first = torch.tensor([[3], [7]])
    other_first = logits.clone()
    other_first[:, 0] = torch.randn(2, V)  # another first-scale prediction
    other_later = logits.clone()
    other_later[:, -1] = torch.randn(2, V) * 5  # another last-scale prediction
    with torch.no_grad():
        base = semantic.decode_sen_cap(logits, first)
        assert all(torch.equal(a, b) for a, b in zip(base, semantic.decode_sen_cap(other_first, first)))
        assert not torch.equal(base[1], semantic.decode_sen_cap(other_later, first)[1])
        assert not torch.equal(base[1], semantic.decode_sen_cap(logits)[1])  # without it, the soft first map


def saved_bytes(loss: torch.Tensor, *modules) -> int:
    """What the autograd graph behind loss keeps for the backward (each storage once, the modules' parameters and
    views of them left out): the activation memory a step pays for. Read off the graph's nodes (their _saved_*
    tensors, a custom Function's saved_tensors), not with saved-tensor hooks, whose packed references would keep
    alive graphs that are otherwise freed."""
    weights = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
    storages, seen, stack = {}, set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        saved = [getattr(node, name) for name in dir(node) if name.startswith('_saved_')]
        if hasattr(node, 'saved_tensors'):
            saved += list(node.saved_tensors)
        for t in (t for v in saved for t in (v if isinstance(v, (tuple, list)) else (v,))):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in weights:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack += [next_node for next_node, _ in node.next_functions]
    return sum(storages.values())


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_chunked_semantic_loss_is_the_same_loss_and_gradient(tiny_vae, tiny_var, tiny_clip, dtype):
    """Decoding and embedding I_sen / I_cap a chunk at a time, recomputed in the backward, is the function of one
    batched pass: the same loss and prompt gradient (to rounding: a kernel may round differently at another batch
    size), for a fraction of the saved activation memory; and against plain autograd over the same chunks, the
    recompute is exact, bit for bit, in fp32 and under bf16 autocast (whose state the backward keeps)."""
    from clip_loss import EmbedInChunks
    frozen(tiny_var, tiny_vae, tiny_clip)
    idx, x, cond = tiny_batch(tiny_vae, tiny_var, B=2, encode=True)
    fp = FramePrompt(tiny_var.patch_nums, tiny_var.width, tau=20, first_scale=True)
    with torch.no_grad():
        fp.tokens.normal_(0, 0.02)
    autocast = lambda: torch.autocast('cpu', dtype=dtype, enabled=dtype != torch.float32)
    results = {}
    for chunk in (0, 1):
        semantic = SemanticLoss(tiny_clip, tiny_vae, beta=0.6, chunk=chunk)
        fp.tokens.grad = None
        out = {}

        with autocast():
            logits = tiny_var(cond, x, prompt_1LC=fp())
        logits_leaf = logits.detach().requires_grad_(True)  # the semantic loss's own memory, without the VAR's

        with autocast():
            out = semantic(logits_leaf, SENTENCES, CAPTIONS, idx[0])
        out['saved'] = saved_bytes(out['semantic'], tiny_var, tiny_vae, tiny_clip)
        out['semantic'].backward()
        logits.backward(logits_leaf.grad)
        results[chunk] = out, fp.tokens.grad.clone()
    (plain, grad_plain), (chunked, grad_chunked) = results[0], results[1]
    tol = dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=0.05, atol=1e-3)
    for key in ('sen', 'cap', 'semantic'):
        torch.testing.assert_close(chunked[key], plain[key], **tol)
    assert grad_plain.abs().sum() > 0
    torch.testing.assert_close(grad_chunked, grad_plain, **tol)
    assert chunked['saved'] < 0.2 * plain['saved'], (chunked['saved'], plain['saved'])

    semantic = SemanticLoss(tiny_clip, tiny_vae, beta=0.6)
    f_hat = torch.randn(4, tiny_vae.Cvae, tiny_vae.patch_nums[-1], tiny_vae.patch_nums[-1])
    weights = torch.randn(4, tiny_clip.model.visual.output_dim)
    grads = []
    for recompute in (False, True):
        leaf = f_hat.clone().requires_grad_(True)
        with autocast():
            feats = EmbedInChunks.apply(leaf, semantic.embed, 2) if recompute else \
                torch.cat([semantic.embed(part) for part in leaf.split(2)])
        (feats.float() * weights).sum().backward()
        grads.append((feats.detach(), leaf.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_chunks_without_gradient_are_not_recomputed(tiny_vae, tiny_clip):
    """One level's own backward (the gradient record, --balance) sends no gradient to the other level's images: those
    chunks are skipped in the recompute, and the input's gradient is what a full recompute gives, bit for bit."""
    from clip_loss import EmbedInChunks
    semantic = SemanticLoss(tiny_clip, tiny_vae, beta=0.6)
    f_hat = torch.randn(4, tiny_vae.Cvae, tiny_vae.patch_nums[-1], tiny_vae.patch_nums[-1])
    weights = torch.cat((torch.randn(2, tiny_clip.model.visual.output_dim), torch.zeros(2, tiny_clip.model.visual.output_dim)))
    calls, grads = [], []
    counting = lambda part: calls.append(len(part)) or semantic.embed(part)
    for embed in (counting, semantic.embed):
        leaf = f_hat.clone().requires_grad_(True)
        feats = EmbedInChunks.apply(leaf, embed, 2) if embed is counting else \
            torch.cat([embed(part) for part in leaf.split(2)])
        (feats * weights).sum().backward()
        grads.append(leaf.grad)
    assert calls == [2, 2, 2]  # the forward's two chunks, then only the first chunk again in the backward
    assert torch.equal(grads[0], grads[1]) and grads[0][2:].abs().sum() == 0 and grads[0][:2].abs().sum() > 0


def test_conv_layout_changes_speed_not_values(tiny_vae):
    """set_conv_layout: channels_last for reduced precision, back to the default for fp32, whose images stay bit for bit
    what they were (the official code's); the parameters' values never change."""
    from device import set_conv_layout
    f_hat = torch.randn(2, tiny_vae.Cvae, tiny_vae.patch_nums[-1], tiny_vae.patch_nums[-1])
    before = {k: v.clone() for k, v in tiny_vae.state_dict().items()}
    with torch.no_grad():
        reference = tiny_vae.fhat_to_img(f_hat)
        set_conv_layout(tiny_vae, torch.bfloat16)
        assert tiny_vae.decoder.conv_out.weight.is_contiguous(memory_format=torch.channels_last)
        assert all(torch.equal(v, before[k]) for k, v in tiny_vae.state_dict().items())
        set_conv_layout(tiny_vae, torch.float32)
        assert tiny_vae.decoder.conv_out.weight.is_contiguous()
        assert torch.equal(tiny_vae.fhat_to_img(f_hat), reference)


def test_cast_once_same_samples_and_leaves_the_model_frozen(tiny_vae, tiny_var):
    from contextlib import nullcontext
    from device import cast_once
    for m in (tiny_var, tiny_vae):
        m.requires_grad_(False)
    cond = tiny_var.class_condition(torch.arange(3))
    samples = []
    for cached in (False, True):
        with torch.autocast('cpu', dtype=torch.bfloat16), (cast_once(tiny_var, tiny_vae) if cached else nullcontext()):
            samples.append(tiny_var.generate(tiny_vae, cond, cfg=1.5, top_k=8, seed=1))
    assert all(torch.equal(a, b) for a, b in zip(*samples))
    assert not any(p.requires_grad for p in list(tiny_var.parameters()) + list(tiny_vae.parameters()))
