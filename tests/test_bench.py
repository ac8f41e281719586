"""bench.py's training and scaling benchmarks at a minimal size: the tables have the expected rows (never timings).

    python -m pytest -q tests/test_bench.py
"""
import os
import re
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import bench  # noqa: E402

TINY = ['--batch', '2', '--repeats', '1', '--warmup', '1']
# label -> (trainable parameters, sequence length in attention); width 128, 80 MVP tokens at tau 20, L = 155
EXPECTED = {
    'frozen VAR, no prompt (grad to x_BLCv)': ('0', '155'),
    'MVP frame prompt, CE': ('10,240', '155'),
    'MVP frame prompt, CE + semantic': ('10,240', '155'),
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
    monkeypatch.setattr(sys, 'argv', ['bench.py'] + argv)
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
        trainable, step_ms, memory, seq_len = rows[label]
        assert (trainable, seq_len) == (params, seq), label
        assert float(step_ms) > 0 and memory == 'n/a'
    assert 'x_BLCv' in text and 'Peak memory: n/a' in text
    md = out_md.read_text()
    assert '### training' in md and '| variant | trainable params |' in md and 'Peak memory' in md
    assert sum(line.startswith('| ') for line in md.splitlines()) == 2 + len(EXPECTED)  # header, rule, rows


def test_training_fresh_process_measures_memory():
    """The default path: the variant runs in a worker process of its own, which reports its peak RSS growth."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'bench.py'), 'training', '--variants', 'mvp', *TINY],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rows = table_rows(proc.stdout)
    assert list(rows) == ['MVP frame prompt, CE']
    trainable, step_ms, memory, seq_len = rows['MVP frame prompt, CE']
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
    wrappers = bench.add_lora(var, rank=4)
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
