"""End-to-end tests of train.py and sample.py on the tiny random backbone of conftest.py (CPU, a few steps each).

Training and sampling run in-process (train.main / sample.main); the command-line error paths, DDP (torchrun) and the
NaN stop run as real subprocesses. Everything runs single-threaded: the machine is small and shared.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pretrained  # noqa: E402
import sample  # noqa: E402
import device  # noqa: E402
import mvp  # noqa: E402
import runlog  # noqa: E402
import train  # noqa: E402
from conftest import offline_hub_env, write_hf_cache  # noqa: E402
from pretrained import load_backbone, load_clip, save_backbone  # noqa: E402
from var import VAR  # noqa: E402
from vqvae import VQVAE  # noqa: E402

IMAGE = 32  # the tiny backbone's image size: patch_nums (1, 2, 3, 4) x downsample 8
PAD = 2  # save_grid's padding between and around the images
DATA = ['--data', 'shapes', '--shapes_n', '64', '--batch_size', '4', '--num_workers', '0', '--device', 'cpu']
NO_SEMANTIC = ['--lambda_sen', '0', '--lambda_cap', '0']
CAPTION = 'a striped red heart on a white background'
SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')


def train_argv(backbone, out_dir, *extra):
    return ['--backbone', backbone, '--out_dir', str(out_dir), *DATA, *map(str, extra)]


def grid_size(rows, cols, size=IMAGE):
    return cols * size + (cols + 1) * PAD, rows * size + (rows + 1) * PAD  # PIL's (width, height)


def png(path):
    return np.asarray(Image.open(path).convert('RGB'))


def read_log(out_dir):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [json.loads(line) for line in f if line.strip()]


def load_ckpt(path):
    return torch.load(path, map_location='cpu', weights_only=True)


def file_hashes(folder):
    hashes = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, 'rb') as f:
                hashes[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def run_cli(args, timeout=180, env=None):
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env={**SUBPROCESS_ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def message_lines(stderr: str) -> list:  # stderr without blank lines and tqdm's progress bar
    return [line for line in re.split(r'[\r\n]', stderr) if line.strip() and not re.search(r'\d+%\|', line)]


def assert_one_line_error(result, *words):
    """A clean CLI failure: exit code != 0, exactly one stderr line besides tqdm's progress bar, starting with 'error:',
    no traceback."""
    lines = message_lines(result.stderr)
    assert result.returncode != 0, result.stdout[-2000:]
    assert 'Traceback' not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith('error: '), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


# -----------------------------------------------------------------------------
# runs shared by several tests


@pytest.fixture(scope='module')
def c2i_run(tiny_backbone, tmp_path_factory):
    """Class-to-image, semantic loss on, 4 steps; the frozen models are captured from the live run."""
    out_dir = str(tmp_path_factory.mktemp('c2i') / 'run')
    argv = train_argv(tiny_backbone, out_dir, '--max_steps', 4, '--log_every', 2, '--ckpt_every', 2, '--sample_every', 2)
    hashes_before = file_hashes(tiny_backbone)
    captured = {}
    real_build_run = mvp.build_run

    def build_run(*args, **kwargs):
        captured['models'] = real_build_run(*args, **kwargs)
        return captured['models']

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train, 'build_run', build_run)
        train.main(argv)
    return dict(out_dir=out_dir, argv=argv, hashes_before=hashes_before, models=captured['models'])


@pytest.fixture(scope='module')
def t2i_run(tiny_backbone, tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp('t2i') / 'run')
    train.main(train_argv(tiny_backbone, out_dir, '--t2i', '--max_steps', 3, '--log_every', 1, '--sample_every', 0))
    return out_dir


@pytest.fixture(scope='module')
def strong_prompt_run(tiny_backbone, tmp_path_factory):
    """Class-to-image with a huge learning rate, so that the prompt is far from zero."""
    out_dir = str(tmp_path_factory.mktemp('strong') / 'run')
    train.main(train_argv(tiny_backbone, out_dir, *NO_SEMANTIC, '--lr', 0.5, '--warmup_steps', 0, '--max_steps', 3,
                          '--sample_every', 0))
    return out_dir


# -----------------------------------------------------------------------------
# 1. class-to-image training


def test_c2i_outputs(c2i_run):
    out_dir = c2i_run['out_dir']
    for name in ('ckpt.pt', 'prompt.safetensors', 'config.json', 'log.jsonl', 'losses.png', 'samples/step_000002.png',
                 'samples/step_000004.png'):
        assert os.path.isfile(os.path.join(out_dir, name)), name
    assert not [name for name in os.listdir(out_dir) if name.endswith('.part')]

    with open(os.path.join(out_dir, 'config.json')) as f:
        config = json.load(f)
    resolved = vars(train.get_args(c2i_run['argv']))  # the resolved config, less the training machine's paths ...
    assert config.pop('trainable_parameters') == 24 * 64  # the tau-20 frame prompt of the 2x2 .. 4x4 scales, width 64
    assert config.pop('var_parameters') == sum(p.numel() for p in c2i_run['models'][1].parameters())
    assert config.pop('autocast') == str(device.auto_dtype(torch.device('cpu'))).removeprefix('torch.')
    assert config == {k: v for k, v in resolved.items() if k not in ('cache_dir', 'out_dir', 'resume')}
    assert config['first_scale'] == 'off'  # ... with 'auto' resolved (class-to-image: the first scale is off)

    rows = read_log(out_dir)
    assert [r['step'] for r in rows] == [2, 4]
    for r in rows:
        for key in ('loss', 'ce', 'sen', 'cap', 'grad_norm', 'grad_ce', 'grad_sen', 'grad_cap', 'lr'):
            assert np.isfinite(r[key]), (key, r)
        assert r['loss'] == pytest.approx(r['ce'] + r['sen'] + r['cap'], rel=1e-5)  # lambda_sen = lambda_cap = 1
        assert r['clipped'] == (r['grad_norm'] > 1.0)  # --grad_clip 1.0 on the total (--balance sum)
        assert r['grad_ce'] > 0 and r['grad_sen'] > 0 and r['grad_cap'] > 0

    with Image.open(os.path.join(out_dir, 'losses.png')) as img:
        assert img.size == (5 * 360, 200)  # one panel each for loss, ce, sen, cap, and the gradient norms
    with Image.open(os.path.join(out_dir, 'samples', 'step_000002.png')) as img:
        assert img.size == grid_size(1, 8)  # the first 8 of the 10 classes, one row


def test_c2i_checkpoint_holds_only_the_trained_parts(c2i_run, tiny_backbone):
    path = os.path.join(c2i_run['out_dir'], 'ckpt.pt')
    ckpt = load_ckpt(path)
    assert set(ckpt) == {'config', 'step', 'parts', 'optimizer', 'scaler', 'rng'}
    assert ckpt['step'] == 4
    counts = {'trainable_parameters': 24 * 64, 'var_parameters': sum(p.numel() for p in c2i_run['models'][1].parameters()),
              'autocast': str(device.auto_dtype(torch.device('cpu'))).removeprefix('torch.')}  # --dtype auto's choice here
    assert ckpt['config'] == {**vars(train.get_args(c2i_run['argv'])), **counts}
    assert list(ckpt['parts']) == ['prompt.tokens']
    frozen_prefixes = ('blocks.', 'class_emb', 'word_embed', 'head', 'pos_', 'encoder', 'decoder', 'quantize', 'visual',
                       'transformer', 'var.', 'vae.', 'clip.')
    assert not [k for k in ckpt['parts'] if k.startswith(frozen_prefixes)]
    tokens = ckpt['parts']['prompt.tokens']
    assert tokens.shape == (0 + 4 + 8 + 12, 64)  # frame prompts of scales 2x2, 3x3, 4x4 (tau 20), width 64
    # small: the prompt and its optimiser state, nothing of the backbone
    assert os.path.getsize(path) < 200_000
    assert os.path.getsize(path) < os.path.getsize(os.path.join(tiny_backbone, 'var.pth')) / 4
    state = ckpt['optimizer']['state']
    assert len(state) == 1 and state[0]['exp_avg'].shape == tokens.shape and int(state[0]['step']) == 4
    assert len(ckpt['rng']['torch']) == 1 and ckpt['rng']['torch'][0].dtype == torch.uint8
    assert ckpt['rng']['cuda'] == []


def test_c2i_only_the_prompt_changes(c2i_run, tiny_backbone):
    assert file_hashes(tiny_backbone) == c2i_run['hashes_before']  # the backbone on disk is untouched
    vae, var, clip, parts = c2i_run['models']  # the live models of the run, after training
    fresh_vae, fresh_var = load_backbone(tiny_backbone)
    fresh_clip, _ = load_clip(os.path.join(tiny_backbone, 'clip'))
    for live, fresh in ((vae, fresh_vae), (var, fresh_var), (clip.model, fresh_clip)):
        assert not any(p.requires_grad for p in live.parameters())
        fresh_state = fresh.state_dict()
        for k, v in live.state_dict().items():
            assert torch.equal(v, fresh_state[k]), k
    tokens = load_ckpt(os.path.join(c2i_run['out_dir'], 'ckpt.pt'))['parts']['prompt.tokens']
    assert torch.equal(parts.prompt.tokens.detach(), tokens)
    assert (tokens.abs().sum(dim=1) > 0).all()  # zero at init, every token trained


# -----------------------------------------------------------------------------
# 2. text-to-image


def test_t2i_checkpoint(t2i_run):
    ckpt = load_ckpt(os.path.join(t2i_run, 'ckpt.pt'))
    assert ckpt['step'] == 3 and ckpt['config']['t2i'] and ckpt['config']['first_scale'] == 'on'
    assert set(ckpt['parts']) == {'prompt.tokens', 'text_cond.proj.weight', 'text_cond.proj.bias'}
    assert ckpt['parts']['text_cond.proj.weight'].shape == (64, 32)  # tiny CLIP's 32-d text features -> width 64
    assert ckpt['parts']['prompt.tokens'].shape == (1 + 4 + 8 + 12, 64)
    cfg, vae, var, clip, parts = mvp.load_run(os.path.join(t2i_run, 'ckpt.pt'))
    assert parts.prompt.counts() == [1, 4, 8, 12]  # the first-scale prompt is on
    assert clip is not None
    rows = read_log(t2i_run)
    assert [r['step'] for r in rows] == [1, 2, 3] and all(np.isfinite(r['loss']) for r in rows)
    assert cfg['tokens'] == 'rollout' and all(r['sen'] > 0 and r['cap'] > 0 for r in rows)  # the task's default loss


def test_t2i_sample(t2i_run, tmp_path):
    out, per_image = tmp_path / 'grid.png', tmp_path / 'each'
    sample.main(['--ckpt', os.path.join(t2i_run, 'ckpt.pt'), '--text', CAPTION, '--n', '2', '--out', str(out),
                 '--per_image', str(per_image), '--device', 'cpu'])
    with Image.open(out) as img:
        assert img.size == grid_size(1, 2)
    grid = png(out)
    files = sorted(os.listdir(per_image))
    assert len(files) == 2 and all(f.endswith('.png') for f in files)
    for i, name in enumerate(files):
        single = png(per_image / name)
        assert single.shape == (IMAGE, IMAGE, 3)  # the image as the model made it: no grid border
        x0 = PAD + i * (IMAGE + PAD)
        np.testing.assert_array_equal(single, grid[PAD:PAD + IMAGE, x0:x0 + IMAGE])


# -----------------------------------------------------------------------------
# 3. resuming continues exactly where the interrupted run stopped


def test_resume_is_exact(tiny_backbone, tmp_path):
    common = ['--max_steps', 6, '--log_every', 1, '--sample_every', 0]  # semantic loss on: CLIP and cond-drop RNG
    train.main(train_argv(tiny_backbone, tmp_path / 'a', *common))
    train.main(train_argv(tiny_backbone, tmp_path / 'b', *common[:1], 3, *common[2:]))
    train.main(train_argv(tiny_backbone, tmp_path / 'b', *common, '--resume', 'auto'))

    rows_a, rows_b = read_log(tmp_path / 'a'), read_log(tmp_path / 'b')
    assert [r['step'] for r in rows_a] == [r['step'] for r in rows_b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(rows_a[3:], rows_b[3:]):
        for key in ('loss', 'ce', 'sen', 'cap', 'grad_norm', 'lr'):
            assert rb[key] == ra[key], (ra['step'], key, ra[key], rb[key])
    ckpt_a, ckpt_b = load_ckpt(tmp_path / 'a' / 'ckpt.pt'), load_ckpt(tmp_path / 'b' / 'ckpt.pt')
    assert ckpt_a['step'] == ckpt_b['step'] == 6
    tokens_a, tokens_b = ckpt_a['parts']['prompt.tokens'], ckpt_b['parts']['prompt.tokens']
    assert tokens_a.abs().max() > 0
    # bit-exact: a text's CLIP features do not depend on the texts encoded before it (FrozenClip.encode_text)
    assert torch.equal(tokens_b, tokens_a)
    # the same number of random draws: the resumed run's RNG ends where the uninterrupted one's does
    assert torch.equal(ckpt_a['rng']['torch'][0], ckpt_b['rng']['torch'][0])


# -----------------------------------------------------------------------------
# 4. sampling from a class-to-image checkpoint


def test_sample_c2i_grid(strong_prompt_run, tmp_path):
    out = tmp_path / 'grid.png'
    sample.main(['--ckpt', os.path.join(strong_prompt_run, 'ckpt.pt'), '--class_id', '0,3', '--n', '2', '--out', str(out),
                 '--device', 'cpu'])
    with Image.open(out) as img:
        assert img.size == grid_size(2, 2)  # one row per class


def test_sample_prompt_matters_and_no_prompt_is_the_plain_backbone(strong_prompt_run, tiny_backbone, tmp_path):
    ckpt = os.path.join(strong_prompt_run, 'ckpt.pt')
    assert load_ckpt(ckpt)['parts']['prompt.tokens'].abs().mean() > 0.1  # clearly non-zero
    common = ['--class_id', '0', '--n', '2', '--seed', '3', '--device', 'cpu']
    sample.main(['--ckpt', ckpt, *common, '--out', str(tmp_path / 'prompt.png')])
    sample.main(['--ckpt', ckpt, *common, '--no_prompt', '--out', str(tmp_path / 'no_prompt.png')])
    sample.main(['--backbone', tiny_backbone, *common, '--out', str(tmp_path / 'plain.png')])
    with_prompt, no_prompt, plain = (png(tmp_path / f'{n}.png') for n in ('prompt', 'no_prompt', 'plain'))
    assert with_prompt.shape == no_prompt.shape == plain.shape == (IMAGE + 2 * PAD, 2 * IMAGE + 3 * PAD, 3)
    assert not np.array_equal(with_prompt, no_prompt)
    np.testing.assert_array_equal(no_prompt, plain)


def test_sample_eval_npz(strong_prompt_run, tmp_path):
    out = tmp_path / 'eval.npz'
    sample.main(['--ckpt', os.path.join(strong_prompt_run, 'ckpt.pt'), '--eval_npz', str(out), '--per_class', '2',
                 '--num_classes', '3', '--batch_size', '4', '--device', 'cpu'])  # two batches: 4 + 2
    assert sorted(os.listdir(tmp_path)) == ['eval.npz']  # no temporary file left
    with np.load(out) as npz:
        arr, labels = npz['arr_0'], npz['labels']
    assert arr.dtype == np.uint8 and arr.shape == (6, IMAGE, IMAGE, 3)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert arr.std() > 0


# -----------------------------------------------------------------------------
# 5. DDP on the CPU (torchrun, gloo)

DDP_WRAPPER = '''
import os, sys
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
import data
import train

dump_dir = os.environ['DUMP_DIR']
captured, batch_calls = {{}}, []
real_build_run, real_batches_of_epoch, real_destroy = train.build_run, data.batches_of_epoch, dist.destroy_process_group


def build_run(*args, **kwargs):  # keep this rank's trained parts
    models = real_build_run(*args, **kwargs)
    captured['parts'] = models[-1]
    return models


def batches_of_epoch(n, batch_size, epoch, seed, rank, world):  # record what this rank was given
    batches = real_batches_of_epoch(n, batch_size, epoch, seed, rank, world)
    batch_calls.append(dict(epoch=epoch, rank=rank, world=world, batches=batches))
    return batches


def destroy_process_group(*args, **kwargs):  # train.main ends with this on every rank: dump this rank's state first
    rank = dist.get_rank()
    state = {{k: v.detach().clone() for k, v in captured['parts'].state_dict().items()}}
    torch.save(dict(parts=state, batch_calls=batch_calls), os.path.join(dump_dir, f'rank{{rank}}.pt'))
    return real_destroy(*args, **kwargs)


train.build_run, dist.destroy_process_group = build_run, destroy_process_group
train.batches_of_epoch = data.batches_of_epoch = batches_of_epoch  # the steps per epoch, and the epoch's loader
train.main(sys.argv[1:])
'''


@pytest.mark.parametrize('balance', ['sum', 'clip_each'])  # clip_each: gradients term by term, averaged by hand
def test_ddp_two_cpu_processes(tiny_backbone, tmp_path, balance):
    wrapper = tmp_path / 'ddp_wrapper.py'
    wrapper.write_text(DDP_WRAPPER.format(root=ROOT))
    # no condition dropout and no (batch-contrastive) semantic loss: 2 processes x 4 images must equal 1 process x 8
    argv = train_argv(tiny_backbone, tmp_path / 'ddp', *NO_SEMANTIC, '--cond_drop', 0, '--max_steps', 3,
                      '--log_every', 1, '--sample_every', 0, '--balance', balance)
    result = run_cli(['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', 2, wrapper, *argv],
                     env=dict(DUMP_DIR=str(tmp_path)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    assert 'world size 2' in result.stdout

    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in (0, 1)]
    ckpt = load_ckpt(tmp_path / 'ddp' / 'ckpt.pt')
    tokens = ckpt['parts']['prompt.tokens']
    assert tokens.abs().max() > 0
    for r in ranks:  # every rank ends with the very same prompt, the one in the checkpoint
        assert torch.equal(r['parts']['prompt.tokens'], tokens)
    assert len(ckpt['rng']['torch']) == 2  # each rank's own RNG stream
    assert not torch.equal(ckpt['rng']['torch'][0], ckpt['rng']['torch'][1])
    assert [r['step'] for r in read_log(tmp_path / 'ddp')] == [1, 2, 3]  # logged once, by rank 0

    # the ranks trained on disjoint batches (the last call is the training loop's, the epoch-0 call of each rank)
    seen = []
    for rank, r in enumerate(ranks):
        call = r['batch_calls'][-1]
        assert (call['epoch'], call['rank'], call['world']) == (0, rank, 2)
        seen.append({i for batch in call['batches'][:3] for i in batch})
    assert len(seen[0]) == len(seen[1]) == 12 and not seen[0] & seen[1]

    # gradients are averaged over the ranks: the same as one process with the two ranks' batches side by side
    train.main(train_argv(tiny_backbone, tmp_path / 'single', *NO_SEMANTIC, '--cond_drop', 0, '--max_steps', 3,
                          '--sample_every', 0, '--batch_size', 8, '--balance', balance))
    single = load_ckpt(tmp_path / 'single' / 'ckpt.pt')['parts']['prompt.tokens']
    torch.testing.assert_close(tokens, single, rtol=1e-5, atol=1e-5 * single.abs().max().item())  # seen: 2e-7


def test_batches_of_epoch_split_across_ranks():
    for n, world in ((64, 2), (70, 2), (70, 3)):
        per_rank = [train.batches_of_epoch(n, 4, 5, 1, rank, world) for rank in range(world)]
        steps = (n // (4 * world))
        assert all(len(b) == steps and all(len(x) == 4 for x in b) for b in per_rank)
        flat = [i for b in per_rank for batch in b for i in batch]
        assert len(flat) == len(set(flat)) == steps * 4 * world  # disjoint; only the remainder is dropped
        assert set(flat) <= set(range(n))
        for s in range(steps):  # step s of every rank together is one contiguous slice of the epoch's permutation
            assert sorted(i for b in per_rank for i in b[s]) == sorted(
                i for i in train.batches_of_epoch(n, 4 * world, 5, 1, 0, 1)[s])
    assert train.batches_of_epoch(64, 4, 0, 0, 0, 2) == train.batches_of_epoch(64, 4, 0, 0, 0, 2)
    assert train.batches_of_epoch(64, 4, 0, 0, 0, 2) != train.batches_of_epoch(64, 4, 1, 0, 0, 2)


# -----------------------------------------------------------------------------
# 6. clear command-line errors


def test_cli_error_no_data(tiny_backbone, tmp_path):
    result = run_cli(['train.py', '--backbone', tiny_backbone, '--device', 'cpu', *NO_SEMANTIC, '--out_dir', tmp_path / 'o'])
    assert_one_line_error(result, '--data')


def test_cli_error_empty_data_folder(tiny_backbone, tmp_path):
    (tmp_path / 'empty' / 'train').mkdir(parents=True)
    result = run_cli(['train.py', '--backbone', tiny_backbone, '--device', 'cpu', *NO_SEMANTIC, '--num_workers', 0,
                      '--data', tmp_path / 'empty', '--out_dir', tmp_path / 'o'])
    assert_one_line_error(result, 'no images')


def test_cli_error_broken_captions_line(tiny_backbone, tmp_path):
    from world.shapes import export_image_folder
    data = tmp_path / 'data'
    export_image_folder(str(data), 'train', n_per_class=1)
    lines = (data / 'captions.jsonl').read_text().splitlines()
    lines[2] = lines[2][:-5]  # line 3: cut off mid-object
    (tmp_path / 'broken.jsonl').write_text('\n'.join(lines) + '\n')
    result = run_cli(['train.py', '--backbone', tiny_backbone, '--device', 'cpu', *NO_SEMANTIC, '--num_workers', 0,
                      '--data', data, '--captions', tmp_path / 'broken.jsonl', '--out_dir', tmp_path / 'o'])
    assert_one_line_error(result, 'line 3', 'broken.jsonl')


def test_cli_error_resume_with_other_tau(c2i_run, tiny_backbone, tmp_path):
    result = run_cli(['train.py', '--backbone', tiny_backbone, *DATA, *NO_SEMANTIC, '--tau', 8,
                      '--resume', os.path.join(c2i_run['out_dir'], 'ckpt.pt'), '--out_dir', tmp_path / 'o'])
    assert_one_line_error(result, '--tau', '20', '8')


def test_cli_error_sample_empty_text(tmp_path):
    result = run_cli(['sample.py', '--device', 'cpu', '--text', '', '--out', tmp_path / 'x.png'])
    assert_one_line_error(result, '--text')
    assert not (tmp_path / 'x.png').exists()



@pytest.mark.parametrize('script', ['train.py', 'sample.py'])
def test_cli_error_unknown_device(tiny_backbone, tmp_path, script):
    flags = [*DATA, *NO_SEMANTIC, '--out_dir', tmp_path / 'o'] if script == 'train.py' else ['--class_id', 0, '--out', tmp_path / 'x.png']
    result = run_cli([script, '--backbone', tiny_backbone, *flags, '--device', 'gpu0'])
    assert_one_line_error(result, '--device gpu0')
    assert not (tmp_path / 'o').exists() and not (tmp_path / 'x.png').exists()


def test_parse_device():
    from device import parse_device
    assert parse_device('cpu') == torch.device('cpu')
    assert parse_device('auto').type == ('cuda' if torch.cuda.is_available() else 'cpu')
    with pytest.raises(ValueError, match='--device gpu0 is not a device'):
        parse_device('gpu0')
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='--device cuda:1 but CUDA is not available'):
            parse_device('cuda:1')

def test_cli_error_sample_text_with_c2i_checkpoint(c2i_run, tmp_path):
    result = run_cli(['sample.py', '--device', 'cpu', '--ckpt', os.path.join(c2i_run['out_dir'], 'ckpt.pt'),
                      '--text', CAPTION, '--out', tmp_path / 'x.png'])
    assert_one_line_error(result, 'class-to-image')
    assert not (tmp_path / 'x.png').exists()


def test_cli_error_sample_missing_checkpoint(tmp_path):
    result = run_cli(['sample.py', '--device', 'cpu', '--ckpt', tmp_path / 'nothing.pt', '--class_id', 0,
                      '--out', tmp_path / 'x.png'])
    assert_one_line_error(result, 'nothing.pt')


def test_cli_error_sample_corrupt_checkpoint(tmp_path):
    (tmp_path / 'corrupt.pt').write_bytes(np.random.default_rng(0).bytes(4096))
    result = run_cli(['sample.py', '--device', 'cpu', '--ckpt', tmp_path / 'corrupt.pt', '--class_id', 0,
                      '--out', tmp_path / 'x.png'])
    assert_one_line_error(result, 'corrupt.pt')


@pytest.mark.parametrize('flag, value', [('--batch_size', 0), ('--log_every', 0), ('--ckpt_every', 0),
                                         ('--max_steps', 0), ('--lambda_sen', -1), ('--lambda_cap', -0.5), ('--lr', -1e-3),
                                         ('--cond_drop', 1.5), ('--soft_temperature', 0), ('--num_workers', -1),
                                         ('--semantic_chunk', -1), ('--semantic_ratio', 0)])
def test_unusable_flag_values_are_one_line(flag, value):
    with pytest.raises(ValueError) as error:
        train.get_args(['--data', 'shapes', flag, str(value)])
    message = str(error.value)
    assert '\n' not in message and message.startswith(flag) and str(value) in message, message


def test_the_semantic_loss_defaults_per_task_and_a_given_value_stays():
    """Eq. 9 as written with soft tokens for class-to-image, the rollout at 0.1 for text-to-image (mvp.DEFAULT_LAMBDAS,
    DEFAULT_TOKENS); a flag overrides."""
    loss = lambda *argv: (lambda a: (a.lambda_sen, a.lambda_cap, a.tokens))(train.get_args(['--data', 'shapes', *argv]))
    assert loss() == (1.0, 1.0, 'soft') and loss('--t2i') == (0.1, 0.1, 'rollout')
    assert loss('--t2i', '--lambda_sen', '0.5', '--tokens', 'soft') == (0.5, 0.1, 'soft')
    assert loss('--lambda_cap', '0', '--tokens', 'gumbel') == (1.0, 0.0, 'gumbel')


def test_default_workers_share_the_cores(monkeypatch):
    """Enough DataLoader workers to feed a GPU (one decodes ~130 JPEGs/s at 256 px: tools.bench dataloader), shared
    among the processes torchrun starts on the machine, at most 8 each; an explicit value stays."""
    monkeypatch.setattr(os, 'cpu_count', lambda: 16)
    monkeypatch.delenv('LOCAL_WORLD_SIZE', raising=False)
    assert train.get_args(['--data', 'shapes']).num_workers == 8
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')
    assert train.get_args(['--data', 'shapes']).num_workers == 4
    monkeypatch.setattr(os, 'cpu_count', lambda: 2)
    assert train.get_args(['--data', 'shapes']).num_workers == 1
    assert train.get_args(['--data', 'shapes', '--num_workers', '0']).num_workers == 0


def test_cli_error_zero_batch_size_writes_nothing(tiny_backbone, tmp_path):
    result = run_cli(['train.py', *train_argv(tiny_backbone, tmp_path / 'o', '--batch_size', 0)])
    assert_one_line_error(result, '--batch_size', 'at least 1')
    assert not (tmp_path / 'o').exists()


def test_cli_error_captions_that_cannot_be_used(tiny_backbone, tmp_path):
    """A --captions file that is missing, or given with the shapes world (which has its own), is refused, not ignored."""
    result = run_cli(['train.py', *train_argv(tiny_backbone, tmp_path / 'o', '--captions', tmp_path / 'c.jsonl')])
    assert_one_line_error(result, '--captions', 'shapes world')
    data = write_image_folder(tmp_path / 'data', 2)
    result = run_cli(['train.py', '--backbone', tiny_backbone, '--device', 'cpu', *NO_SEMANTIC, '--data', data,
                      '--captions', tmp_path / 'c.jsonl', '--out_dir', tmp_path / 'o'])
    assert_one_line_error(result, '--captions', 'c.jsonl', 'no such file')
    assert not (tmp_path / 'o').exists()


def test_cli_error_out_dir_that_cannot_be_made(tiny_backbone, tmp_path):
    (tmp_path / 'a_file').write_text('')
    result = run_cli(['train.py', *train_argv(tiny_backbone, tmp_path / 'a_file' / 'o')])
    assert_one_line_error(result, '--out_dir', 'cannot create')
    assert 'data:' not in result.stdout  # refused before the dataset and models were built


def write_image_folder(root, n_classes, size=IMAGE):
    for c in range(n_classes):
        (root / 'train' / f'class{c:02d}').mkdir(parents=True)
        Image.new('RGB', (size, size), (20 * c, 0, 0)).save(root / 'train' / f'class{c:02d}' / '0.png')
    return root


def test_cli_error_more_classes_than_the_backbone_knows(tiny_backbone, tmp_path):
    """An 11th class folder on a 10-class backbone would train as the null (guidance) class: refused, before any model
    is built; text-to-image, where captions replace classes, takes the same folder."""
    data = write_image_folder(tmp_path / 'data', 11)
    result = run_cli(['train.py', '--backbone', tiny_backbone, '--device', 'cpu', *NO_SEMANTIC, '--num_workers', 0,
                      '--data', data, '--out_dir', tmp_path / 'o'])
    assert_one_line_error(result, '--data', '11 classes', 'knows 10', '--t2i')
    assert not (tmp_path / 'o').exists()
    train.main(['--backbone', tiny_backbone, '--device', 'cpu', '--num_workers', '0', '--data', str(data), '--t2i',
                '--batch_size', '2', '--max_steps', '1', '--sample_every', '0', '--out_dir', str(tmp_path / 't2i')])
    assert (tmp_path / 't2i' / 'ckpt.pt').exists()


def test_cli_error_corrupt_image_with_workers_is_one_line(tiny_backbone, tmp_path):
    data = write_image_folder(tmp_path / 'data', 2)
    (data / 'train' / 'class01' / 'broken.png').write_bytes(b'not a png at all')
    result = run_cli(['train.py', '--backbone', tiny_backbone, '--device', 'cpu', *NO_SEMANTIC, '--num_workers', 2,
                      '--batch_size', 3, '--data', data, '--out_dir', tmp_path / 'o', '--sample_every', 0])
    assert_one_line_error(result, 'broken.png')


@pytest.mark.parametrize('line, words', [
    ('{"path": "train/a/0.png", "caption": null}', ['line 2', 'caption', 'null']),
    ('{"path": "train/a/0.png", "caption": "  "}', ['line 2', 'non-empty']),
    ('{"path": 7, "caption": "a cat"}', ['line 2', 'path']),
])
def test_captions_that_are_not_texts_are_one_line(tmp_path, line, words):
    from data import load_captions
    path = tmp_path / 'captions.jsonl'
    path.write_text('{"path": "train/a/1.png", "caption": "a dog"}\n' + line + '\n')
    with pytest.raises(ValueError) as error:
        load_captions(str(path))
    message = str(error.value)
    assert '\n' not in message and str(path) in message and all(w in message for w in words), message


def test_captions_not_utf8_name_the_file_and_line(tmp_path):
    from data import load_captions
    path = tmp_path / 'captions.jsonl'
    path.write_bytes('{"path": "a.png", "caption": "a dog"}\n'.encode() + '{"path": "b.png", "caption": "caf\u00e9"}\n'.encode('latin-1'))
    with pytest.raises(ValueError, match=re.escape(f'{path}, line 2: not UTF-8')):
        load_captions(str(path))


def test_ctrl_c_saves_the_step_reached_and_stops_with_one_line(tiny_backbone, tmp_path):
    out_dir = tmp_path / 'run'
    argv = train_argv(tiny_backbone, out_dir, *NO_SEMANTIC, '--max_steps', 100000, '--log_every', 1,
                      '--ckpt_every', 100000, '--sample_every', 0, '--num_workers', 2)
    process = subprocess.Popen([sys.executable, 'train.py', *map(str, argv)], cwd=ROOT, env=SUBPROCESS_ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out_dir / 'log.jsonl'
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or len(read_log(out_dir)) < 3):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    lines = message_lines(stderr)
    assert process.returncode == 130 and 'Traceback' not in stderr, stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith('interrupted at step'), stderr[-3000:]
    step = int(re.search(r'interrupted at step (\d+)', lines[0]).group(1))
    assert step >= 3 and load_ckpt(out_dir / 'ckpt.pt')['step'] == step
    assert read_log(out_dir)[-1]['step'] == step


def test_torn_log_line_does_not_block_a_resume(nan_run, tmp_path):
    out_dir = tmp_path / 'run'
    shutil.copytree(nan_run['out_dir'], out_dir)
    with open(out_dir / 'log.jsonl', 'a') as f:
        f.write('{"step": 4, "loss": 0.12')  # what a kill mid-write leaves
    argv = nan_run['argv']
    argv[argv.index('--out_dir') + 1] = str(out_dir)
    train.main(argv + ['--resume', 'auto'])
    assert [r['step'] for r in read_log(out_dir)] == [1, 2, 3, 4, 5, 6]


def test_nan_between_checks_is_caught_before_the_next_checkpoint(tiny_backbone, tmp_path):
    """The loop reads the loss back from the device only before a logged or checkpointed update: a NaN at step 3
    (nothing logged, checkpoints at 2 and 4) poisons the prompt, and the check before step 4's checkpoint stops the
    run, naming step 3, with step 2's checkpoint as it was."""
    out_dir = tmp_path / 'run'
    result, _ = run_with_nan(tiny_backbone, tmp_path, out_dir, 3, '--max_steps', 6, '--ckpt_every', 2, '--log_every', 100)
    assert_one_line_error(result, 'nan', 'at step 3', 'is untouched')
    assert sorted(name for name in os.listdir(out_dir) if 'saved_at' in name) == ['ckpt.pt.saved_at_step2']
    ckpt = load_ckpt(out_dir / 'ckpt.pt')
    assert ckpt['step'] == 2 and torch.isfinite(ckpt['parts']['prompt.tokens']).all()


