"""world.evaluate on a tiny random backbone: the judge's figures exist, are finite, and 'before' is the untrained model."""
import math

import numpy as np

import pytest
import torch

import train
from world import evaluate, shapes

ARGS = ['--data', 'shapes', '--shapes_n', '32', '--batch_size', '4', '--num_workers', '0', '--device', 'cpu',
        '--lambda_sen', '0', '--lambda_cap', '0', '--log_every', '1', '--sample_every', '0']
C2I_FIGURES = {'FD_judge', 'FD_judge_se', 'class_accuracy', 'class_accuracy_se', 'IS_judge', 'precision', 'recall',
               'FD_clip', 'FD_clip_se'}


def test_class_to_image_before_equals_after_for_untrained_prompts(tiny_backbone, tmp_path):
    out = str(tmp_path / 'c2i')
    train.main(['--backbone', tiny_backbone, '--out_dir', out, '--max_steps', '1', '--lr', '0', *ARGS])
    results = evaluate.evaluate_run(f'{out}/ckpt.pt', per_class=2, seed=0)
    assert set(results) == {'before', 'after'} and set(results['after']) == C2I_FIGURES
    assert results['after']['FD_clip_se'] > 0 and results['after']['FD_judge_se'] > 0  # bootstrap: a spread
    assert all(math.isfinite(v) for row in results.values() for v in row.values())
    assert results['before'] == results['after']  # lr 0: the prompts are still zero, so nothing may differ
    with pytest.raises(ValueError, match='scores a text-to-image run of the shapes world'):
        evaluate.score_caption(f'{out}/ckpt.pt', 'a red heart', n=2)  # one caption's samples: text-to-image alone


def test_text_to_image_figures_and_one_captions_scores(tiny_backbone, tmp_path):
    out = str(tmp_path / 't2i')
    train.main(['--backbone', tiny_backbone, '--out_dir', out, '--max_steps', '2', '--lr', '0.5', '--t2i', *ARGS])
    results = evaluate.evaluate_run(f'{out}/ckpt.pt', n_texts=12, seed=0)
    per_attribute = {f'{a}_accuracy' for a in shapes.ATTRIBUTES}
    figures = {'FD_judge', 'FD_clip', 'attribute_accuracy', *per_attribute}
    assert set(results['after']) == figures | {f + '_se' for f in figures} | {'clip_score'}
    for row in results.values():
        assert 0.0 <= row['attribute_accuracy'] <= 1.0 and 0.0 <= row['clip_score'] <= 100.0
        mean_of_attributes = sum(row[k] for k in per_attribute) / len(per_attribute)
        assert math.isclose(row['attribute_accuracy'], mean_of_attributes, rel_tol=1e-9)
    ckpt = torch.load(f'{out}/ckpt.pt', weights_only=True)
    assert ckpt['parts']['prompt.tokens'].abs().sum() > 0  # trained: "after" is a different model from "before"
    table = evaluate.format_results(results)
    assert table.splitlines()[0].startswith('| | FD_judge | attribute_accuracy | shape_accuracy | colour_accuracy |')
    assert ' ± ' in table.splitlines()[2]
    scores = evaluate.score_caption(f'{out}/ckpt.pt', 'a striped red heart against a white background', n=3)
    assert set(scores) == {'before', 'after'}
    for row in scores.values():
        assert set(row) == set(shapes.ATTRIBUTES) and all(0 <= right <= 3 for right in row.values())
    with pytest.raises(ValueError, match='names no shape, colour, texture or background'):
        evaluate.score_caption(f'{out}/ckpt.pt', 'a photo of something', n=2)


def test_cli_bad_flags_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(['--ckpt', 'unused.pt', '--per_class', '0'])
    assert '--per_class must be at least 1' in capsys.readouterr().err
    (tmp_path / 'a_file').write_text('')
    with pytest.raises(ValueError) as error:  # before the (missing) checkpoint is read
        evaluate.main(['--ckpt', 'unused.pt', '--json', str(tmp_path / 'a_file' / 'r.json')])
    assert str(error.value).startswith('--json') and 'cannot create' in str(error.value)


