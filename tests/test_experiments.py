"""world.experiments end to end on the tiny backbone: 1 seed, 2 steps, tiny evaluations, Tables 1 and 4 (the real
train.py / world.evaluate subprocesses; ~20 s); the report's structure, the grid's resumability, the dry run."""
import json
import os
import re
import shutil

from world import experiments

TINY = ['--seeds', '0', '--steps', '2', '--batch_size', '4', '--shapes_n', '32', '--per_class', '2', '--n_texts', '4',
        '--jobs', '2']


def table_rows(report: str, heading: str):
    """{row label: cells} of the markdown table under a heading."""
    section = report.split(f'## {heading}', 1)[1].split('\n## ', 1)[0]
    lines = [line for line in section.splitlines() if line.startswith('| ')]
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    return header, {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip('|').split('|')] for line in lines[1:])}


def test_grid_end_to_end(tiny_backbone, tmp_path, capsys):
    out, report_path = str(tmp_path / 'runs'), str(tmp_path / 'docs' / 'experiments.md')
    argv = ['--backbone', tiny_backbone, '--tables', '1,4', *TINY, '--out', out, '--report', report_path]
    # --runs: only the settings named run now; the report still covers both tables
    assert experiments.main([*argv, '--runs', 'mvp']) == 0
    printed = capsys.readouterr().out
    assert '2 runs (2 settings x 1 seeds) for tables 1, 4, 1 of them chosen to run' in printed
    assert printed.count(': done (') == 1 and 'mvp seed 0: done' in printed
    report = open(report_path).read()
    assert '2 runs (settings x seeds): 1 run now, 0 found done by the same commands, 0 failed, 1 not run yet' in report
    _, runs = table_rows(report, 'All runs')
    assert runs['mvp'][1] == 'done' and runs['prefilled'][1] == 'not run'
    assert table_rows(report, 'Table 4')[1]['+ prefilled prompt (0 of 1 seeds)'][0] == '–'
    assert experiments.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count(': done (') == 1 and 'mvp seed 0: cached' in printed

    for name in ('mvp', 'prefilled'):
        folder = os.path.join(out, name, 'seed0')
        for f in ('ckpt.pt', 'train.log', 'log.jsonl', 'eval.log', 'eval.json', 'run.json'):
            assert os.path.isfile(os.path.join(folder, f)), (name, f)
        with open(os.path.join(folder, 'run.json')) as f:
            record = json.load(f)
        assert record['train_rc'] == record['eval_rc'] == 0
        assert record['trainable'] == 24 * 64  # tau 20 frames of the 2x2, 3x3, 4x4 scales; prefilled: as many tokens
        assert record['peak_mb'] > 100 and record['train_s'] > 0  # a whole torch process
        assert record['train_cmd'][record['train_cmd'].index('--max_steps') + 1] == '2'
        assert record['cpu'] == experiments.cpu_name() and record['cores'] == os.cpu_count() and record['load'] >= 0
        assert record['autocast'] in ('float32', 'bfloat16')  # train.py's --dtype auto on this CPU
        assert record['code'] == experiments.code_version() != ''  # which code made it

    report = open(report_path).read()
    assert report.startswith('# MVP\'s tables in miniature')
    assert f'python -m world.experiments {" ".join(argv)}' in report  # the exact command
    assert re.search(r'This invocation took [\d.]+ min', report)
    assert '## Summary: of 6 comparisons with the paper' in report
    # one seed decides nothing: no verdict either way
    assert 'of 6 comparisons with the paper, 0 agree and 0 disagree beyond noise; 0 lie within noise, 6 have one seed' \
        in report
    header, rows = table_rows(report, 'Table 1')
    assert header == ['', 'FD_judge ↓', 'class acc ↑', 'IS_judge ↑', 'FD_clip ↓', 'trainable params', 'train s']
    assert list(rows) == ['VAR (no tuning)', 'VAR + MVP']
    assert rows['VAR + MVP'][4] == '1,536' and rows['VAR (no tuning)'][4] == '–'
    assert re.fullmatch(r'[\d.]+ \[[\d.]+\]', rows['VAR + MVP'][0])  # one seed: no ± std; the evaluation's SE
    header, rows = table_rows(report, 'Table 4')
    assert header[-1] == 'peak RSS MB' and list(rows) == ['VAR (no tuning)', '+ prefilled prompt', '+ MVP']
    assert float(rows['+ MVP'][-1]) > 100
    assert '--prompt prefilled' in report and 'python -m world.evaluate --ckpt' in report  # the runs' commands
    assert 'Paper: ' in report and 'Table 3' not in report  # only the tables asked for
    _, runs = table_rows(report, 'All runs')
    assert list(runs) == ['mvp', 'prefilled'] and [cells[1] for cells in runs.values()] == ['cached', 'done']
    assert all(cells[-2] == 'A' and float(cells[-1]) >= 0 for cells in runs.values())
    assert f'A: {experiments.cpu_name()} ({os.cpu_count()} cores, autocast {record["autocast"]})' in report

    # resumable: the same command runs nothing again
    assert experiments.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count(': cached (') == 2 and '2 of those evaluated already: 0 commands to run' in printed
    # a run counts as done only for the same commands: other settings (here --steps) would train it again
    with open(os.path.join(out, 'mvp', 'seed0', 'run.json')) as f:
        record = json.load(f)
    assert experiments.commands(experiments.get_args(argv), 'mvp', 0)[0] == record['train_cmd']
    assert experiments.commands(experiments.get_args([*argv, '--steps', '3']), 'mvp', 0)[0] != record['train_cmd']
    # ... and with the same backbone files: a run made with another CLIP (say) counts as not done, and stays out of
    # the report's figures
    args = experiments.get_args(argv)
    assert record['backbone'] == args.fingerprint == experiments.backbone_fingerprint(tiny_backbone)
    assert experiments.is_cached(args, 'mvp', 0) and experiments.collect(args, 'mvp', 'after')[1] == [0]
    experiments.write_json(os.path.join(out, 'mvp', 'seed0', 'run.json'), {**record, 'backbone': 'another'})
    assert not experiments.is_cached(args, 'mvp', 0) and experiments.collect(args, 'mvp', 'after')[1] == []
    experiments.write_json(os.path.join(out, 'mvp', 'seed0', 'run.json'), record)

    # --records keeps each finished run's small records, from which a new machine (no run folders) resumes
    records = str(tmp_path / 'records')
    assert experiments.main([*argv, '--records', records]) == 0
    kept = sorted(os.listdir(os.path.join(records, 'mvp', 'seed0')))
    assert kept == ['config.json', 'eval.json', 'log.jsonl', 'run.json']  # the log: the losses and the gradient record
    shutil.rmtree(out)
    capsys.readouterr()
    assert experiments.main([*argv, '--records', records]) == 0
    assert capsys.readouterr().out.count(': cached (') == 2  # nothing trained again
    assert not os.path.exists(os.path.join(out, 'mvp', 'seed0', 'ckpt.pt'))
    report = open(report_path).read()
    assert f'kept in {records} by an earlier session' in report
    assert table_rows(report, 'Table 1')[1]['VAR + MVP'][4] == '1,536'

    # --report_only: the report from the records alone, nothing run
    shutil.rmtree(out)
    os.remove(report_path)
    assert experiments.main([*argv, '--records', records, '--report_only']) == 0
    assert '0 of them chosen to run' in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, 'mvp', 'seed0', 'ckpt.pt'))
    report = open(report_path).read()
    assert '2 runs (settings x seeds): 0 run now, 2 found done by the same commands (in ' in report
    assert 'by an earlier session), 0 failed, 0 not run yet' in report
    assert table_rows(report, 'Table 1')[1]['VAR + MVP'][4] == '1,536'
    # a run folder that other backbone files made does not hide this backbone's record of the run
    experiments.write_json(os.path.join(out, 'mvp', 'seed0', 'run.json'), {**record, 'backbone': 'another'})
    assert experiments.main([*argv, '--records', records, '--report_only']) == 0
    assert re.fullmatch(r'[\d.]+ \[[\d.]+\]', table_rows(open(report_path).read(), 'Table 1')[1]['VAR + MVP'][0])