def test_nan_at_the_first_step_says_no_checkpoint_was_written(tiny_backbone, tmp_path):
    result, _ = run_with_nan(tiny_backbone, tmp_path, tmp_path / 'run', 1, '--max_steps', 3)
    assert_one_line_error(result, 'nan', 'step 1', 'no checkpoint was written')
    assert not (tmp_path / 'run' / 'ckpt.pt').exists()


def test_sample_eval_npz_into_a_missing_folder_fails_before_sampling(tmp_path):
    result = run_cli(['sample.py', '--device', 'cpu', '--eval_npz', tmp_path / 'nowhere' / 's.npz'])
    assert_one_line_error(result, '--eval_npz', 'no folder', str(tmp_path / 'nowhere'))


def test_sample_out_under_a_file_fails_before_sampling(tmp_path):
    (tmp_path / 'a_file').write_text('')
    result = run_cli(['sample.py', '--device', 'cpu', '--class_id', 0, '--out', tmp_path / 'a_file' / 'x.png'])
    assert_one_line_error(result, '--out', 'cannot create the folder')


def test_sample_into_a_folder_that_refuses_writes_fails_before_sampling(tmp_path, monkeypatch):
    """Permission bits do not stop root (these tests may run as root), so the refusal is simulated where sample.py
    probes the folder with a real write."""
    def refuse(*args, **kwargs):
        raise PermissionError(13, 'Permission denied')
    monkeypatch.setattr(pretrained.tempfile, 'TemporaryFile', refuse)
    with pytest.raises(ValueError) as error:
        sample.main(['--device', 'cpu', '--class_id', '0', '--out', str(tmp_path / 'x.png')])
    message = str(error.value)
    assert '\n' not in message and '--out' in message and 'cannot write into' in message and 'Permission denied' in message
    assert not (tmp_path / 'x.png').exists()


