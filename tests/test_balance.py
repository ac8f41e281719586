"""How the losses' gradients make one update (update.optimizer_step, train.py --balance) and the per-loss gradient
record of the logged steps: checked against separate autograd computations on the tiny models of conftest.py."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from baselines import PrefilledPrompt, attach_lora, make_lora  # noqa: E402
from clip_loss import TOKENS, SemanticLoss, rollout_token_maps, token_probs  # noqa: E402
from frame_prompt import FramePrompt  # noqa: E402
from mvp import MVP, TunedParts  # noqa: E402
from update import optimizer_step  # noqa: E402

SENTENCES = ['a photo of a circle', 'a photo of a square', 'a photo of a circle', 'a photo of a star']
CAPTIONS = ['a red circle', 'a big blue square', 'a small green circle', 'a star on black']


def setup(tiny_vae, tiny_var, tiny_clip, lambda_sen=0.5, lambda_cap=2.0):
    torch.manual_seed(0)
    parts = TunedParts(FramePrompt(tiny_var.patch_nums, tiny_var.width, 20))
    with torch.no_grad():
        parts.prompt.tokens.normal_(0, 0.5)
    semantic = SemanticLoss(tiny_clip, tiny_vae, 0.6, lambda_sen, lambda_cap)
    model = MVP(tiny_vae, tiny_var, parts, None, semantic, first_scale_fixed=True)
    idx = model.tokenise(torch.rand(4, 3, 16, 16) * 2 - 1)
    labels = torch.tensor([0, 1, 0, 2])

    def terms():
        torch.manual_seed(1)  # the condition dropout draws from the global generator: the same at every call
        return model.objective(model(idx, labels, SENTENCES, CAPTIONS)[1])
    return parts, terms


def separate_gradients(parts, terms):
    """Each term's gradient from a forward and backward of its own."""
    grads = {}
    for name in ('ce', 'sen', 'cap'):
        parts.zero_grad(set_to_none=True)
        terms()[name].backward()
        grads[name] = parts.prompt.tokens.grad.clone()
    return grads


def step(parts, terms, balance, record=True, grad_clip=1.0, ratio=0.1, scaler=None):
    """One optimizer_step with plain SGD at lr 1: the update is minus the gradient it applied."""
    before = parts.prompt.tokens.detach().clone()
    optimizer = torch.optim.SGD(parts.parameters(), lr=1.0)
    scaler = scaler or torch.amp.GradScaler('cpu', enabled=False)
    grad_norm, row = optimizer_step(terms(), optimizer, scaler, list(parts.parameters()), grad_clip, balance, ratio,
                                    record=record)
    applied = before - parts.prompt.tokens.detach()
    with torch.no_grad():
        parts.prompt.tokens.copy_(before)
    return applied, grad_norm, row


def test_terms_are_the_weighted_losses_and_sum_to_eq9(tiny_vae, tiny_var, tiny_clip):
    parts, terms = setup(tiny_vae, tiny_var, tiny_clip, lambda_sen=0.5, lambda_cap=2.0)
    model = MVP(tiny_vae, tiny_var, parts, None, SemanticLoss(tiny_clip, tiny_vae, 0.6, 0.5, 2.0), first_scale_fixed=True)
    torch.manual_seed(1)
    logits, losses = model(model.tokenise(torch.zeros(4, 3, 16, 16)), torch.tensor([0, 1, 0, 2]), SENTENCES, CAPTIONS)
    t = model.objective(losses)
    assert logits.shape == (4, tiny_var.L, tiny_var.vocab_size)
    assert set(t) == {'ce', 'sen', 'cap'}
    torch.testing.assert_close(t['sen'], 0.5 * losses['sen'])
    torch.testing.assert_close(t['cap'], 2.0 * losses['cap'])
    _, t_off = setup(tiny_vae, tiny_var, tiny_clip, lambda_sen=0.0, lambda_cap=1.0)
    assert set(t_off()) == {'ce', 'cap'}  # a level whose lambda is 0 is no term


def test_gradient_record_matches_separate_autograd(tiny_vae, tiny_var, tiny_clip):
    parts, terms = setup(tiny_vae, tiny_var, tiny_clip)
    expected = separate_gradients(parts, terms)
    applied, grad_norm, row = step(parts, terms, 'sum', grad_clip=1e9)
    for name, g in expected.items():
        assert row[f'grad_{name}'] == pytest.approx(g.norm().item(), rel=1e-4)
    total = sum(expected.values())
    assert grad_norm.item() == pytest.approx(total.norm().item(), rel=1e-4)
    torch.testing.assert_close(applied, total, rtol=1e-4, atol=1e-7)  # recording does not change the step
    assert row['clipped'] is False
    _, _, bound = step(parts, terms, 'sum', grad_clip=1e-6)
    assert bound['clipped'] is True
    _, _, unlogged = step(parts, terms, 'sum', record=False)
    assert unlogged == {}