def test_unknown_run_is_an_error(capsys):
    import pytest
    with pytest.raises(SystemExit):
        experiments.main(['--tables', '1', '--runs', 'mvp,t2i_mvp', '--dry_run'])
    assert "unknown --runs ['t2i_mvp'] for tables 1; choose from mvp" in capsys.readouterr().err


def test_dry_run_lists_the_full_grid(capsys):
    assert experiments.main(['--dry_run']) == 0
    lines = capsys.readouterr().out.splitlines()
    commands = [line for line in lines if line.startswith('python ')]
    settings = len(experiments.RUNS)  # every setting is needed by some table
    assert lines[0].startswith(f'{3 * settings} runs ({settings} settings x 3 seeds)')
    assert len(commands) == 2 * 3 * settings + 1  # and the cross-domain folder's export
    assert commands[0].startswith('python -m world.shapes export ') and '--style upside_down' in commands[0]
    assert sum('train.py' in c for c in commands) == sum('world.evaluate' in c for c in commands) == 3 * settings
    assert all('--data shapes' in c for c in commands if 'train.py' in c and '--data runs/' not in c)
    lora = [c for c in commands if '--prompt lora' in c]
    assert len(lora) == 6 and all('--lora_rank 8' in c and '--lr 0.001' in c for c in lora)
    assert all('--lr 0.0001' in c for c in commands if '--prompt full' in c)
    assert [c for c in commands if '--placement random' in c][1].count('--placement_seed 1') == 1