def test_sample_per_image_names_stay_apart(t2i_run, tmp_path):
    texts = [CAPTION + ' with a long tail ' + 'x' * 60 + ' one', CAPTION + ' with a long tail ' + 'x' * 60 + ' two']
    sample.main(['--ckpt', t2i_run, '--text', texts[0], '--text', texts[1], '--n', '2', '--out', str(tmp_path / 'g.png'),
                 '--per_image', str(tmp_path / 'each'), '--device', 'cpu'])
    assert len(os.listdir(tmp_path / 'each')) == 4


def test_released_weights_missing_fail_before_any_model_is_built(monkeypatch, tmp_path):
    built = []
    monkeypatch.setattr(pretrained, 'released_var', lambda depth: built.append(depth))
    monkeypatch.setattr(pretrained, 'released_file', lambda name, cache_dir: (_ for _ in ()).throw(
        ConnectionError(f'{name} is not in {cache_dir}')))
    with pytest.raises(ConnectionError, match='vae_ch160v4096z32.pth'):
        pretrained.load_released(30, str(tmp_path))
    assert built == []


# -----------------------------------------------------------------------------
# 7. a non-finite loss stops the run and keeps the last good checkpoint

NAN_WRAPPER = '''
import os, shutil, sys
sys.path.insert(0, {root!r})
import torch
import torch.nn.functional as F
import train

nan_from = int(os.environ['NAN_FROM_CALL'])
calls = [0]
real_cross_entropy, real_atomic_save = F.cross_entropy, train.atomic_save


def cross_entropy(*args, **kwargs):  # the training loss: finite for the first calls, then NaN
    calls[0] += 1
    loss = real_cross_entropy(*args, **kwargs)
    return loss * float('nan') if calls[0] >= nan_from else loss


def atomic_save(obj, path):  # keep a copy of every checkpoint as it was written
    real_atomic_save(obj, path)
    shutil.copyfile(path, f"{{path}}.saved_at_step{{obj['step']}}")


F.cross_entropy, train.atomic_save = cross_entropy, atomic_save
train.main(sys.argv[1:])
'''


