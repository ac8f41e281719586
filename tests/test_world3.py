"""The shapes world v3 (world3.py) and its pretraining (pretrain3.py) at tiny sizes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import world3
from shapes import to_input

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_texture_keeps_the_colour_on_average_and_vanishes_at_kappas_resolution():
    item = dict(world3.make_split('train', 1)[0], colour='red', background='white', shape='square')
    items = [dict(item, texture=t) for t in world3.TEXTURES]
    for t in items:  # two shades whose mean is the colour, at full resolution
        assert np.allclose(world3.texture_shades(t, 32).reshape(-1, 3).mean(0), world3.COLOURS['red'])
    full = np.stack([world3.render(t).astype(float) for t in items])
    coarse = world3.area_downsample(np.stack([world3.render(t) for t in items]))
    assert np.abs(full[1] - full[0]).max() > 40  # striped differs from plain in the render
    assert np.abs(coarse[1] - coarse[0]).max() < 0.01 and np.abs(coarse[2] - coarse[0]).max() < 0.01  # edges too


def test_every_caption_names_its_items_attributes():
    for item in world3.make_split('test', 60):
        assert world3.attributes_named(world3.caption(item)) == {a: item[a] for a in world3.ATTRIBUTES}
    assert world3.attributes_named('A Pinstriped CYAN star') == {'texture': 'pinstriped', 'colour': 'cyan', 'shape': 'star'}


def test_splits_are_deterministic_and_captions_varied():
    a, b = world3.make_split('train', 64, seed=0), world3.make_split('train', 64, seed=0)
    assert a == b and a != world3.make_split('test', 64, seed=0)
    captions = [world3.caption(x) for x in a]
    assert len(set(captions[:16])) == 16  # a batch of 16 repeats no caption
    words = set(world3.world_words())
    assert all(set(c.split()) <= words for c in captions)
    assert [x['label'] for x in a[:10]] == list(range(10))


def test_the_judge_reads_every_attribute_and_learns_them():
    images, items = world3.rendered('train', 600)
    judge = world3.train_judge(images, items, epochs=6)
    heads = world3.logits_of(judge(to_input(images[:5])))
    assert {a: h.shape[1] for a, h in heads.items()} == {a: len(v) for a, v in world3.VALUES.items()}
    read = world3.accuracies(judge, to_input(images), items)
    assert read['background'] > 0.8 and read['shape'] > 0.2  # 6 epochs of 600 renders; chance 0.29 and 0.1


def test_the_dataset_gives_train_py_its_four_fields():
    dataset = world3.Dataset('train', 12, seed=1)
    image, label, sentence, caption = dataset[3]
    assert image.shape == (3, 32, 32) and -1 <= image.min() and image.max() <= 1
    assert label == 3 and sentence == world3.sentence(3) and world3.CLASS_NAMES[3] in caption
    assert dataset.caption_and_label(3) == (caption, label)
    np.testing.assert_array_equal(((image.permute(1, 2, 0) + 1) * 127.5).round().numpy().astype(np.uint8),
                                  world3.render(dataset.items[3]))


def run_pretrain3(out, *flags):
    tiny = ['--out', str(out), '--judge_n', '100', '--judge_epochs', '1', '--gate_n', '20', '--n_train', '64',
            '--vae_steps', '2', '--clip_steps', '2', '--var_steps', '2', '--clip_batch', '8', '--var_batch', '4',
            '--log_every', '1', '--ckpt_every', '1', '--device', 'cpu', '--dtype', 'fp32']
    return subprocess.run([sys.executable, 'pretrain3.py', *tiny, *flags], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope='module')
def tiny_world3(tmp_path_factory):
    """A tiny v3 backbone, built twice: stopped at the first gate missed, then on with --keep_going."""
    out = tmp_path_factory.mktemp('world3')
    return out, run_pretrain3(out), run_pretrain3(out, '--keep_going')


def test_pretrain3_writes_every_gate_and_stops_at_the_first_missed(tiny_world3):
    tmp_path, stopped, result = tiny_world3
    assert stopped.returncode != 0 and 'gate G0 missed' in stopped.stderr.strip().splitlines()[-1]  # a 1-epoch judge
    assert result.returncode == 0, result.stderr[-2000:]
    assert '[judge] finished earlier' in result.stdout  # the finished stage is not trained again
    reports = {s: json.load(open(tmp_path / f'report_{s}.json')) for s in ('judge', 'vqvae', 'clip', 'var')}
    assert {'at_kappa', 'full', 'chance', 'G0_met'} <= set(reports['judge'])
    assert {'heldout_psnr_db', 'own_tokens_at_kappa', 'judge_on_reconstructions', 'G1_met'} <= set(reports['vqvae'])
    assert {'image_to_caption_top1', 'names_class_at_kappa', 'G2_met'} <= set(reports['clip'])
    assert {'class_recognised', 'fd_judge_samples', 'fd_ratio', 'is_judge', 'precision', 'recall',
            'sentence_loss_teacher_forced', 'G3_met'} <= set(reports['var'])
    assert reports['var']['guessing_level'] == pytest.approx(np.log(16), abs=1e-3)
    for name in ('judge.pth', 'vqvae.pth', 'var.pth', 'backbone.json', 'clip', 'renders.png'):
        assert (tmp_path / name).exists()
    assert not os.listdir(tmp_path / 'resume')  # every finished stage removed its state


@pytest.mark.parametrize('flags, message', [
    (['--gate_n', '15'], '--gate_n must be a multiple of 10'),
    (['--stage', 'clip'], '--stage clip: no judge.pth, backbone.json, vqvae.pth in --out'),
    (['--vae_steps', '0'], '--vae_steps must be positive'),
    (['--vae_coarse_share', '0'], '--vae_coarse_share must be in (0, 1], got 0.0'),
])
def test_pretrain3_bad_input_is_one_line(tmp_path, flags, message):
    import pretrain3
    with pytest.raises(SystemExit) as stop:
        pretrain3.main(['--out', str(tmp_path / 'out'), *flags])
    assert str(stop.value).startswith(f'error: {message}') and '\n' not in str(stop.value)
    assert not (tmp_path / 'out').exists()  # checked before any work


@pytest.mark.parametrize('task', ['c2i', 't2i'])
def test_a_run_on_world3_is_scored_by_the_judge(tiny_world3, tmp_path, task):
    """train.py --data world3 on the v3 backbone, then evaluate.py's figures: the judge's (FD_judge, class or
    per-attribute accuracy, with standard errors), the training CLIP's FD_clip as a second column."""
    import evaluate
    import train
    backbone = str(tiny_world3[0])
    train.main(['--backbone', backbone, '--data', 'world3', '--shapes_n', '16', '--batch_size', '4', '--max_steps', '2',
                '--num_workers', '0', '--device', 'cpu', '--sample_every', '0', '--out_dir', str(tmp_path / 'run'),
                *(['--t2i'] if task == 't2i' else [])])
    results = evaluate.evaluate_run(str(tmp_path / 'run' / 'ckpt.pt'), per_class=2, n_texts=12)
    assert set(results) == {'before', 'after'}
    wanted = {'FD_judge', 'FD_judge_se', 'FD_clip', 'FD_clip_se'} | (
        {'attribute_accuracy', *(f'{a}_accuracy' for a in world3.ATTRIBUTES)} if task == 't2i' else
        {'class_accuracy', 'class_accuracy_se', 'IS_judge', 'precision', 'recall'})
    for row in results.values():
        assert wanted <= set(row) and all(np.isfinite(v) for v in row.values())
        assert 0 <= row.get('class_accuracy', row.get('attribute_accuracy')) <= 1
    ckpt = str(tmp_path / 'run' / 'ckpt.pt')
    if task == 'c2i':  # one caption's samples are scored on text-to-image runs alone
        with pytest.raises(ValueError, match='scores a text-to-image run of world v3'):
            evaluate.score_caption(ckpt, 'a red heart', n=2)
        return
    scores = evaluate.score_caption(ckpt, 'a striped red heart against a white background', n=3)
    assert set(scores) == {'before', 'after'}
    for row in scores.values():
        assert set(row) == set(world3.ATTRIBUTES) and all(0 <= right <= 3 for right in row.values())
    with pytest.raises(ValueError, match='names no shape, colour, texture or background'):
        evaluate.score_caption(ckpt, 'a photo of something', n=2)