def test_unknown_table_is_an_error(capsys):
    import pytest
    with pytest.raises(SystemExit):
        experiments.main(['--tables', '2', '--dry_run'])
    assert 'unknown --tables' in capsys.readouterr().err


def test_cross_domain_table_end_to_end(tiny_backbone, tmp_path):
    """Table 8's twin: the upside-down domain is exported as an image folder, MVP, LoRA and full fine-tuning train on it
    through train.py --data, and world.evaluate scores FD_judge against that folder's held-out split."""
    out, report_path = str(tmp_path / 'runs'), str(tmp_path / 'experiments.md')
    # the three runs at once (one thread each): one round instead of two on a 2-core machine
    argv = ['--backbone', tiny_backbone, '--tables', '8', *TINY, '--jobs', '3', '--out', out, '--report', report_path]
    assert experiments.main(argv) == 0
    domain = os.path.join(out, 'domain_upside_down_32_2')
    assert sorted(os.listdir(domain)) == ['captions.jsonl', 'class_names.txt', 'test', 'train']
    assert sum(len(files) for _, _, files in os.walk(os.path.join(domain, 'test'))) == 2 * 10
    for name in ('x_mvp', 'x_lora', 'x_full'):
        with open(os.path.join(out, name, 'seed0', 'config.json')) as f:
            config = json.load(f)
        assert config['data'] == domain and config['captions'].endswith('captions.jsonl')
    report = open(report_path).read()
    header, rows = table_rows(report, "Table 8's twin")
    assert header == ['', 'FD_judge ↓', 'class acc ↑', 'FD_clip ↓', 'trainable params', '% of VAR', 'train s']
    assert list(rows) == ['VAR (no tuning) on the new domain', 'full fine-tuning', 'LoRA', 'MVP']
    assert rows['full fine-tuning'][4] == '100.00'
    assert 0 < float(rows['MVP'][4]) < float(rows['LoRA'][4]) < 100
    assert re.fullmatch(r'[\d.]+ \[[\d.]+\]', rows['MVP'][0])  # one seed: the value and its evaluation SE
    assert 'x_mvp' in report