@pytest.fixture(scope='module')
def nan_run(tiny_backbone, tmp_path_factory):
    """Checkpoints every 2 steps; the 4th step's loss is NaN: it stops after step 3, the checkpoint is step 2's."""
    tmp = tmp_path_factory.mktemp('nan')
    out_dir = tmp / 'run'
    result, argv = run_with_nan(tiny_backbone, tmp, out_dir, 4, '--max_steps', 6, '--ckpt_every', 2, '--log_every', 1)
    return dict(result=result, out_dir=out_dir, argv=argv)


def run_with_nan(backbone, tmp, out_dir, nan_from: int, *flags):
    """train.py through NAN_WRAPPER: the nan_from-th training loss and every one after it are NaN."""
    wrapper = tmp / 'nan_wrapper.py'
    wrapper.write_text(NAN_WRAPPER.format(root=ROOT))
    argv = train_argv(backbone, out_dir, *NO_SEMANTIC, *flags, '--sample_every', 0)
    return run_cli([wrapper, *argv], env=dict(NAN_FROM_CALL=str(nan_from))), argv


def test_nan_loss_stops_and_keeps_the_checkpoint(nan_run):
    result, out_dir = nan_run['result'], nan_run['out_dir']
    assert result.returncode == 1, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr
    assert 'nan' in result.stderr and str(out_dir) in result.stderr  # says why, and where the good checkpoint is
    assert sorted(os.listdir(out_dir)) == ['.run.lock', 'ckpt.pt', 'ckpt.pt.saved_at_step2', 'config.json', 'log.jsonl',
                                           'prompt.safetensors']
    assert (out_dir / 'ckpt.pt').read_bytes() == (out_dir / 'ckpt.pt.saved_at_step2').read_bytes()
    ckpt = load_ckpt(out_dir / 'ckpt.pt')
    assert ckpt['step'] == 2 and torch.isfinite(ckpt['parts']['prompt.tokens']).all()
    assert torch.equal(load_file(out_dir / 'prompt.safetensors')['prompt.tokens'], ckpt['parts']['prompt.tokens'])
    rows = read_log(out_dir)
    assert [r['step'] for r in rows] == [1, 2, 3] and all(np.isfinite(r['loss']) for r in rows)


