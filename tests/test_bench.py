"""tools/bench.py's training and scaling benchmarks at a minimal size: the tables have the expected rows (never timings).

    python -m pytest -q tests/test_bench.py
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tools import bench  # noqa: E402
from baselines import attach_lora, make_lora  # noqa: E402

TINY = ['--batch', '2', '--repeats', '1', '--warmup', '1']
# label -> (trainable parameters, sequence length in attention); width 128, 80 MVP tokens at tau 20, L = 155
EXPECTED = {
    'frozen VAR, no prompt (grad to x_BLCv)': ('0', '155'),
    'MVP frame prompt, CE': ('10,240', '155'),
    'MVP frame prompt, CE + semantic': ('10,240', '155'),
    'MVP frame prompt, CE + semantic, one pass (no recompute)': ('10,240', '155'),
    'MVP frame prompt, CE + semantic at 0.1 on the free-running rollout': ('10,240', '155'),
    'prefilled prompt, CE': ('10,240', '235'),
    'LoRA r8 on attn qkv + proj, CE': ('24,576', '155'),  # 4 blocks x 8 x (128 + 384 + 128 + 128)
    'full fine-tuning, CE': ('1,277,328', '155'),
}


def table_rows(text):
    """The rows of a printed table as {first cell: other cells}: the lines after the dashed rule, up to the notes."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if re.fullmatch(r'[- ]+', line) and '--' in line) + 1
    rows = {}
    for line in lines[start:]:
        cells = re.split(r'\s{2,}', line.strip())
        if len(cells) < 3:
            break
        rows[cells[0]] = cells[1:]
    return rows


def run_main(monkeypatch, capsys, argv):
    monkeypatch.setattr(sys, 'argv', ['tools/bench.py'] + argv)
    threads = torch.get_num_threads()
    try:
        bench.main()
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out


def test_training_table_rows(monkeypatch, capsys, tmp_path):
    out_md = tmp_path / 'bench.md'
    text = run_main(monkeypatch, capsys, ['training', '--in_process', *TINY, '--out', str(out_md)])
    rows = table_rows(text)
    assert list(rows) == list(EXPECTED)
    for label, (params, seq) in EXPECTED.items():
        trainable, percent, step_ms, memory, seq_len = rows[label]
        assert (trainable, seq_len) == (params, seq), label
        assert abs(float(percent) - 100 * int(params.replace(',', '')) / 1_277_328) < 1e-3
        assert float(step_ms) > 0 and memory == 'n/a'
    assert 'x_BLCv' in text and 'Peak memory: n/a' in text
    md = out_md.read_text()
    assert '### training' in md and '| variant | trainable params |' in md and 'Peak memory' in md
    assert sum(line.startswith('| ') for line in md.splitlines()) == 2 + len(EXPECTED)  # header, rule, rows


def test_training_fresh_process_measures_memory():
    """The default path: the variant runs in a worker process of its own, which reports its peak RSS growth."""
    proc = subprocess.run([sys.executable, '-m', 'tools.bench', 'training', '--variants', 'mvp', *TINY],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert list(rows) == ['MVP frame prompt, CE']
    trainable, _, step_ms, memory, seq_len = rows['MVP frame prompt, CE']
    assert trainable == '10,240' and seq_len == '155' and float(step_ms) > 0
    assert float(memory) > 0  # a training step holds activations beyond the built models
    assert 'Peak memory: peak RSS growth' in proc.stdout


def test_lora_wrapper_reaches_both_layers():
    """B = 0: exactly the base model; B != 0: the output moves, and every A and B gets a gradient (mat_qkv is read
    through .weight by var.py, proj through its forward: both paths must carry the low-rank term)."""
    vae, var = bench.tiny_backbone(torch.device('cpu'), ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1)
    cond = var.class_emb(torch.arange(2))
    x = torch.randn(2, var.L - 1, var.Cvae)
    with torch.no_grad():
        before = var(cond, x)
    wrappers = attach_lora(var, make_lora(var, rank=4))
    assert len(wrappers) == 2 * var.depth
    with torch.no_grad():
        assert torch.equal(var(cond, x), before)
        for w in wrappers:
            w.lora_B.normal_(std=0.1)
    for i, w in enumerate(wrappers):  # each wrapper on its own changes the output
        saved = [v.lora_B.detach().clone() for v in wrappers]
        with torch.no_grad():
            for j, v in enumerate(wrappers):
                if j != i:
                    v.lora_B.zero_()
            assert not torch.allclose(var(cond, x), before, atol=1e-6), f'LoRA on block {i // 2} has no effect'
            for v, b in zip(wrappers, saved):
                v.lora_B.copy_(b)
    var(cond, x).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for w in wrappers for p in (w.lora_A, w.lora_B))
    assert all(p.grad is None for p in var.parameters() if not p.requires_grad)


