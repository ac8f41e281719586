"""
The baselines MVP is compared with, kept apart from the method's files: the prefilled prompt of MVP's Table 4
(PrefilledPrompt; var.py prepends it, in its lines marked "baseline") and LoRA on VAR's attention, Table 3's;
mvp.build_run builds either for train.py and tools/bench.py. Full fine-tuning, Table 3's other baseline, needs no code of its own:
train.py unfreezes the VAR.

LoRA: every block's attn.mat_qkv and attn.proj get a trainable low-rank update: W -> W + (alpha / r) B A, with
A (r, in) initialised as nn.Linear's weight and B (out, r) at zero, so before the first step the model is
exactly the frozen VAR.

The trainable tensors live in one nn.ModuleList of LoRAPair (make_lora), the thing an optimizer, DDP and a
checkpoint see. attach_lora then replaces each target nn.Linear of the VAR by a LoRALinear that holds the
frozen base layer (as its submodule `base`) and a *reference* to its pair (not a submodule). So the VAR's
parameters stay exactly the frozen backbone's, and its state_dict holds only backbone tensors, under
`...attn.mat_qkv.base.weight` instead of `...attn.mat_qkv.weight`: load the backbone before attaching.

    pairs = make_lora(var, rank=8)    # nn.ModuleList: pairs[i].A, pairs[i].B, in target order
    attach_lora(var, pairs)           # var now computes with W + B A in every targeted layer
"""
import math
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ('mat_qkv', 'proj')  # of every block's attention


class PrefilledPrompt(nn.Module):
    """The baseline of MVP's Table 4: the same number of learnable tokens, prepended to the sequence instead."""

    def __init__(self, num_tokens: int, width: int):
        super().__init__()
        self.tokens = nn.Parameter(torch.empty(1, num_tokens, width))  # (1, P, C)
        nn.init.trunc_normal_(self.tokens, std=math.sqrt(1 / width / 3))  # VAR's embedding init

    def forward(self) -> torch.Tensor:  # (1, P, C)
        return self.tokens


class LoRAPair(nn.Module):
    """The trainable part of one adapted layer: A (r, in_features) and B (out_features, r)."""

    def __init__(self, in_features: int, out_features: int, rank: int, device=None):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.B = nn.Parameter(torch.zeros(out_features, rank, device=device))  # zero: starts as the base layer
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # as nn.Linear's weight (and the LoRA paper's A)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a LoRA pair: y = base(x) + scaling * B A x.

    Called as a module it adds the low-rank branch to the base output (two thin matmuls). Code that reads
    `.weight` itself gets the adapted weight W + scaling * B A instead: var.py's attention computes its fused
    qkv as F.linear(x, mat_qkv.weight, bias) and never calls mat_qkv's forward, so for mat_qkv this merged form
    is the one that takes effect.
    """

    def __init__(self, base: nn.Linear, pair: LoRAPair, scaling: float = 1.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.pair = (pair,)  # a tuple, so not a submodule: the pair belongs to (and is saved with) the trained parts
        self.scaling = scaling

    @property
    def lora_A(self) -> nn.Parameter:
        return self.pair[0].A

    @property
    def lora_B(self) -> nn.Parameter:
        return self.pair[0].B

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight + self.scaling * (self.lora_B @ self.lora_A)

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


def target_layers(var) -> List[tuple]:
    """(attention module, attribute name) of every adapted layer, in a fixed order: block by block, TARGETS order."""
    return [(block.attn, name) for block in var.blocks for name in TARGETS]


def make_lora(var, rank: int) -> nn.ModuleList:
    """One zero-update LoRAPair per target layer of the VAR, on its device."""
    if rank < 1:
        raise ValueError(f'the LoRA rank must be at least 1, got {rank}')
    pairs = []
    for attn, name in target_layers(var):
        layer = getattr(attn, name)
        pairs.append(LoRAPair(layer.in_features, layer.out_features, rank, layer.weight.device))
    return nn.ModuleList(pairs)


def attach_lora(var, pairs: nn.ModuleList, alpha: Optional[float] = None) -> List[LoRALinear]:
    """Replace every target nn.Linear of the VAR by a LoRALinear around it, using pairs[i] (in place); returns them.
    scaling = alpha / rank (alpha default: the rank, i.e. scaling 1)."""
    layers = target_layers(var)
    if len(pairs) != len(layers):
        raise ValueError(f'{len(pairs)} LoRA pairs for {len(layers)} target layers')
    wrappers = []
    for (attn, name), pair in zip(layers, pairs):
        base = getattr(attn, name)
        if not isinstance(base, nn.Linear):
            raise ValueError(f'{name} is a {type(base).__name__}, not an nn.Linear: is LoRA attached already?')
        rank = pair.A.shape[0]
        wrappers.append(LoRALinear(base, pair, (rank if alpha is None else alpha) / rank))
        setattr(attn, name, wrappers[-1])
    return wrappers