def test_resume_after_a_stop_logs_every_step_once(nan_run, tmp_path):
    """Resuming from step 2 redoes step 3: the log must not end up with step 3 twice (nor the loss plot go back)."""
    out_dir = tmp_path / 'run'
    shutil.copytree(nan_run['out_dir'], out_dir)
    argv = nan_run['argv']
    argv[argv.index('--out_dir') + 1] = str(out_dir)
    train.main(argv + ['--resume', 'auto'])
    assert load_ckpt(out_dir / 'ckpt.pt')['step'] == 6
    assert [r['step'] for r in read_log(out_dir)] == [1, 2, 3, 4, 5, 6]


def test_sample_eval_npz_with_a_t2i_checkpoint_is_a_clear_error(t2i_run, tmp_path):
    # --class_id is refused for a text-to-image checkpoint; --eval_npz (class-conditional sampling) must be too
    with pytest.raises(ValueError, match='text-to-image'):
        sample.main(['--ckpt', os.path.join(t2i_run, 'ckpt.pt'), '--eval_npz', str(tmp_path / 'x.npz'),
                     '--per_class', '1', '--num_classes', '2', '--device', 'cpu'])
    assert not (tmp_path / 'x.npz').exists()


# -----------------------------------------------------------------------------
# 8. prompt folders: the trained tensors alone, shared as safetensors and loaded without pickle


