"""
Where the model runs: every script's --device and --dtype, and the two ways the frozen weights are laid out and cast
for fast low-precision sampling without changing a value.
"""
from contextlib import contextmanager

import torch
import torch.nn as nn

DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}  # --dtype's values, less 'auto'


def auto_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (fp16 where bf16 is missing); on the CPU bf16 where oneDNN has bf16 matrix kernels (AVX512-BF16 or
    AMX), else fp32, since without them bf16 is emulated and slower than fp32 (docs/benchmarks.md)."""
    if device.type == 'cuda':
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    fast_bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.bfloat16 if fast_bf16 else torch.float32


def parse_device(name: str) -> torch.device:
    """Every script's --device: auto (CUDA where there is one, else the CPU), cpu, cuda, cuda:1, ...; a one-line
    ValueError for a name torch does not know, or for CUDA on a machine without it."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f'--device {name} is not a device (auto, cpu, cuda, cuda:1, ...)') from None
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'--device {name} but CUDA is not available')
    return device


def set_conv_layout(vae, dtype: torch.dtype):
    """The VQVAE's convolution weights in channels_last (NHWC) memory for bf16/fp16 sampling, where oneDNN's and
    cuDNN's fast convolution kernels want it (tools.bench sampling measures the gain), and in the default layout for
    fp32, whose results match the official code bit for bit. The values stay the same."""
    vae.to(memory_format=torch.channels_last if dtype != torch.float32 else torch.contiguous_format)


@contextmanager
def cast_once(*modules: nn.Module):
    """Inside one autocast region, each fp32 weight is cast to bf16/fp16 once instead of at every use: autocast caches
    the cast only for leaf tensors that require grad, so the frozen weights are marked so for the duration (under
    no_grad nothing records a graph). Without it, sampling re-casts every linear layer's weight at each scale, a large
    share of its time (tools.bench sampling). The values computed are the same."""
    frozen = [p for m in modules for p in m.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)
