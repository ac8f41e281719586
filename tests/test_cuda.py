"""The CUDA path on the tiny models of conftest.py: skipped without a GPU, run by `python -m tools.bench device` on one.
What the CPU tests cannot show: the same function on the GPU, a bf16 training step there, and sampling there."""

import pytest
import torch

from clip_loss import SemanticLoss
from frame_prompt import FramePrompt
from mvp import MVP, TunedParts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (tools.bench device runs these on a GPU)')
CUDA = torch.device('cuda')


def test_teacher_forced_logits_on_cuda_match_the_cpu(tiny_vae, tiny_var):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    labels = torch.tensor([0, 1, 2, 3])
    logits = []
    for device in ('cpu', CUDA):
        vae, var = tiny_vae.to(device), tiny_var.to(device)
        with torch.no_grad():
            x = vae.quantize.teacher_forcing_input(vae.img_to_idx(images.to(device)))
            logits.append(var(var.class_emb(labels.to(device)), x).cpu())
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


def test_a_bf16_step_on_cuda_trains_the_prompt_and_chunking_keeps_its_gradient(tiny_vae, tiny_var, tiny_clip):
    vae, var, clip = tiny_vae.to(CUDA), tiny_var.to(CUDA), tiny_clip.to(CUDA)
    parts = TunedParts(FramePrompt(var.patch_nums, var.width, 20)).to(CUDA)
    images = torch.rand(4, 3, 16, 16, device=CUDA) * 2 - 1
    sentences, captions = ['a photo of a circle', 'a photo of a star'] * 2, ['a red circle', 'a blue star', 'a circle', 'a star']
    grads = []
    for chunk in (0, 1):
        parts.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        model = MVP(vae, var, parts, None, SemanticLoss(clip, vae, chunk=chunk), first_scale_fixed=True,
                    dtype=torch.bfloat16)
        _, losses = model(model.tokenise(images), torch.tensor([0, 1, 0, 1], device=CUDA), sentences, captions)
        loss = sum(model.objective(losses).values())
        assert torch.isfinite(loss)
        loss.backward()
        grads.append(parts.prompt.tokens.grad.float().clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-2, atol=1e-3 * grads[0].abs().max().item())


def test_sampling_on_cuda_is_seeded_and_valid(tiny_vae, tiny_var):
    vae, var = tiny_vae.to(CUDA), tiny_var.to(CUDA)
    cond = var.class_emb(torch.tensor([0, 1, 2], device=CUDA))
    runs = [var.generate(vae, cond, cfg=1.5, top_k=10, top_p=0.9, seed=3) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b) and a.min() >= 0 and a.max() < var.vocab_size
    images = vae.idx_to_img(runs[0])
    assert images.shape == (3, 3, 16, 16) and torch.isfinite(images).all()
