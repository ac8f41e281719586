"""
The processes of one training run: one, or several under torchrun (DDP: torchrun sets RANK, WORLD_SIZE and
LOCAL_RANK). Whatever the processes must agree on goes through here (devices, averaged gradients, RNG states, the
folder's lock, and the stop: Ctrl-C or a loss that is not finite ends every process at the same step), so train.py's
loop reads the same for one process as for eight.
"""
import os
import random
import signal
import sys
from contextlib import contextmanager
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist

from pretrained import lock_folder


class Process(NamedTuple):
    ddp: bool
    rank: int
    world: int
    device: torch.device

    @property
    def master(self) -> bool:  # the process that logs and writes files
        return self.rank == 0


def setup_process(device_flag: str, seed: int) -> Process:
    """Join the process group (under torchrun), pick this process's device, seed its generators."""
    ddp = 'RANK' in os.environ
    if ddp:
        dist.init_process_group(backend='nccl' if torch.cuda.is_available() and device_flag != 'cpu' else 'gloo')
        rank, world, local_rank = dist.get_rank(), dist.get_world_size(), int(os.environ.get('LOCAL_RANK', 0))
    else:
        rank, world, local_rank = 0, 1, 0
    if device_flag == 'auto':
        device = torch.device(f'cuda:{local_rank}' if torch.cuda.is_available() else 'cpu')
    else:
        device = torch.device(f'cuda:{local_rank}' if ddp and device_flag == 'cuda' else device_flag)
    if device.type == 'cuda':
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    for seed_fn in (torch.manual_seed, np.random.seed, random.seed):
        seed_fn(seed + rank)
    return Process(ddp, rank, world, device)


def reduce_mean(grads: list) -> list:
    """A gradient list averaged over the processes (what DDP's own backward does for a plain backward)."""
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    return [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)]


def all_true(proc: Process, flags: list) -> list:
    """Each flag true on every process (each process's own flags in, the same answer out on all of them)."""
    flags_F = torch.tensor([float(f) for f in flags], device=proc.device)
    if proc.ddp:
        dist.all_reduce(flags_F, op=dist.ReduceOp.MIN)
    return [bool(f) for f in flags_F.tolist()]


def rng_states(proc: Process) -> dict:
    """Every process's torch (and CUDA) generator state, so a resumed run continues each process's own stream."""
    mine = (torch.get_rng_state(), torch.cuda.get_rng_state(proc.device) if proc.device.type == 'cuda' else None)
    states = [mine]
    if proc.ddp:
        states = [None] * proc.world
        dist.all_gather_object(states, mine)
    return {'torch': [s[0] for s in states], 'cuda': [s[1] for s in states] if mine[1] is not None else []}


def set_rng_states(proc: Process, rng: dict, source: str):
    if len(rng['torch']) != proc.world:
        raise ValueError(f'{source} was written by {len(rng["torch"])} processes, not {proc.world}: '
                         f'resume with the same number of processes')
    torch.set_rng_state(rng['torch'][proc.rank])
    if proc.device.type == 'cuda' and rng.get('cuda'):
        torch.cuda.set_rng_state(rng['cuda'][proc.rank], proc.device)


def claim_out_dir(out_dir: str, proc: Process):
    """The first process locks OUT_DIR for the run (pretrained.lock_folder); every process stops with its one line if
    another live run holds it, so the DDP ranks of one run are one run and never wait on each other."""
    lock, refusal = None, None
    if proc.master:
        try:
            lock = lock_folder(out_dir)
        except (ValueError, OSError) as e:  # OSError: a file system without locks; every rank must hear of it
            refusal = str(e)
    if proc.ddp:
        shared = [refusal]
        dist.broadcast_object_list(shared, src=0)
        refusal = shared[0]
    if refusal:
        raise ValueError(refusal)
    return lock


def end_process(proc: Process, exit_code: Optional[int] = None):
    if proc.ddp:
        if exit_code is None:  # a normal end: no rank tears the group down while rank 0 still writes (after an
            dist.barrier()  # error or Ctrl-C the others may never arrive, so no wait there)
        dist.destroy_process_group()
    if exit_code is not None:
        sys.exit(exit_code)


# -----------------------------------------------------------------------------
# the stop: Ctrl-C and a loss that is not finite end every process at the same step


@contextmanager
def stop_on_interrupt():
    """Within it, Ctrl-C (SIGINT) only appends to the list it yields, for the training loop to stop cleanly at a step."""
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def watch_loss(watch_2: torch.Tensor, loss: torch.Tensor, step: int):
    """Record on the device, without a host sync, the first step whose loss is not finite and that loss:
    watch_2 = (step or -1, loss). check_stop reads it back only where the loop must sync anyway."""
    loss = loss.detach().float()
    new_bad = (watch_2[0] < 0) & ~torch.isfinite(loss)
    watch_2[0] = torch.where(new_bad, float(step + 1), watch_2[0])  # a Python scalar: no host-to-device copy
    watch_2[1] = torch.where(new_bad, loss, watch_2[1])


def check_stop(watch_2, interrupted: list, step: int, out_dir: str, proc: Process, save: Callable, bar):
    """Before a step's update: Ctrl-C saves the state after the last step and exits; a NaN or inf loss at this or any
    step since the last check exits and leaves the last checkpoint as it was (the loop checks before every update
    that is logged or checkpointed, so no bad step is ever saved). Every process stops at the same step, or none does."""
    finite, going = all_true(proc, [watch_2[0] < 0, not interrupted])
    if finite and going:
        return
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if finite:  # interrupted: this batch is not trained on
        save(ckpt_path, step)
    bar.close()
    if proc.master and finite:
        print(f'\ninterrupted at step {step}: saved {ckpt_path}; continue with the same command and --resume auto',
              file=sys.stderr)
    elif proc.master:
        kept = f'the last good checkpoint {ckpt_path} is untouched' if os.path.isfile(ckpt_path) else 'no checkpoint was written'
        bad_step, bad_loss = watch_2.tolist()
        where = f'the loss is {bad_loss} at step {int(bad_step)}' if bad_step > 0 else 'another process\'s loss is not finite'
        print(f'\nerror: {where}; stopping ({kept})', file=sys.stderr)
    end_process(proc, 1 if not finite else 130)