def test_prompt_folder_round_trip(strong_prompt_run, tmp_path):
    """The folder train.py writes beside ckpt.pt samples the same images as ckpt.pt; export_prompt makes the same."""
    ckpt = load_ckpt(os.path.join(strong_prompt_run, 'ckpt.pt'))
    tensors = load_file(os.path.join(strong_prompt_run, 'prompt.safetensors'))
    assert set(tensors) == set(ckpt['parts']) and all(torch.equal(tensors[k], v) for k, v in ckpt['parts'].items())
    with open(os.path.join(strong_prompt_run, 'config.json')) as f:
        config = json.load(f)
    assert {k: config[k] for k in mvp.ARCHITECTURE_KEYS} == {k: ckpt['config'][k] for k in mvp.ARCHITECTURE_KEYS}
    assert config['clip_pretrained'] == ckpt['config']['clip_pretrained'] and 'out_dir' not in config

    mvp.export_prompt(os.path.join(strong_prompt_run, 'ckpt.pt'), str(tmp_path / 'exported'))
    assert sorted(os.listdir(tmp_path / 'exported')) == ['config.json', 'prompt.safetensors']
    for name in ('config.json', 'prompt.safetensors'):
        with open(os.path.join(strong_prompt_run, name), 'rb') as a, open(tmp_path / 'exported' / name, 'rb') as b:
            assert a.read() == b.read(), name

    common = ['--class_id', '0,2', '--n', '2', '--seed', '5', '--device', 'cpu']
    for name, ckpt_arg in (('pt', os.path.join(strong_prompt_run, 'ckpt.pt')), ('run', strong_prompt_run),
                           ('exported', tmp_path / 'exported')):
        sample.main(['--ckpt', str(ckpt_arg), *common, '--out', str(tmp_path / f'{name}.png')])
    np.testing.assert_array_equal(png(tmp_path / 'run.png'), png(tmp_path / 'pt.png'))
    np.testing.assert_array_equal(png(tmp_path / 'exported.png'), png(tmp_path / 'pt.png'))


