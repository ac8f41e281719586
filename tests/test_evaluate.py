"""evaluate.py on a tiny random backbone: the figures exist, are finite, and 'before' is the untrained model."""
import math

import numpy as np

import pytest
import torch

import evaluate
import train

ARGS = ['--data', 'shapes', '--shapes_n', '32', '--batch_size', '4', '--num_workers', '0', '--device', 'cpu',
        '--lambda_sen', '0', '--lambda_cap', '0', '--log_every', '1', '--sample_every', '0']


def test_class_to_image_before_equals_after_for_untrained_prompts(tiny_backbone, tmp_path):
    out = str(tmp_path / 'c2i')
    train.main(['--backbone', tiny_backbone, '--out_dir', out, '--max_steps', '1', '--lr', '0', *ARGS])
    results = evaluate.evaluate_run(f'{out}/ckpt.pt', per_class=2, seed=0)
    assert set(results) == {'before', 'after'}
    assert set(results['after']) == {'FD_cls', 'FD_cls_se', 'FD_clip', 'FD_clip_se', 'class_accuracy',
                                     'class_accuracy_se'}
    assert results['after']['FD_clip_se'] > 0 and results['after']['FD_cls_se'] > 0  # bootstrap: a spread
    assert all(math.isfinite(v) for row in results.values() for v in row.values())
    assert results['before'] == results['after']  # lr 0: the prompts are still zero, so nothing may differ


def test_text_to_image_figures(tiny_backbone, tmp_path):
    out = str(tmp_path / 't2i')
    train.main(['--backbone', tiny_backbone, '--out_dir', out, '--max_steps', '2', '--lr', '0.5', '--t2i', *ARGS])
    results = evaluate.evaluate_run(f'{out}/ckpt.pt', n_texts=12, seed=0)
    per_attribute = {f'{key}_accuracy' for key in ('shape', 'colour', 'size', 'position', 'background')}
    figures = {'FD_cls', 'FD_clip', 'attribute_accuracy', *per_attribute}
    assert set(results['after']) == figures | {f + '_se' for f in figures} | {'clip_score'}
    for row in results.values():
        assert 0.0 <= row['attribute_accuracy'] <= 1.0 and 0.0 <= row['clip_score'] <= 100.0
        mean_of_attributes = sum(row[k] for k in per_attribute) / len(per_attribute)
        assert math.isclose(row['attribute_accuracy'], mean_of_attributes, rel_tol=1e-9)
    ckpt = torch.load(f'{out}/ckpt.pt', weights_only=True)
    assert ckpt['parts']['prompt.tokens'].abs().sum() > 0  # trained: "after" is a different model from "before"
    table = evaluate.format_results(results)
    assert table.splitlines()[0].startswith('| | FD_cls | FD_clip | attribute_accuracy | shape_accuracy |')
    assert ' ± ' in table.splitlines()[2]


def test_cli_bad_flags_are_refused_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(['--ckpt', 'unused.pt', '--per_class', '0'])
    assert '--per_class must be at least 1' in capsys.readouterr().err
    (tmp_path / 'a_file').write_text('')
    with pytest.raises(ValueError) as error:  # before the (missing) checkpoint is read
        evaluate.main(['--ckpt', 'unused.pt', '--json', str(tmp_path / 'a_file' / 'r.json')])
    assert str(error.value).startswith('--json') and 'cannot create' in str(error.value)


def test_class_probe_reads_a_class_only_where_the_features_hold_it():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (600,), generator=g)
    noise = torch.randn(600, 8, generator=g)
    holding = noise + 3 * torch.nn.functional.one_hot(labels, 8).float()
    assert evaluate.class_probe(holding[:500], labels[:500], holding[500:], labels[500:], epochs=5) > 0.9
    assert evaluate.class_probe(noise[:500], labels[:500], noise[500:], labels[500:], epochs=5) < 0.45  # chance 0.25


def test_coarse_probe_table_has_a_row_per_step_to_i_sen_and_a_column_per_target(tiny_backbone):
    table = evaluate.coarse_probe(tiny_backbone, n_train=40, n_test=20).splitlines()
    assert table[1] == '| features | names the class | names the size | names the position |'
    rows = [line for line in table if line.startswith('| ') and line.endswith('% |')]
    assert len(rows) == 6 and 'f_hat_1' in rows[2] and 'f_hat_kappa' in rows[4]
    assert all(0 <= float(cell.strip(' %')) <= 100 for row in rows for cell in row.split('|')[2:-1])


def test_prefix_probe_samples_less_the_more_scales_it_is_given(tiny_backbone):
    K = len(evaluate.load_backbone(tiny_backbone)[0].patch_nums)
    tables = [evaluate.prefix_probe(tiny_backbone, n=12, seed=seed).splitlines()[3:] for seed in (0, 1)]
    assert [row.split(' | ')[0] for row in tables[0]] == ['| none'] + [f'| 1..{j} of {K}' for j in range(1, K + 1)]
    assert tables[0][-1] == tables[1][-1]  # every scale given: the reconstructions, whatever the seed
    assert tables[0][0] != tables[1][0]  # nothing given: the samples follow the seed
    own_groups = [row.split(' | ')[-1].split(' / ')[1] for row in tables[0][:-1]]  # the renders' own: seed-free
    assert own_groups == [row.split(' | ')[-1].split(' / ')[1] for row in tables[1][:-1]]


def test_semantic_signal_measures_i_sen_at_the_scale_beta_sets(tiny_backbone, capsys):
    K = len(evaluate.load_backbone(tiny_backbone)[0].patch_nums)
    for beta in (0.5, 0.75):
        table = evaluate.semantic_signal(tiny_backbone, batches=1, batch_size=4, beta=beta)
        assert f'I_sen from scales 1..{math.floor(beta * K)} of {K}' in table.splitlines()[0]
        assert len(table.splitlines()) == 3 + 5  # header, table head, one row per way of decoding
    with pytest.raises(SystemExit):
        evaluate.main(['--semantic_signal', tiny_backbone, '--beta', '1.5'])
    assert '--beta must lie between 0 and 1, got 1.5' in capsys.readouterr().err


def test_fd_cls_reads_the_shape_classifiers_pooled_features(tiny_backbone):
    """FD_cls's space is the judge's own: the features its head reads, from uint8 images as the samples are saved."""
    import shapes
    classifier = shapes.load_shape_classifier(tiny_backbone)
    images = np.stack([shapes.render(a, 32) for a in shapes.make_split('test', 40, 0)])
    feats = evaluate.classifier_features(classifier, images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        np.testing.assert_allclose(feats, classifier.pooled(x).double().numpy(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(classifier.head(classifier.pooled(x)), classifier(x))
    stats = evaluate.feature_statistics(feats)
    assert evaluate.fd_with_se(feats, stats)[0] < 1e-6  # a set against its own statistics
    other = evaluate.classifier_features(classifier, np.stack([shapes.render(a, 32) for a in shapes.make_split('train', 40, 5)]))
    assert evaluate.fd_with_se(other, stats)[0] > 1e-3
