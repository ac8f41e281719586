"""The baselines of MVP's Table 3 in train.py: --prompt lora and --prompt full, on the tiny backbone (CPU, 2 steps).

Checked: they train, class-to-image and text-to-image; a checkpoint holds only what trained (the LoRA pairs, or the
VAR's state dict, plus the text projection); a zero LoRA update is exactly the plain model; sample.py, world.evaluate
and --resume work from their checkpoints.
"""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from world import evaluate  # noqa: E402
import sample  # noqa: E402
import mvp  # noqa: E402
import train  # noqa: E402
from baselines import LoRALinear, TARGETS  # noqa: E402
from pretrained import load_backbone  # noqa: E402

DATA = ['--data', 'shapes', '--shapes_n', '32', '--batch_size', '4', '--num_workers', '0', '--device', 'cpu',
        '--log_every', '1', '--sample_every', '0']
NO_SEMANTIC = ['--lambda_sen', '0', '--lambda_cap', '0']
DEPTH, WIDTH, RANK = 2, 64, 8  # the tiny backbone's VAR; train.py's default rank


def run(backbone, out_dir, *extra):
    train.main(['--backbone', backbone, '--out_dir', str(out_dir), *DATA, *map(str, extra)])
    return os.path.join(str(out_dir), 'ckpt.pt')


def parts_of(ckpt_path):
    return torch.load(ckpt_path, map_location='cpu', weights_only=True)['parts']


def lora_keys():
    return {f'lora.{i}.{m}' for i in range(DEPTH * len(TARGETS)) for m in ('A', 'B')}


TEXT_KEYS = {'text_cond.proj.weight', 'text_cond.proj.bias'}


@pytest.fixture(scope='module')
def runs(tiny_backbone, tmp_path_factory):
    """Four 2-step runs: lora / full x class-to-image / text-to-image (the t2i ones with the semantic loss on)."""
    tmp = tmp_path_factory.mktemp('methods')
    return {
        ('lora', 'c2i'): run(tiny_backbone, tmp / 'lora_c2i', '--prompt', 'lora', '--max_steps', 2, *NO_SEMANTIC),
        ('full', 'c2i'): run(tiny_backbone, tmp / 'full_c2i', '--prompt', 'full', '--max_steps', 2, *NO_SEMANTIC),
        ('lora', 't2i'): run(tiny_backbone, tmp / 'lora_t2i', '--prompt', 'lora', '--t2i', '--max_steps', 2),
        ('full', 't2i'): run(tiny_backbone, tmp / 'full_t2i', '--prompt', 'full', '--t2i', '--max_steps', 2),
    }


def test_zero_lora_is_the_plain_model(tiny_backbone):
    cfg = vars(train.get_args(['--backbone', tiny_backbone, '--prompt', 'lora', *DATA]))
    vae, var, clip, parts = mvp.build_run(cfg, 'cpu', need_clip=False)
    _, plain = load_backbone(tiny_backbone)
    # the VAR's own parameters are the backbone's, all frozen; only the LoRA pairs train, B starts at zero
    assert sum(p.numel() for p in var.parameters()) == sum(p.numel() for p in plain.parameters())
    assert not any(p.requires_grad for p in var.parameters())
    assert parts.prompt is None and parts.var is None and len(parts.lora) == DEPTH * len(TARGETS)
    assert all(p.requires_grad for p in parts.parameters())
    assert set(parts.state_dict()) == lora_keys()
    assert all(pair.B.abs().sum() == 0 and pair.A.abs().sum() > 0 for pair in parts.lora)
    for block in var.blocks:
        assert all(isinstance(getattr(block.attn, name), LoRALinear) for name in TARGETS)
    # the VAR's state dict: the backbone's tensors, the wrapped layers' under .base.
    renamed = {k.replace('.mat_qkv.base.', '.mat_qkv.').replace('.proj.base.', '.proj.'): v
               for k, v in var.state_dict().items()}
    plain_state = plain.state_dict()
    assert list(renamed) == list(plain_state) and all(torch.equal(v, plain_state[k]) for k, v in renamed.items())

    torch.manual_seed(0)
    cond = plain.class_emb(torch.tensor([0, 3]))
    x = torch.randn(2, plain.L - 1, plain.Cvae)
    with torch.no_grad():
        assert torch.equal(var(cond, x), plain(cond, x))  # B = 0: identical logits
        for pair in parts.lora:
            pair.B.normal_(std=0.1)
        assert not torch.equal(var(cond, x), plain(cond, x))  # LoRA reaches the output (through gates at ~1e-5)