def test_t2i_prompt_folder_samples_like_the_checkpoint(t2i_run, tmp_path):
    common = ['--text', CAPTION, '--n', '2', '--device', 'cpu']
    sample.main(['--ckpt', os.path.join(t2i_run, 'ckpt.pt'), *common, '--out', str(tmp_path / 'pt.png')])
    sample.main(['--ckpt', t2i_run, *common, '--out', str(tmp_path / 'folder.png')])
    np.testing.assert_array_equal(png(tmp_path / 'folder.png'), png(tmp_path / 'pt.png'))


def test_sample_by_hub_repo_id_from_the_hf_cache(strong_prompt_run, tmp_path):
    """--ckpt user/repo: the prompt folder's two files found in the Hugging Face cache, the Hub unreachable."""
    files = {}
    for name in ('config.json', 'prompt.safetensors'):
        with open(os.path.join(strong_prompt_run, name), 'rb') as f:
            files[name] = f.read()
    write_hf_cache(tmp_path / 'hf', 'someone/mvp-tiny', files)
    common = ['--class_id', '1', '--n', '2', '--device', 'cpu']
    result = run_cli(['sample.py', '--ckpt', 'someone/mvp-tiny', *common, '--out', tmp_path / 'hub.png'],
                     env=offline_hub_env(tmp_path / 'hf'))
    assert result.returncode == 0, result.stderr[-3000:]
    sample.main(['--ckpt', os.path.join(strong_prompt_run, 'ckpt.pt'), *common, '--out', str(tmp_path / 'pt.png')])
    np.testing.assert_array_equal(png(tmp_path / 'hub.png'), png(tmp_path / 'pt.png'))


def test_cli_error_hub_repo_offline_not_cached(tmp_path):
    result = run_cli(['sample.py', '--ckpt', 'someone/not-cached', '--class_id', 0, '--device', 'cpu',
                      '--out', tmp_path / 'x.png'], env=offline_hub_env(tmp_path / 'hf'))
    assert_one_line_error(result, 'someone/not-cached', 'config.json')


def test_cli_error_released_weights_offline_not_cached(tmp_path):
    result = run_cli(['sample.py', '--depth', 16, '--class_id', 0, '--device', 'cpu', '--out', tmp_path / 'x.png'],
                     env=offline_hub_env(tmp_path / 'hf'))
    assert_one_line_error(result, 'FoundationVision/var', 'vae_ch160v4096z32.pth', '--cache_dir')