def test_scaling_table_rows(monkeypatch, capsys):
    monkeypatch.setattr(bench, 'SCALING_PREFIXES', ((1, 2), (1, 2, 3, 4)))
    rows = table_rows(run_main(monkeypatch, capsys, ['scaling', '--batch', '2', '--repeats', '1']))
    assert list(rows) == ['1,2', '1,2,3,4']
    assert rows['1,2'][:3] == ['2', '2', '5'] and rows['1,2,3,4'][:3] == ['4', '4', '30']  # K, n, L
    assert rows['1,2'][4:6] == ['1.00', '1.0'] and rows['1,2,3,4'][5] == '16.0'  # time and n^4 x row 1


def test_largest_batch_finds_the_edge():
    for edge in (0, 1, 2, 3, 5, 64, 100, 1000):
        tried = []

        def fits(b):
            tried.append(b)
            return b <= edge
        assert bench.largest_batch(fits, limit=512) == min(edge, 512), edge
        assert len(tried) <= 2 * 10 + 2  # doubling then bisection: logarithmic in the limit
    assert bench.largest_batch(lambda b: True, limit=48) == 48


def test_semantic_breakdown_is_the_steps_gradient():
    """The breakdown cuts the graph at the logits and the images and passes the gradients on by hand: the prompt must
    get exactly the gradient of the uncut step (train.py's MVP forward)."""
    import contextlib
    from clip_loss import SemanticLoss
    from frame_prompt import FramePrompt
    from mvp import MVP, TunedParts
    device = torch.device('cpu')
    vae, var = bench.tiny_backbone(device, ch=16, ch_mult=(1, 2, 2, 4), num_res_blocks=1)
    args = type('Args', (), {'name': 'training'})()
    semantic = SemanticLoss(bench.random_clip(args, device), vae)
    parts = TunedParts(FramePrompt(var.patch_nums, var.width, 20))
    with torch.no_grad():
        parts.prompt.tokens.normal_(0, 0.02)
    batch = bench.synthetic_batch(vae, var, 2, 0, device)
    grads = []
    for cut in (False, True):
        parts.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the condition dropout draws from the global generator
        if cut:
            stages = bench.semantic_breakdown(vae, var, var, parts, semantic, batch, contextlib.nullcontext(), lambda: None)
        else:
            images, labels, (sentences, captions, _) = batch
            model = MVP(vae, var, parts, None, semantic, first_scale_fixed=True)
            _, losses = model(model.tokenise(images), labels, sentences, captions)
            sum(model.objective(losses).values()).backward()
        grads.append(parts.prompt.tokens.grad.clone())
    assert len(stages) == 7 and all(t >= 0 for t in stages.values())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8)


def test_dataloader_table(monkeypatch, capsys):
    rows = table_rows(run_main(monkeypatch, capsys, ['dataloader', '--images', '16', '--source_size', '64x48',
                                                     '--size', '32', '--batch', '4', '--workers', '0,1',
                                                     '--step_s', '0.5']))
    assert list(rows) == ['0', '1']
    for rate, steps_per_s, keeps_up in rows.values():
        assert float(rate) > 0 and abs(float(steps_per_s) - float(rate) / 4) < 0.05  # both printed rounded
        assert keeps_up == ('yes' if float(rate) >= 8 else 'no')


