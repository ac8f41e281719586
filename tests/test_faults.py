"""Faults and bad input, round 2: two runs on one folder, a write that fails (a full disk), sampling settings no
sampler can use, and a log sent to a file; each ends in one clear line or in a run that goes on."""
import errno
import hashlib
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_train_sample import (NO_SEMANTIC, SUBPROCESS_ENV, assert_one_line_error, read_log, run_cli,
                               train_argv)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pretrained  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402


def sha(path) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_a_second_run_on_a_live_folder_is_refused_and_a_dead_runs_folder_is_taken_over(tiny_backbone, tmp_path):
    out = tmp_path / 'run'
    first = subprocess.Popen([sys.executable, 'train.py', *train_argv(tiny_backbone, out, *NO_SEMANTIC, '--max_steps',
                              100000, '--log_every', 1, '--sample_every', 0)], cwd=ROOT, env=SUBPROCESS_ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / 'log.jsonl').is_file() or not read_log(out):  # the first run is training
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.2)
        second = run_cli(['train.py', *train_argv(tiny_backbone, out, *NO_SEMANTIC, '--max_steps', 3, '--seed', 1)])
        assert_one_line_error(second, str(out), f'pid {first.pid}', 'in use by a live run')
        assert first.poll() is None  # the first goes on, alone
    finally:
        first.send_signal(signal.SIGKILL)  # dies without a word: its lock goes with it
        first.wait()
    third = run_cli(['train.py', *train_argv(tiny_backbone, out, *NO_SEMANTIC, '--max_steps', 2, '--resume', 'auto',
                                             '--sample_every', 0)])
    assert third.returncode == 0, third.stderr[-2000:]


def test_a_failed_checkpoint_write_is_one_line_and_keeps_the_last_checkpoint(tiny_backbone, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) below a checkpoint's size fails the save as a full disk does, mid-write."""
    out = tmp_path / 'run'
    argv = train_argv(tiny_backbone, out, *NO_SEMANTIC, '--max_steps', 2, '--ckpt_every', 2, '--sample_every', 0)
    train.main(argv)
    ckpt = out / 'ckpt.pt'
    size, before = os.path.getsize(ckpt), sha(ckpt)

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    argv = train_argv(tiny_backbone, out, *NO_SEMANTIC, '--max_steps', 4, '--ckpt_every', 2, '--sample_every', 0,
                      '--resume', 'auto')
    result = subprocess.run([sys.executable, 'train.py', *argv], cwd=ROOT, env=SUBPROCESS_ENV, capture_output=True,
                            text=True, timeout=180, preexec_fn=limit_file_size)
    assert_one_line_error(result, f'cannot write {ckpt}')
    assert sha(ckpt) == before and torch.load(ckpt, weights_only=True)['step'] == 2  # the last good one, whole
    assert not [name for name in os.listdir(out) if '.part' in name]


@pytest.mark.parametrize('failure', [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
                                     RuntimeError('[enforce fail at inline_container.cc:671] . unexpected pos 64 vs 12')])
def test_atomic_write_failure_names_the_file_and_leaves_nothing_behind(tmp_path, failure):
    path = tmp_path / 'samples.npz'
    path.write_bytes(b'the previous file')

    def write(tmp):
        with open(tmp, 'wb') as f:
            f.write(b'half a fi')
        raise failure

    with pytest.raises(pretrained.WriteError) as error:
        pretrained.atomic_write(str(path), write)
    message = str(error.value)
    assert '\n' not in message and message.startswith(f'cannot write {path}: ')
    assert ('No space left on device' in message) if isinstance(failure, OSError) else ('MB free there' in message)
    assert path.read_bytes() == b'the previous file' and os.listdir(tmp_path) == ['samples.npz']


@pytest.mark.parametrize('flag, value', [('--cfg', 'nan'), ('--cfg', 'inf'), ('--cfg', '-1'), ('--top_k', '-1'),
                                         ('--top_p', '2'), ('--top_p', '0'), ('--top_p', '-0.5')])
def test_unusable_sampling_settings_are_one_line_before_any_work(flag, value):
    with pytest.raises(ValueError) as error:
        sample.check_args(sample.get_args(['--class_id', '0', flag, value]))
    message = str(error.value)
    assert '\n' not in message and message.startswith(flag), message


def test_sample_cfg_nan_on_the_command_line(tmp_path):
    result = run_cli(['sample.py', '--backbone', 'checkpoints/shapes', '--class_id', '0', '--cfg', 'nan',
                      '--out', tmp_path / 'x.png'])
    assert_one_line_error(result, '--cfg', 'nan')
    assert not os.listdir(tmp_path)


def test_a_log_sent_to_a_file_gets_one_plain_line_per_logged_step(tiny_backbone, tmp_path):
    result = run_cli(['train.py', *train_argv(tiny_backbone, tmp_path / 'run', *NO_SEMANTIC, '--max_steps', 4,
                                              '--log_every', 2, '--sample_every', 0)])
    assert result.returncode == 0, result.stderr[-2000:]
    assert '\r' not in result.stdout + result.stderr and 'it/s' not in result.stderr  # no progress-bar frames
    steps = [line for line in result.stdout.splitlines() if line.startswith('step ')]
    assert [line.split(':')[0] for line in steps] == ['step 2/4', 'step 4/4'] and 'ce ' in steps[0]