def test_a_time_is_compared_only_between_runs_on_one_machine():
    a = {'FD_clip': {0: 1.0, 1: 2.0, 2: 3.0}, 'train_s': {0: 100.0, 1: 300.0, 2: 110.0},
         'machine': {0: 'A', 1: 'B', 2: 'A'}}
    b = {'FD_clip': {0: 2.0, 1: 3.5, 2: 4.5}, 'train_s': {0: 120.0, 1: 150.0, 2: 125.0},
         'machine': {0: 'A', 1: 'A', 2: 'A'}}
    text, outcome = experiments.verdict(a, b, 'train_s')
    assert '2 seeds' in text and 'leans the paper' in text  # seed 1 ran a on the slower machine B and is left out
    assert outcome == 'noise'  # -17.5, SE 2.5: with two seeds a t-test needs 12.7 SE
    assert '3 seeds' in experiments.verdict(a, b, 'FD_clip')[0]  # quality pairs every seed
    b['machine'] = {0: 'B', 1: 'A', 2: 'B'}
    assert experiments.verdict(a, b, 'train_s') == ('no seed ran both runs on one machine', None)
    assert experiments.verdict(a, b, 'peak_mb') == ('no results yet', None)


def test_a_verdict_needs_a_paired_t_test_over_two_or_more_seeds():
    """FD_judge, lower is better: a beats b by 0.5 on every seed but one."""
    a = {'FD_judge': {0: 4.0, 1: 4.1, 2: 3.9, 3: 4.2, 4: 5.1}}
    b = {'FD_judge': {0: 4.5, 1: 4.6, 2: 4.4, 3: 4.7, 4: 4.9}}
    assert experiments.verdict(a, b, 'FD_judge')[1] == 'noise'  # mean -0.36, SE 0.14: 2.57 SE, t(4) needs 2.78
    a['FD_judge'][4] = 4.4
    text, outcome = experiments.verdict(a, b, 'FD_judge')
    assert outcome == 'agrees' and '5 seeds, beyond 2.78 SE' in text
    assert experiments.verdict(b, a, 'FD_judge')[1] == 'disagrees'  # the claim the other way round
    one = {'FD_judge': {0: 4.0}}
    text, outcome = experiments.verdict(one, {'FD_judge': {0: 9.0}}, 'FD_judge')
    assert outcome == 'one seed' and 'leans the paper\'s way' in text
    # two seeds whose differences agree exactly: SE 0, beyond any threshold
    assert experiments.verdict({'FD_judge': {0: 1.0, 1: 2.0}}, {'FD_judge': {0: 2.0, 1: 3.0}}, 'FD_judge')[1] == 'agrees'


def test_bad_flags_stop_before_any_run(tmp_path, capsys):
    """Values no run can use are caught by the grid itself, not by each of its 99 runs failing in turn."""
    import pytest
    for flags, message in ((['--steps', '0'], '--steps must be at least 1, got 0'),
                           (['--jobs', '0'], '--jobs must be at least 1, got 0'),
                           (['--lr', '0'], '--lr must be positive, got 0.0'),
                           (['--warmup_steps', '-1'], '--warmup_steps must be at least 0, got -1'),
                           (['--device', 'gpu0'], '--device gpu0 is not a device')):
        with pytest.raises(SystemExit):
            experiments.main(['--tables', '1', '--seeds', '0', '--out', str(tmp_path / 'out'), *flags])
        assert message in capsys.readouterr().err
    assert not (tmp_path / 'out').exists()


def test_the_paths_table_runs_every_token_path_on_the_shapes_world(tmp_path):
    """The paths study runs each of clip_loss.TOKENS once per task, beside CE alone and the soft temperatures."""
    from clip_loss import TOKENS
    args = experiments.get_args(['--backbone', str(tmp_path), '--tables', 'paths', '--seeds', '0'])
    trains = {name: experiments.commands(args, name, 0)[0] for name in args.run_list}
    assert all(cmd[cmd.index('--data') + 1] == 'shapes' for cmd in trains.values())
    drawn = {cmd[cmd.index('--tokens') + 1] for cmd in trains.values() if '--tokens' in cmd}
    assert drawn | {'soft'} == set(TOKENS) and len(trains) == 16
    for name, cmd in trains.items():  # text-to-image's default changed once: its rows must not lean on it
        if '--t2i' in cmd:
            assert '--lambda_sen' in cmd and '--lambda_cap' in cmd, name
            assert '--tokens' in cmd or cmd[cmd.index('--lambda_sen') + 1] == cmd[cmd.index('--lambda_cap') + 1] == '0', name