def test_sampling_table_kv_on(monkeypatch, capsys):
    rows = table_rows(run_main(monkeypatch, capsys, ['sampling', '--batch', '2', '--repeats', '1', '--kv', 'on',
                                                     '--dtype', 'fp32']))
    assert list(rows)[:7] == [f'scale {i + 1} ({pn}x{pn})' for i, pn in enumerate(bench.TINY_PATCH_NUMS)]
    assert float(rows['throughput'][1]) > 0 and float(rows['total'][1]) > 0


def test_device_check_dry_run_writes_every_part(tmp_path):
    """tools.bench device at tiny sizes on the CPU: the parts, files and checks a GPU run makes, so it cannot rot."""
    out = tmp_path / 'device'
    result = subprocess.run([sys.executable, '-m', 'tools.bench', 'device', '--dry_run', '--out_dir', str(out)], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1'))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert sorted(os.listdir(out)) == ['cpu__dry_run.json', 'cpu__dry_run.md']  # the parts' work files are gone
    with open(out / 'cpu__dry_run.json') as f:
        report = json.load(f)
    parts = report['parts']
    assert list(parts) == list(bench.DEVICE_PARTS)
    for name in ('cuda_tests', 'max_batch_d16', 'semantic_chunk', 'compile'):
        assert parts[name]['status'] == 'skipped' and parts[name]['note'].startswith('dry run')
    train = parts['train_d16']
    assert train['status'] == 'done' and train['losses_finite'] and train['resume_exact'] and train['steps'] == 2
    assert {'sen', 'cap', 'grad_sen', 'grad_cap'} <= set(train['last_row'])  # CE + both semantic losses
    for name in ('steps_d16', 'steps_d30'):
        rows = parts[name]['result']['rows']
        assert parts[name]['status'] == 'done' and len(rows) == 2
        assert all(float(r['images/s']) > 0 and r['MFU (bf16 peak)'] == 'n/a' for r in rows)  # no peak known for a CPU
    assert parts['sampling_d16']['status'] == 'done'
    page = (out / 'cpu__dry_run.md').read_text()
    assert '| train_d16 | done |' in page and '## steps_d30' in page


def test_device_check_refuses_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench, 'missing_packages', lambda: ['open_clip', 'pytest'])
    with pytest.raises(SystemExit, match='lacks open_clip, pytest: bring them as wheels'):
        run_main(monkeypatch, capsys, ['device', '--out_dir', str(tmp_path)])
    monkeypatch.setattr(bench, 'missing_packages', lambda: [])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match='no CUDA device here'):
            run_main(monkeypatch, capsys, ['device', '--out_dir', str(tmp_path)])
    with pytest.raises(SystemExit, match='unknown --parts'):
        run_main(monkeypatch, capsys, ['device', '--dry_run', '--parts', 'warp_drive', '--out_dir', str(tmp_path)])
    assert not os.listdir(tmp_path)


def test_mfu_counts_the_vars_matrix_work():
    raw = {'step': 0.5, 'trainable': 10, 'var_params': 1000, 'L': 680}
    assert bench.mfu(raw, 16, 'NVIDIA H100 80GB HBM3') == pytest.approx(4 * 1000 * 680 * 16 / 0.5 / 989e12)
    assert bench.mfu({**raw, 'trainable': 1000}, 16, 'NVIDIA H100') == pytest.approx(6 * 1000 * 680 * 16 / 0.5 / 989e12)
    assert bench.mfu(raw, 16, 'cpu (dry run)') is None


def test_calibration_times_the_models_calibration_md_names(monkeypatch, capsys):
    """shared/calibration.md's figures are only comparable if this is its model: the same parameter counts."""
    out = run_main(monkeypatch, capsys, ['calibration', '--sizes', '4x128x1,6x192x1', '--repeats', '1', '--threads', '1'])
    rows = table_rows(out)
    assert rows['depth 4, width 128'][:2] == ['1.37M', '1']
    assert rows['depth 6, width 192'][:2] == ['4.30M', '1']
    assert float(rows['depth 4, width 128'][2]) > 0