def test_normalize_gives_each_level_a_fixed_fraction_of_ce(tiny_vae, tiny_var, tiny_clip):
    parts, terms = setup(tiny_vae, tiny_var, tiny_clip)
    g = separate_gradients(parts, terms)
    ratio = 0.3
    applied, _, _ = step(parts, terms, 'normalize', grad_clip=1e9, ratio=ratio)
    ce_norm = g['ce'].norm()
    expected = g['ce'] + sum(ratio * ce_norm * g[k] / g[k].norm() for k in ('sen', 'cap'))
    torch.testing.assert_close(applied, expected, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(applied, sum(g.values()), rtol=1e-2)  # not the plain sum


def test_clip_each_clips_every_loss_on_its_own(tiny_vae, tiny_var, tiny_clip):
    parts, terms = setup(tiny_vae, tiny_var, tiny_clip)
    g = separate_gradients(parts, terms)
    norms = {k: v.norm().item() for k, v in g.items()}
    clip = sorted(norms.values())[1]  # between the smallest and the largest: some terms clipped, one not
    applied, _, row = step(parts, terms, 'clip_each', grad_clip=clip)
    expected = sum(v * min(1.0, clip / (norms[k] + 1e-6)) for k, v in g.items())
    torch.testing.assert_close(applied, expected, rtol=1e-4, atol=1e-7)
    assert row['clipped'] is True


@pytest.mark.parametrize('balance', ['sum', 'clip_each', 'normalize'])
def test_a_grad_scaler_leaves_every_balance_unchanged(tiny_vae, tiny_var, tiny_clip, balance):
    """fp16 training goes through a grad scaler: the update and the record must be those without it."""
    parts, terms = setup(tiny_vae, tiny_var, tiny_clip)
    plain, _, plain_row = step(parts, terms, balance, grad_clip=0.05)
    scaled, _, scaled_row = step(parts, terms, balance, grad_clip=0.05,
                                 scaler=torch.amp.GradScaler('cpu', init_scale=1024.0, enabled=True))
    torch.testing.assert_close(scaled, plain, rtol=1e-4, atol=1e-8)
    assert scaled_row == pytest.approx(plain_row, rel=1e-4)


# -----------------------------------------------------------------------------
# the differentiable paths of I_sen and I_cap (clip_loss.TOKENS, train.py --tokens)


@pytest.mark.parametrize('tokens', TOKENS)
def test_every_differentiable_path_gives_the_prompts_a_semantic_gradient(tiny_vae, tiny_var, tiny_clip, tokens):
    torch.manual_seed(0)
    parts = TunedParts(FramePrompt(tiny_var.patch_nums, tiny_var.width, 20))
    with torch.no_grad():
        parts.prompt.tokens.normal_(0, 0.5)
    model = MVP(tiny_vae, tiny_var, parts, None, SemanticLoss(tiny_clip, tiny_vae, tokens=tokens), first_scale_fixed=True)
    _, losses = model(model.tokenise(torch.rand(4, 3, 16, 16) * 2 - 1), torch.tensor([0, 1, 0, 2]), SENTENCES, CAPTIONS)
    (losses['sen'] + losses['cap']).backward()  # the semantic levels alone, without CE
    assert torch.isfinite(parts.prompt.tokens.grad).all() and parts.prompt.tokens.grad.abs().sum() > 0


def test_the_rollout_draws_each_scale_from_its_own_tokens_as_the_sampler_does(tiny_vae, tiny_var):
    """Drawn greedily, the rollout's maps are the codebook entries of the sampler's greedy tokens (no guidance, top-1),
    prompt included: each scale is conditioned on the scales the model drew itself."""
    torch.manual_seed(0)
    prompt = FramePrompt(tiny_var.patch_nums, tiny_var.width, 20)
    with torch.no_grad():
        prompt.tokens.normal_(0, 0.5)
    cond = tiny_var.class_emb(torch.tensor([0, 1, 2]))
    with torch.no_grad():
        maps = rollout_token_maps(tiny_var, tiny_vae.quantize, cond, prompt_1LC=prompt(), draw='argmax')
        greedy = tiny_var.generate(tiny_vae, cond, cfg=0.0, top_k=1, prompt_1LC=prompt())
    codebook = tiny_vae.quantize.embedding.weight
    for si, pn in enumerate(tiny_var.patch_nums):
        expected = codebook[greedy[si]].transpose(1, 2).reshape(3, tiny_var.Cvae, pn, pn)
        torch.testing.assert_close(maps[si], expected)


def recomputed_rollout(var, quantizer, cond_BD, prompt_1LC=None, prefix_1PC=None):
    """The rollout by its definition, without the KV cache: one teacher-forced forward per scale, zeros standing in
    for the scales not drawn yet (the block-causal mask keeps them out of scale k's logits)."""
    B, last = cond_BD.shape[0], quantizer.patch_nums[-1]
    f_hat = cond_BD.new_zeros(B, var.Cvae, last, last)
    inputs, maps = [], []
    for si, pn in enumerate(quantizer.patch_nums):
        known = sum(x.shape[1] for x in inputs)
        x_BLCv = torch.cat(inputs + [f_hat.new_zeros(B, var.L - var.first_l - known, var.Cvae)], dim=1)
        begin, end = var.begin_ends[si]
        logits_BlV = var(cond_BD, x_BLCv, prompt_1LC=prompt_1LC, prefix_1PC=prefix_1PC)[:, begin:end]
        h_BlC = token_probs(logits_BlV, 1.0, 'gumbel') @ quantizer.embedding.weight
        maps.append(h_BlC.transpose(1, 2).reshape(B, var.Cvae, pn, pn))
        f_hat, next_map = quantizer.next_autoregressive_input(si, f_hat, maps[-1])
        inputs.append(next_map.flatten(2).transpose(1, 2))
    return maps


@pytest.mark.parametrize('tuned', ['frame prompt', 'prefilled prompt'])
def test_the_kv_cached_rollout_is_the_rollout_by_its_definition(tiny_vae, tiny_var, tuned):
    """The same draws (same Gumbel noise) and the same gradient at what trains as one teacher-forced forward per
    scale."""
    torch.manual_seed(0)
    trained = FramePrompt(tiny_var.patch_nums, tiny_var.width, 20) if tuned == 'frame prompt' else \
        PrefilledPrompt(5, tiny_var.width)
    with torch.no_grad():
        trained.tokens.normal_(0, 0.5)
    name = 'prompt_1LC' if tuned == 'frame prompt' else 'prefix_1PC'
    cond = tiny_var.class_emb(torch.tensor([0, 1, 2])).detach()
    weights = [torch.randn(3, tiny_var.Cvae, pn, pn) for pn in tiny_var.patch_nums]
    found = []
    for rollout in (lambda: rollout_token_maps(tiny_var, tiny_vae.quantize, cond, **{name: trained()}),
                    lambda: recomputed_rollout(tiny_var, tiny_vae.quantize, cond, **{name: trained()})):
        trained.zero_grad()
        torch.manual_seed(1)
        maps = rollout()
        sum((m * w).sum() for m, w in zip(maps, weights)).backward()
        found.append((maps, trained.tokens.grad.clone()))
    (cached, cached_grad), (recomputed, recomputed_grad) = found
    for a, b in zip(cached, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert cached_grad.abs().sum() > 0
    torch.testing.assert_close(cached_grad, recomputed_grad, rtol=1e-4, atol=1e-6)


def test_the_rollout_casts_the_frozen_weights_once_to_the_same_values(tiny_vae, tiny_var, monkeypatch):
    """Under bf16 autocast the rollout calls the blocks with their frozen weights cast once: the same draws and the
    same gradient as autocast's own cast at every use."""
    from var import VAR
    prompt = FramePrompt(tiny_var.patch_nums, tiny_var.width, 20)
    with torch.no_grad():
        prompt.tokens.normal_(0, 0.5)
    tiny_var.requires_grad_(False)
    cond = tiny_var.class_emb(torch.tensor([0, 1, 2]))
    assert len(VAR.cast_frozen_matrices(tiny_var.blocks[0], 'cpu')) == 0  # outside autocast: nothing to cast
    found = []
    for cast in (True, False):
        if not cast:
            monkeypatch.setattr(VAR, 'cast_frozen_matrices', staticmethod(lambda module, device_type: {}))
        prompt.zero_grad()
        torch.manual_seed(1)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            if cast:
                assert len(VAR.cast_frozen_matrices(tiny_var.blocks[0], 'cpu')) == 5  # qkv, proj, fc1, fc2, ada_lin
            maps = rollout_token_maps(tiny_var, tiny_vae.quantize, cond, prompt_1LC=prompt())
        sum(m.float().sum() * (i + 1) for i, m in enumerate(maps)).backward()
        found.append((maps, prompt.tokens.grad.clone()))
    assert all(torch.equal(a, b) for a, b in zip(found[0][0], found[1][0]))
    assert found[0][1].abs().sum() > 0 and torch.equal(found[0][1], found[1][1])
    monkeypatch.undo()
    attach_lora(tiny_var, make_lora(tiny_var, rank=2))  # attention reads LoRA's merged weight: no cast of its own
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert VAR.cast_frozen_matrices(tiny_var.blocks[0], 'cpu') == {}


def test_the_rollouts_semantic_loss_never_reads_the_images_tokens(tiny_vae, tiny_var, tiny_clip):
    """Two batches of other images with the same labels and seed: the same semantic losses free running, other
    ones teacher-forced."""
    parts = TunedParts(FramePrompt(tiny_var.patch_nums, tiny_var.width, 20))
    labels = torch.tensor([0, 1, 0, 2])
    images = [torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(s)) * 2 - 1 for s in (1, 2)]
    for tokens, same in (('rollout', True), ('soft', False)):
        model = MVP(tiny_vae, tiny_var, parts, None, SemanticLoss(tiny_clip, tiny_vae, tokens=tokens),
                    first_scale_fixed=True)
        found = []
        for batch in images:
            torch.manual_seed(3)
            _, losses = model(model.tokenise(batch), labels, SENTENCES, CAPTIONS)
            found.append(torch.stack([losses['sen'], losses['cap']]))
        assert torch.equal(found[0], found[1]) == same, tokens