def test_semantic_signal_gives_every_path_a_gradient_at_the_scale_beta_sets(tiny_backbone, tmp_path, capsys):
    out = str(tmp_path / 'run')
    train.main(['--backbone', tiny_backbone, '--out_dir', out, '--max_steps', '1', '--lr', '0', *ARGS])
    K = len(evaluate.load_backbone(tiny_backbone)[0].patch_nums)
    for beta in (0.5, 0.75):
        table = evaluate.semantic_signal(f'{out}/ckpt.pt', batches=1, batch_size=4, beta=beta).splitlines()
        assert f'I_sen from scales 1..{math.floor(beta * K)} of {K}' in table[0]
        assert len(table) == 3 + 2 + len(evaluate.PATHS)  # header, table head, the floor's two rows, one per path
        for line in table[5:]:  # each path: finite losses, a gradient from each level, a cosine in [-1, 1]
            cells = [c.strip() for c in line.strip('|').split('|')]
            sen, cap, _, g_ce, g_sen, g_cap, cos_sen, cos_cap = cells[1:]
            assert all(math.isfinite(float(v)) for v in (sen, cap)) and float(g_ce) > 0, line
            assert float(g_sen) > 0 and float(g_cap) > 0 and all(-1 <= float(c) <= 1 for c in (cos_sen, cos_cap)), line
    with pytest.raises(SystemExit):
        evaluate.main(['--semantic_signal', out, '--beta', '1.5'])
    assert '--beta must lie between 0 and 1, got 1.5' in capsys.readouterr().err


def test_fd_judge_reads_the_judges_pooled_features(tiny_backbone):
    """FD_judge's space is the judge's own: the features its head reads."""
    judge = shapes.load_judge(tiny_backbone)
    x = shapes.to_input(shapes.rendered('test', 40)[0])
    feats, class_logits = shapes.judged(judge, x)
    with torch.no_grad():
        np.testing.assert_allclose(feats, judge.pooled(x).double().numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(class_logits, shapes.logits_of(judge(x))['shape'].double().numpy(), rtol=1e-5,
                                   atol=1e-5)
    stats = evaluate.feature_statistics(feats)
    assert evaluate.fd_with_se(feats, stats)[0] < 1e-6  # a set against its own statistics
    noise = shapes.judged(judge, torch.rand(40, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)[0]
    assert evaluate.fd_with_se(noise, stats)[0] > 10 * evaluate.fd_with_se(feats[:20], stats)[0]


def test_partial_sums_draw_every_scale_below_the_renders(tiny_backbone, tmp_path):
    from PIL import Image
    evaluate.main(['--partial_sums', tiny_backbone, str(tmp_path / 'p.png')])
    K = len(evaluate.load_backbone(tiny_backbone)[0].patch_nums)
    with Image.open(tmp_path / 'p.png') as im:  # 8 renders, then each decoded up to scale 1..K: K + 1 rows of 32 px
        assert im.size == (8 * 32 + 9 * 2, (K + 1) * 32 + (K + 2) * 2)


def test_a_folder_run_is_scored_only_on_the_worlds_classes(tmp_path):
    """An exported folder (Table 8's domain) gives held-out images with their labels; a folder of other classes,
    which the judge cannot name, is refused in one line."""
    shapes.export_image_folder(str(tmp_path / 'domain'), 'test', 1, style='upside_down')
    images, items = evaluate.reference_set(str(tmp_path / 'domain'), 12, seed=0)
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    assert all(0 <= a['label'] < shapes.NUM_CLASSES for a in items)
    for name in ('cat', 'dog'):
        (tmp_path / 'other' / 'test' / name).mkdir(parents=True)
        (tmp_path / 'other' / 'test' / name / '0.png').write_bytes((tmp_path / 'domain' / 'test' / 'circle' / '00000.png').read_bytes())
    with pytest.raises(ValueError, match="are not the shapes world's"):
        evaluate.reference_set(str(tmp_path / 'other'), 4, seed=0)