class RunsCode:
    """What a malicious checkpoint could hold: unpickling it calls open() on a marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, 'w')


def test_checkpoint_holding_a_pickled_object_is_refused(strong_prompt_run, tmp_path):
    ckpt = load_ckpt(os.path.join(strong_prompt_run, 'ckpt.pt'))
    marker = tmp_path / 'code_ran'
    ckpt['extra'] = RunsCode(str(marker))
    path = tmp_path / 'evil.pt'
    torch.save(ckpt, path)
    with pytest.raises(ValueError, match=r'evil\.pt holds a pickled .*open.*not a tensor'):
        mvp.load_run(str(path))
    result = run_cli(['sample.py', '--ckpt', path, '--class_id', 0, '--device', 'cpu', '--out', tmp_path / 'x.png'])
    assert_one_line_error(result, 'evil.pt', 'not a tensor')
    assert not marker.exists() and not (tmp_path / 'x.png').exists()


@pytest.fixture
def prompt_copy(strong_prompt_run, tmp_path):
    """A copy of a class-to-image prompt folder whose config.json a test may edit: edit(key=value) -> the folder."""
    folder = tmp_path / 'prompt'
    folder.mkdir()
    for name in ('config.json', 'prompt.safetensors'):
        shutil.copy(os.path.join(strong_prompt_run, name), folder / name)

    def edit(**changes):
        config = json.loads((folder / 'config.json').read_text())
        (folder / 'config.json').write_text(json.dumps({**config, **changes}))
        return str(folder)
    return edit


def test_prompt_for_another_tau_is_one_line(prompt_copy):
    folder = prompt_copy(tau=8)
    with pytest.raises(ValueError) as info:
        mvp.load_run(folder)
    msg = str(info.value)
    assert msg.startswith(os.path.join(folder, 'prompt.safetensors')) and '--tau 8' in msg and '\n' not in msg, msg


def test_prompt_for_another_backbone_is_one_line(prompt_copy, tmp_path):
    """The backbone of config.json is not the one the tensors were trained on (another depth and width)."""
    kwargs = dict(vocab_size=32, z_channels=8, patch_nums=(1, 2, 3, 4))
    vae_kwargs = dict(kwargs, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1)
    var_kwargs = dict(kwargs, depth=3, width=32, num_heads=2, num_classes=10)
    other = str(tmp_path / 'other_backbone')
    save_backbone(other, VQVAE(**vae_kwargs), vae_kwargs, VAR(**var_kwargs), var_kwargs)
    with pytest.raises(ValueError) as info:
        mvp.load_run(prompt_copy(backbone=other))
    msg = str(info.value)
    assert 'prompt.safetensors' in msg and f'--backbone {other}' in msg and '(24, 64)' in msg and '(24, 32)' in msg, msg


def test_t2i_prompt_used_for_class_to_image_is_one_line(t2i_run, tmp_path):
    folder = tmp_path / 'prompt'
    shutil.copytree(t2i_run, folder, ignore=shutil.ignore_patterns('ckpt.pt', '*.jsonl', '*.png'))
    with pytest.raises(ValueError, match='text-to-image'):  # the folder as it is: its samples need --text
        sample.main(['--ckpt', str(folder), '--class_id', '0', '--device', 'cpu', '--out', str(tmp_path / 'x.png')])
    config = json.loads((folder / 'config.json').read_text())
    (folder / 'config.json').write_text(json.dumps({**config, 't2i': False}))
    with pytest.raises(ValueError) as info:  # a config that says class-to-image beside a text-to-image prompt
        mvp.load_run(str(folder))
    msg = str(info.value)
    assert msg.startswith(str(folder / 'prompt.safetensors')) and 'text-to-image run (--t2i)' in msg, msg


def test_folder_without_prompt_file_is_one_line(tmp_path):
    (tmp_path / 'config.json').write_text('{}')
    with pytest.raises(FileNotFoundError, match='prompt.safetensors'):
        mvp.load_run(str(tmp_path))


@pytest.mark.slow
def test_a_step_at_the_released_size(tmp_path):
    """The full-size path end to end, without a download: VAR-d16 and the released VQVAE in their released layout with
    random weights (--backbone released-random), ViT-B-16 CLIP with random weights, 256 px JPEGs through the folder
    DataLoader, MVP at tau 20 with CE + the caption loss (one image at a time: the 256 px default; the sentence level
    decodes through the same decoder, and both levels are tested at the tiny size), one step of batch 2, the
    checkpoint and the prompt folder written."""
    from tools import bench
    from safetensors.torch import load_file
    bench.synthetic_jpegs(str(tmp_path / 'data'), 4, 300, 280)
    result = run_cli(['train.py', '--backbone', 'released-random', '--depth', 16, '--data', tmp_path / 'data',
                      '--clip_pretrained', 'none', '--lambda_sen', 0, '--batch_size', 2, '--max_steps', 1,
                      '--log_every', 1, '--sample_every', 0, '--num_workers', 1, '--device', 'cpu',
                      '--out_dir', tmp_path / 'run'],
                     timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / 'run' / 'log.jsonl') as f:
        row = json.loads(f.readline())
    assert np.isfinite(row['loss']) and row['ce'] > 0 and row['cap'] > 0 and row['grad_cap'] > 0 and row['sen'] == 0
    with open(tmp_path / 'run' / 'config.json') as f:
        config = json.load(f)
    assert config['trainable_parameters'] == 143_360 and config['semantic_chunk'] is None
    assert load_file(str(tmp_path / 'run' / 'prompt.safetensors'))['prompt.tokens'].shape == (140, 1024)


def test_balance_normalize_trains_and_logs(tiny_backbone, tmp_path):
    out_dir = tmp_path / 'run'
    train.main(train_argv(tiny_backbone, out_dir, '--balance', 'normalize', '--semantic_ratio', 0.5, '--max_steps', 2,
                          '--log_every', 1, '--sample_every', 0))
    for r in read_log(out_dir):  # the update: CE's gradient plus each level's at half its norm (update.combine)
        assert r['grad_norm'] <= r['grad_ce'] * (1 + 2 * 0.5) + 1e-6 and r['grad_sen'] > 0


def test_loss_plot_marks_the_guessing_level_in_the_clip_losses_panels_alone(tmp_path):
    log = tmp_path / 'log.jsonl'
    log.write_text(''.join(json.dumps({'step': s, 'loss': 9 - s, 'ce': 5 - s / 2, 'sen': 5 - s / 4, 'cap': 4 - s / 4}) + '\n'
                           for s in range(1, 5)))
    runlog.plot_losses(str(log), str(tmp_path / 'with.png'), guess=np.log(16))
    runlog.plot_losses(str(log), str(tmp_path / 'without.png'))
    red = lambda png: [(np.asarray(Image.open(png).convert('RGB'))[:, 360 * p:360 * (p + 1)] == (200, 60, 60)).all(-1).sum()
                       for p in range(4)]  # red pixels per panel: loss, ce, sen, cap
    with_line = red(tmp_path / 'with.png')
    assert with_line[0] == with_line[1] == 0 and with_line[2] > 50 and with_line[3] > 50
    assert red(tmp_path / 'without.png') == [0, 0, 0, 0]