@pytest.mark.parametrize('mode', ['c2i', 't2i'])
def test_lora_checkpoint_holds_only_the_pairs(runs, tiny_backbone, mode):
    ckpt = torch.load(runs[('lora', mode)], map_location='cpu', weights_only=True)
    parts = ckpt['parts']
    assert set(parts) == lora_keys() | (TEXT_KEYS if mode == 't2i' else set())
    for i in range(DEPTH):
        assert parts[f'lora.{2 * i}.A'].shape == (RANK, WIDTH) and parts[f'lora.{2 * i}.B'].shape == (3 * WIDTH, RANK)
        assert parts[f'lora.{2 * i + 1}.A'].shape == (RANK, WIDTH) and parts[f'lora.{2 * i + 1}.B'].shape == (WIDTH, RANK)
    assert all(parts[k].abs().sum() > 0 for k in lora_keys() if k.endswith('.B'))  # B left zero: it trained
    assert ckpt['config']['prompt'] == 'lora' and ckpt['config']['lora_rank'] == RANK
    assert len(ckpt['optimizer']['state']) == len(parts)
    # rebuilt from the checkpoint: the pairs are the saved ones, the frozen base weights the backbone's
    cfg, vae, var, clip, tuned = mvp.load_run(runs[('lora', mode)])
    _, plain = load_backbone(tiny_backbone)
    assert torch.equal(var.blocks[1].attn.proj.base.weight, plain.blocks[1].attn.proj.weight)
    assert torch.equal(var.blocks[1].attn.proj.lora_B, parts['lora.3.B'])
    assert (clip is not None) == (mode == 't2i')


@pytest.mark.parametrize('mode', ['c2i', 't2i'])
def test_full_checkpoint_holds_the_var(runs, tiny_backbone, mode):
    parts = parts_of(runs[('full', mode)])
    _, plain = load_backbone(tiny_backbone)
    plain_state = plain.state_dict()
    assert set(parts) == {f'var.{k}' for k in plain_state} | (TEXT_KEYS if mode == 't2i' else set())
    changed = [k for k, v in plain_state.items() if not torch.equal(parts[f'var.{k}'], v)]
    assert 'blocks.0.attn.mat_qkv.weight' in changed and 'head.weight' in changed  # the transformer trained
    cfg, vae, var, clip, tuned = mvp.load_run(runs[('full', mode)])
    assert tuned.var is var and torch.equal(var.head.weight, parts['var.head.weight'])
    assert not any(k.startswith(('encoder', 'decoder', 'quantize', 'vae.', 'clip.')) for k in parts)


def test_sample_from_lora_and_full_checkpoints(runs, tmp_path):
    for method in ('lora', 'full'):
        out = tmp_path / f'{method}_c2i.png'
        sample.main(['--ckpt', runs[(method, 'c2i')], '--class_id', '0,1', '--n', '2', '--out', str(out), '--device', 'cpu'])
        assert out.is_file()
        out = tmp_path / f'{method}_t2i.png'
        sample.main(['--ckpt', runs[(method, 't2i')], '--text', 'a pinstriped blue square on a gray background', '--n', '2',
                     '--out', str(out), '--device', 'cpu'])
        assert out.is_file()
        with pytest.raises(ValueError, match='--no_prompt'):
            sample.main(['--ckpt', runs[(method, 'c2i')], '--class_id', '0', '--no_prompt', '--out',
                         str(tmp_path / 'x.png'), '--device', 'cpu'])


@pytest.mark.parametrize('method', ['lora', 'full'])
def test_resume(tiny_backbone, tmp_path, method):
    # the 4 steps stay in the warm-up, where the learning rate does not depend on --max_steps (2 for the first half)
    common = ['--prompt', method, *NO_SEMANTIC, '--warmup_steps', 10, '--lr', 0.01]
    a = run(tiny_backbone, tmp_path / 'a', *common, '--max_steps', 4)
    run(tiny_backbone, tmp_path / 'b', *common, '--max_steps', 2)
    b = run(tiny_backbone, tmp_path / 'b', *common, '--max_steps', 4, '--resume', 'auto')
    ckpt_a, ckpt_b = (torch.load(p, map_location='cpu', weights_only=True) for p in (a, b))
    assert ckpt_a['step'] == ckpt_b['step'] == 4
    assert set(ckpt_a['parts']) == set(ckpt_b['parts'])
    for k, v in ckpt_a['parts'].items():
        torch.testing.assert_close(ckpt_b['parts'][k], v, rtol=1e-5, atol=1e-6, msg=k)
    assert torch.equal(ckpt_a['rng']['torch'][0], ckpt_b['rng']['torch'][0])


def test_resume_with_another_lora_rank_is_refused(runs, tiny_backbone, tmp_path):
    with pytest.raises(ValueError, match='lora_rank'):
        run(tiny_backbone, tmp_path / 'o', '--prompt', 'lora', '--lora_rank', 4, '--max_steps', 3, *NO_SEMANTIC,
            '--resume', runs[('lora', 'c2i')])


def test_evaluate_before_is_the_untrained_model(tiny_backbone, tmp_path):
    """lr 0: nothing moves, so "after" must equal "before", which for LoRA / full is the plain backbone."""
    lora = run(tiny_backbone, tmp_path / 'lora', '--prompt', 'lora', '--max_steps', 1, '--lr', 0, *NO_SEMANTIC)
    results = evaluate.evaluate_run(lora, per_class=1, seed=0)
    assert {'FD_judge', 'class_accuracy'} <= set(results['after']) and results['before'] == results['after']
    full = run(tiny_backbone, tmp_path / 'full', '--prompt', 'full', '--t2i', '--max_steps', 1, '--lr', 0, *NO_SEMANTIC)
    results = evaluate.evaluate_run(full, n_texts=6, seed=0)
    assert {'FD_judge', 'attribute_accuracy', 'clip_score'} <= set(results['after'])
    assert results['before'] == results['after']
