"""
The paper's tables in miniature, on the shapes world: one command runs a grid of train.py + world.evaluate runs over
several seeds and writes a markdown report (mean +- std over seeds, the paper's finding beside each table, and
whether the miniature agrees).

    python -m world.experiments                                   # every table, seeds 0,1,2 -> docs/experiments.md
    python -m world.experiments --tables 1,4 --seeds 0 --steps 50 # a part of it
    python -m world.experiments --dry_run                         # print the commands and the time estimate only

Tables: 1 (plain VAR vs MVP, class-to-image), 3 (text-to-image: MVP vs LoRA vs full fine-tuning), 4 (MVP vs the
prefilled prompt: quality and peak memory), 5 (the five prompt placements), 6 (the first-scale prompt on/off, both
tasks), 7 (tau in 4, 12, 20, 28), 8 (cross-domain transfer: MVP vs LoRA vs full fine-tuning on a shapes domain the
backbone never saw, exported by `python -m world.shapes export OUT/domain_upside_down_N_M --style upside_down` and trained on
as an image folder, as a user's own Food101 folder would be), sem (the semantic loss: none, sentence only, caption only,
both; both tasks).
Runs that several tables share (MVP's default run is in 1, 4, 5, 6, 7 and sem) train once.

Every run is its own processes (`python train.py ...`, then `python -m world.evaluate --json ...`), so its time and
memory are its own; each writes OUT/<run>/seed<s>/. The grid resumes: a run whose evaluation exists, made by the
same commands, is not run again, and the report is rewritten after every finished run.
"""
import argparse
import concurrent.futures
import datetime
import hashlib
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time

from scipy import stats

from device import parse_device
from mvp import DEFAULT_LAMBDAS, DEFAULT_TOKENS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository's

# -----------------------------------------------------------------------------
# the grid: every run is MVP's default (frame prompts, tau 20, first scale off for class-to-image / on for
# text-to-image, the task's semantic loss: mvp.DEFAULT_LAMBDAS, DEFAULT_TOKENS) with these train.py flags changed;
# {seed} is the run's seed. The rows of the loss studies that must not follow a default name each flag they test.

RUNS = {
    'mvp': [],
    'prefilled': ['--prompt', 'prefilled'],
    'place_random': ['--placement', 'random', '--placement_seed', '{seed}'],
    'place_innermost': ['--placement', 'innermost'],
    'place_center_to_outer': ['--placement', 'center_to_outer'],
    'place_sub_outermost': ['--placement', 'sub_outermost'],
    'first_on': ['--first_scale', 'on'],
    'tau4': ['--tau', '4'],
    'tau12': ['--tau', '12'],
    'tau28': ['--tau', '28'],
    'sem_none': ['--lambda_sen', '0', '--lambda_cap', '0'],
    'sem_sentence': ['--lambda_cap', '0'],
    'sem_caption': ['--lambda_sen', '0'],
    't2i_mvp': ['--t2i'],
    't2i_lora': ['--t2i', '--prompt', 'lora'],
    't2i_full': ['--t2i', '--prompt', 'full'],
    't2i_first_off': ['--t2i', '--first_scale', 'off'],
    't2i_sem_none': ['--t2i', '--lambda_sen', '0', '--lambda_cap', '0'],
    't2i_sem_sentence': ['--t2i', '--lambda_cap', '0'],
    't2i_sem_caption': ['--t2i', '--lambda_sen', '0'],
    't2i_eq9': ['--t2i', '--lambda_sen', '1', '--lambda_cap', '1', '--tokens', 'soft'],  # Eq. 9 as written
    # the balance of CE and the semantic loss (docs/running.md): smaller lambdas, and the other ways to combine them
    'bal_l0.001': ['--lambda_sen', '0.001', '--lambda_cap', '0.001'],
    'bal_l0.01': ['--lambda_sen', '0.01', '--lambda_cap', '0.01'],
    'bal_l0.1': ['--lambda_sen', '0.1', '--lambda_cap', '0.1'],
    'bal_norm0.1': ['--balance', 'normalize', '--semantic_ratio', '0.1'],
    'bal_norm1': ['--balance', 'normalize', '--semantic_ratio', '1'],
    'bal_clip_each': ['--balance', 'clip_each'],
    't2i_bal_l0.001': ['--t2i', '--lambda_sen', '0.001', '--lambda_cap', '0.001', '--tokens', 'soft'],
    't2i_bal_l0.01': ['--t2i', '--lambda_sen', '0.01', '--lambda_cap', '0.01', '--tokens', 'soft'],
    't2i_bal_l0.1': ['--t2i', '--lambda_sen', '0.1', '--lambda_cap', '0.1', '--tokens', 'soft'],
    't2i_bal_norm0.1': ['--t2i', '--lambda_sen', '1', '--lambda_cap', '1', '--tokens', 'soft', '--balance', 'normalize',
                        '--semantic_ratio', '0.1'],
    't2i_bal_norm1': ['--t2i', '--lambda_sen', '1', '--lambda_cap', '1', '--tokens', 'soft', '--balance', 'normalize',
                      '--semantic_ratio', '1'],
    't2i_bal_clip_each': ['--t2i', '--lambda_sen', '1', '--lambda_cap', '1', '--tokens', 'soft', '--balance', 'clip_each'],
    # how I_sen and I_cap are made differentiable (clip_loss.TOKENS), at Eq. 9's lambdas
    'tok_soft0.5': ['--soft_temperature', '0.5'],
    'tok_soft2': ['--soft_temperature', '2'],
    'tok_gumbel': ['--tokens', 'gumbel'],
    'tok_argmax': ['--tokens', 'argmax'],
    'tok_rollout': ['--tokens', 'rollout'],
    't2i_tok_soft0.5': ['--t2i', '--lambda_sen', '1', '--lambda_cap', '1', '--tokens', 'soft', '--soft_temperature', '0.5'],
    't2i_tok_soft2': ['--t2i', '--lambda_sen', '1', '--lambda_cap', '1', '--tokens', 'soft', '--soft_temperature', '2'],
    't2i_tok_gumbel': ['--t2i', '--lambda_sen', '1', '--lambda_cap', '1', '--tokens', 'gumbel'],
    't2i_tok_argmax': ['--t2i', '--lambda_sen', '1', '--lambda_cap', '1', '--tokens', 'argmax'],
    't2i_tok_rollout': ['--t2i', '--lambda_sen', '1', '--lambda_cap', '1', '--tokens', 'rollout'],
    # added after the first two seeds: the rollout taught the texture and cost the shape at Eq. 9's lambdas; the
    # text-to-image row is that task's default since its fresh seeds (docs/semantic_loss.md)
    'tok_rollout_l0.1': ['--tokens', 'rollout', '--lambda_sen', '0.1', '--lambda_cap', '0.1'],
    't2i_tok_rollout_l0.1': ['--t2i', '--lambda_sen', '0.1', '--lambda_cap', '0.1', '--tokens', 'rollout'],
    # Table 8's twin: the same three methods on the upside-down domain's image folder ({domain}: see domain_folder)
    'x_mvp': ['--data', '{domain}'],
    'x_lora': ['--data', '{domain}', '--prompt', 'lora'],
    'x_full': ['--data', '{domain}', '--prompt', 'full'],
}
DOMAIN_STYLE = 'upside_down'  # world/shapes.py's second domain

# metric -> (column header, better: 'lower' or 'higher', format)
METRICS = {
    'FD_judge': ('FD_judge ↓', 'lower', '{:.2f}'),  # the judge (world/shapes.py), the miniature's Inception
    'IS_judge': ('IS_judge ↑', 'higher', '{:.2f}'),
    'precision': ('precision ↑', 'higher', '{:.3f}'),
    'recall': ('recall ↑', 'higher', '{:.3f}'),
    'FD_clip': ('FD_clip ↓', 'lower', '{:.2f}'),
    'class_accuracy': ('class acc ↑', 'higher', '{:.3f}'),
    'clip_score': ('CLIP-score ↑', 'higher', '{:.2f}'),
    'attribute_accuracy': ('attribute acc ↑', 'higher', '{:.3f}'),
    'shape_accuracy': ('of it, shape ↑', 'higher', '{:.3f}'),  # the attribute that moves most here
    'colour_accuracy': ('colour ↑', 'higher', '{:.3f}'),
    'texture_accuracy': ('texture ↑', 'higher', '{:.3f}'),  # the fine attribute
    'trainable': ('trainable params', 'lower', '{:,.0f}'),
    'trainable_pct': ('% of VAR', 'lower', '{:.2f}'),
    'train_s': ('train s', 'lower', '{:.1f}'),
    'peak_mb': ('peak RSS MB', 'lower', '{:.0f}'),
    'sen_over_ce': ('grad sen / ce', None, '{:.3g}'),  # from the gradient record of the logged steps (log.jsonl)
    'cap_over_ce': ('grad cap / ce', None, '{:.3g}'),
    'clipped_pct': ('clip bound %', None, '{:.0f}'),
}
MACHINE_BOUND = ('train_s', 'peak_mb')  # metrics that depend on the CPU a run ran on: verdicts pair same-CPU seeds
C2I = ('FD_judge', 'class_accuracy', 'IS_judge', 'FD_clip', 'trainable', 'train_s')
T2I = ('FD_judge', 'attribute_accuracy', 'shape_accuracy', 'texture_accuracy', 'FD_clip', 'clip_score', 'trainable',
       'train_s')

# One section per table (Table 6 and sem have one per task). A row: (label, run, 'before' or 'after'): 'before' is
# world.evaluate's untrained model of that run. A claim, the paper's finding: (row a, row b, metric): a beats b on it.
SECTIONS = [
    dict(table='1', title='Table 1: class-to-image, plain VAR vs VAR + MVP', metrics=C2I,
         rows=[('VAR (no tuning)', 'mvp', 'before'), ('VAR + MVP', 'mvp', 'after')],
         paper='VAR-d16 FID 3.61, IS 225.6 -> MVP-d16 3.46, 247.4; MVP lowers FID and raises IS at every depth '
               '(d16, d20, d24, d30).',
         claims=[('VAR + MVP', 'VAR (no tuning)', 'FD_judge'), ('VAR + MVP', 'VAR (no tuning)', 'class_accuracy')]),
    dict(table='3', title='Table 3: text-to-image, MVP vs LoRA vs full fine-tuning (same steps)', metrics=T2I,
         rows=[('untuned (least-squares text projection, no step)', 't2i_mvp', 'before'),
               ('VAR + MVP', 't2i_mvp', 'after'), ('VAR + LoRA', 't2i_lora', 'after'),
               ('full fine-tuning (VAR-CLIP analogue)', 't2i_full', 'after')],
         paper='VAR-CLIP (full, 310M params): FID 11.26, CLIP-score 28.55, 4782 GPU-hours; VAR + LoRA (4.6M): 14.8, '
               '29.23, 58; VAR + MVP (1.45M): 13.50, 30.48, 26. VAR-CLIP is fully pretrained, not fine-tuned from '
               'the class-conditional VAR as here, and trains far longer than the others.',
         claims=[('VAR + MVP', 'VAR + LoRA', 'FD_judge'), ('VAR + MVP', 'VAR + LoRA', 'attribute_accuracy'),
                 ('VAR + MVP', 'full fine-tuning (VAR-CLIP analogue)', 'attribute_accuracy'),
                 ('full fine-tuning (VAR-CLIP analogue)', 'VAR + MVP', 'FD_judge'),
                 ('VAR + MVP', 'VAR + LoRA', 'trainable'), ('VAR + MVP', 'VAR + LoRA', 'train_s'),
                 ('VAR + MVP', 'full fine-tuning (VAR-CLIP analogue)', 'train_s')]),
    dict(table='4', title='Table 4: MVP vs the prefilled prompt (same token budget)', metrics=C2I + ('peak_mb',),
         rows=[('VAR (no tuning)', 'mvp', 'before'), ('+ prefilled prompt', 'prefilled', 'after'),
               ('+ MVP', 'mvp', 'after')],
         paper='VAR-d16 FID 3.61, IS 225.6; + prefilled 3.51, 238.4, 23.2 GB peak GPU memory; + MVP 3.46, 247.4, '
               '14.5 GB. Both improve on VAR, MVP more, with less memory (the sequence does not grow).',
         claims=[('+ MVP', '+ prefilled prompt', 'FD_judge'), ('+ MVP', '+ prefilled prompt', 'class_accuracy'),
                 ('+ prefilled prompt', 'VAR (no tuning)', 'FD_judge'), ('+ MVP', '+ prefilled prompt', 'peak_mb')]),
    dict(table='5', title='Table 5: prompt placements at equal budget (class-to-image)', metrics=C2I,
         rows=[('frame (MVP)', 'mvp', 'after'), ('random (placement seed = run seed)', 'place_random', 'after'),
               ('innermost', 'place_innermost', 'after'), ('center-to-outer', 'place_center_to_outer', 'after'),
               ('sub-outermost', 'place_sub_outermost', 'after')],
         paper='d16 FID: frame 3.46, random 3.69 (3 seeds), innermost 3.68, center-to-outer 3.64, sub-outermost '
               '3.51; the frame is best at d16 and d30 on FID and IS.',
         claims=[('frame (MVP)', other, 'FD_judge') for other in ('random (placement seed = run seed)', 'innermost',
                                                                'center-to-outer', 'sub-outermost')]),
    dict(table='6', title='Table 6a: the first-scale prompt, class-to-image', metrics=C2I,
         rows=[('first-scale prompt on', 'first_on', 'after'), ('off (MVP for class-to-image)', 'mvp', 'after')],
         paper='d16: on FID 3.57, IS 221.3; off 3.46, 247.4 (d20, d24 alike): the first-scale prompt hurts '
               'class-to-image, IS most.',
         claims=[('off (MVP for class-to-image)', 'first-scale prompt on', 'FD_judge'),
                 ('off (MVP for class-to-image)', 'first-scale prompt on', 'class_accuracy')]),
    dict(table='6', title='Table 6b: the first-scale prompt, text-to-image', metrics=T2I,
         rows=[('on (MVP for text-to-image)', 't2i_mvp', 'after'), ('first-scale prompt off', 't2i_first_off', 'after')],
         paper='No numbers; the text says the first-scale prompt improves text-to-image (it aligns the text with '
               'the class embeddings).',
         claims=[('on (MVP for text-to-image)', 'first-scale prompt off', m)
                 for m in ('FD_judge', 'attribute_accuracy')]),
    dict(table='7', title='Table 7: the frame threshold tau (class-to-image)', metrics=C2I,
         rows=[('tau 4', 'tau4', 'after'), ('tau 12', 'tau12', 'after'), ('tau 20 (MVP)', 'mvp', 'after'),
               ('tau 28', 'tau28', 'after')],
         paper='d16 FID / IS: tau 4 3.58 / 231.1, 12 3.49 / 238.3, 20 3.46 / 247.4, 28 3.47 / 248.8; more capacity '
               'helps up to ~20, beyond it little changes.',
         claims=[('tau 20 (MVP)', 'tau 4', 'FD_judge'), ('tau 12', 'tau 4', 'FD_judge'),
                 ('tau 20 (MVP)', 'tau 4', 'class_accuracy')]),
    dict(table='8', title='Table 8\'s twin: cross-domain transfer to a shapes domain the backbone never saw',
         metrics=('FD_judge', 'class_accuracy', 'FD_clip', 'trainable', 'trainable_pct', 'train_s'),
         rows=[('VAR (no tuning) on the new domain', 'x_mvp', 'before'), ('full fine-tuning', 'x_full', 'after'),
               ('LoRA', 'x_lora', 'after'), ('MVP', 'x_mvp', 'after')],
         paper='VAR-d24 tuned one epoch to SUN397, Food101 and RESISC45, mean FID: full fine-tuning (100% of the '
               'parameters) 37.27, LoRA (0.26%) 30.87, QLoRA (0.26%) 30.91, MVP (0.17%) 29.72; MVP best on each, '
               'by most under the largest domain shift (RESISC45). QLoRA needs CUDA (bitsandbytes): not run here.',
         claims=[('MVP', 'LoRA', 'FD_judge'), ('MVP', 'full fine-tuning', 'FD_judge'),
                 ('LoRA', 'full fine-tuning', 'FD_judge'), ('MVP', 'LoRA', 'trainable_pct')]),
    dict(table='sem', title='The semantic loss, class-to-image: what each level adds', metrics=C2I,
         rows=[('CE only (lambda_sen = lambda_cap = 0)', 'sem_none', 'after'), ('CE + sentence', 'sem_sentence', 'after'),
               ('CE + caption', 'sem_caption', 'after'), ('CE + sentence + caption (MVP)', 'mvp', 'after')],
         paper='No table; Sec. 3.3 says the two levels let the prompt learn richer semantics step by step (the '
               'sentence-level class semantics at scale kappa, the caption\'s details at the last scale).',
         claims=[('CE + sentence + caption (MVP)', 'CE only (lambda_sen = lambda_cap = 0)', 'FD_judge'),
                 ('CE + sentence', 'CE only (lambda_sen = lambda_cap = 0)', 'FD_judge'),
                 ('CE + sentence + caption (MVP)', 'CE + sentence', 'FD_judge'),
                 ('CE + sentence + caption (MVP)', 'CE only (lambda_sen = lambda_cap = 0)', 'class_accuracy')]),
    dict(table='sem', title='The semantic loss, text-to-image: what each level adds', metrics=T2I,
         rows=[('CE only (lambda_sen = lambda_cap = 0)', 't2i_sem_none', 'after'),
               ('CE + sentence', 't2i_sem_sentence', 'after'), ('CE + caption', 't2i_sem_caption', 'after'),
               ('CE + sentence + caption (MVP)', 't2i_mvp', 'after')],
         paper='As above (no table). Every row at text-to-image\'s defaults (lambdas 0.1, the free-running rollout) '
               'but the level it turns off.',
         claims=[('CE + sentence + caption (MVP)', 'CE only (lambda_sen = lambda_cap = 0)', m)
                 for m in ('FD_judge', 'attribute_accuracy')]
                + [('CE + sentence + caption (MVP)', 'CE + sentence', 'attribute_accuracy')]),
]
def study_sections(table: str, title: str, paper: str, rows: list, c2i_metrics: tuple, t2i_metrics: tuple,
                   judged: tuple) -> list:
    """A study's two sections, class-to-image and text-to-image (rows: label, the one run, the other), each row
    judged against the first (CE alone) on `judged`: (the quality figure, the c2i accuracy, the t2i accuracy)."""
    quality, c2i_accuracy, t2i_accuracy = judged
    return [dict(table=table, title=f'{title}, {task}', paper=paper, metrics=metrics,
                 rows=[(label, runs[column], 'after') for label, *runs in rows],
                 claims=[(row[0], rows[0][0], m) for row in rows[1:] for m in (quality, accuracy)])
            for task, column, metrics, accuracy in (('class-to-image', 0, c2i_metrics, c2i_accuracy),
                                                     ('text-to-image', 1, t2i_metrics, t2i_accuracy))]


BALANCE_ROWS = [('CE only', 'sem_none', 't2i_sem_none')] + [
    (label, run, 't2i_' + run) for label, run in (('lambda 0.001', 'bal_l0.001'), ('lambda 0.01', 'bal_l0.01'),
                                                  ('lambda 0.1', 'bal_l0.1'))] + [
    ('lambda 1 (Eq. 9 as written)', 'mvp', 't2i_eq9')] + [
    (label, run, 't2i_' + run) for label, run in (('normalize, each level 0.1 x CE', 'bal_norm0.1'),
                                                  ('normalize, each level 1 x CE', 'bal_norm1'),
                                                  ('clip each loss at 1.0', 'bal_clip_each'))]
BALANCE_PAPER = ('No lambdas given; Eq. 9 adds the semantic loss to CE. Here every semantic setting is judged against '
                 'CE alone on what no loss trains against: FD_judge (the judge\'s features), the class or the '
                 'attributes it reads; FD_clip (the training CLIP\'s space) is shown, never used to choose. grad sen / ce, '
                 'grad cap / ce: the median over the logged steps of each CLIP level\'s gradient norm (lambda included, '
                 'before any balancing) over cross-entropy\'s; clip bound %: the logged steps where --grad_clip bound.')
SECTIONS += study_sections(
    'bal', 'The balance of CE and the semantic loss', BALANCE_PAPER, BALANCE_ROWS,
    ('FD_judge', 'class_accuracy', 'FD_clip', 'sen_over_ce', 'cap_over_ce', 'clipped_pct', 'train_s'),
    ('FD_judge', 'attribute_accuracy', 'texture_accuracy', 'FD_clip', 'clip_score', 'sen_over_ce', 'cap_over_ce',
     'clipped_pct', 'train_s'),
    ('FD_judge', 'class_accuracy', 'attribute_accuracy'))
PATH_ROWS = [('CE only', 'sem_none', 't2i_sem_none'), ('soft, T = 1 (class-to-image\'s default)', 'mvp', 't2i_eq9')] + [
    (label, run, 't2i_' + run) for label, run in (('soft, T = 0.5', 'tok_soft0.5'), ('soft, T = 2', 'tok_soft2'),
                                                  ('straight-through Gumbel', 'tok_gumbel'),
                                                  ('straight-through argmax', 'tok_argmax'),
                                                  ('free-running rollout', 'tok_rollout'),
                                                  ('free-running rollout, lambdas 0.1 (added after two seeds; '
                                                   'text-to-image\'s default)', 'tok_rollout_l0.1'))]
PATH_PAPER = ('No method given: the paper does not say how I_sen and I_cap are made differentiable. Each path is '
              'judged against CE alone on the judge (FD_judge, the class or the caption attributes it reads); '
              'FD_clip, the training CLIP\'s own space, is shown and never used to choose.')
SECTIONS += study_sections(
    'paths', 'The differentiable path of the semantic loss', PATH_PAPER, PATH_ROWS,
    ('FD_judge', 'class_accuracy', 'IS_judge', 'FD_clip', 'sen_over_ce', 'cap_over_ce', 'train_s'),
    ('FD_judge', 'attribute_accuracy', 'texture_accuracy', 'FD_clip', 'sen_over_ce', 'cap_over_ce', 'train_s'),
    ('FD_judge', 'class_accuracy', 'attribute_accuracy'))
TABLE_KEYS = ('1', '3', '4', '5', '6', '7', '8', 'sem', 'bal', 'paths')

# for the time estimate: seconds per training step at batch 16 and per evaluated image (world.evaluate's wall time),
# two runs at a time at one torch thread each, on a 2-core EPYC with AVX-512 BF16 under train.py's --dtype auto (bf16
# autocast), from the grid's own runs. fp32 there (kernels held to AVX2) took at most 1.06x that, and the slowest CPU
# here at most 1.29x that EPYC's AVX2 time on shared/calibration.md's step (docs/benchmarks.md).
BF16_STEP_S = {'semantic': 0.6, 'ce': 0.3, 'rollout': 0.9}
BF16_EVAL_S_PER_IMAGE = 0.035
SLOWEST_FP32_OVER_BF16 = 1.06 * 1.29
STEP_S = {'bfloat16': BF16_STEP_S,
          'float32': {kind: s * SLOWEST_FP32_OVER_BF16 for kind, s in BF16_STEP_S.items()}}
EVAL_S_PER_IMAGE = {'bfloat16': BF16_EVAL_S_PER_IMAGE, 'float32': BF16_EVAL_S_PER_IMAGE * SLOWEST_FP32_OVER_BF16}
START_S = 8.0  # two process starts (torch, open_clip, models)


def get_args(argv=None):
    p = argparse.ArgumentParser(description='MVP\'s tables in miniature on the shapes world: a grid of train.py + '
                                'world.evaluate runs, and a markdown report.',
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--backbone', default='checkpoints/shapes', help='a shapes backbone folder (world/pretrain.py)')
    p.add_argument('--tables', default=','.join(TABLE_KEYS), help=f'comma-separated, of {", ".join(TABLE_KEYS)}')
    p.add_argument('--seeds', default='0,1,2', help='comma-separated training (and evaluation) seeds')
    p.add_argument('--steps', type=int, default=300, help='training steps of every run')
    p.add_argument('--batch_size', type=int, default=16)
    p.add_argument('--lr', type=float, default=1e-3, help='learning rate of the prompts (MVP, prefilled)')
    p.add_argument('--lr_lora', type=float, default=1e-3, help='learning rate of LoRA')
    p.add_argument('--lr_full', type=float, default=1e-4, help='learning rate of full fine-tuning')
    p.add_argument('--lora_rank', type=int, default=8)
    p.add_argument('--warmup_steps', type=int, default=None, help='default: steps // 10')
    p.add_argument('--shapes_n', type=int, default=5000, help='training images')
    p.add_argument('--per_class', type=int, default=30, help='evaluation: class-to-image samples per class')
    p.add_argument('--n_texts', type=int, default=300, help='evaluation: text-to-image held-out captions')
    p.add_argument('--device', default='cpu')
    p.add_argument('--jobs', type=int, default=2, help='runs at the same time')
    p.add_argument('--threads', type=int, default=1, help='torch threads per run (OMP_NUM_THREADS)')
    p.add_argument('--out', default='runs/experiments', help='where the runs go')
    p.add_argument('--report', default='docs/experiments.md')
    p.add_argument('--records', default=None,
                   help='a folder for each finished run\'s small records (run.json, eval.json, config.json), to keep in '
                        'git: runs recorded there by the same commands count as done, so a grid spread over sessions '
                        'or machines resumes where it stopped')
    p.add_argument('--runs', default=None,
                   help='comma-separated settings to run now, of the chosen tables\' (default: all of them); the '
                        'report still covers every chosen table, from the runs there are')
    p.add_argument('--report_only', action='store_true',
                   help='run nothing: write the report from the runs there are (in --out and --records)')
    p.add_argument('--dry_run', action='store_true', help='print the commands and the estimate, run nothing')
    args = p.parse_args(argv)
    for name in ('steps', 'batch_size', 'lora_rank', 'shapes_n', 'per_class', 'n_texts', 'jobs', 'threads'):
        if getattr(args, name) < 1:
            p.error(f'--{name} must be at least 1, got {getattr(args, name)}')
    for name in ('lr', 'lr_lora', 'lr_full'):
        if not getattr(args, name) > 0:
            p.error(f'--{name} must be positive, got {getattr(args, name)}')
    if args.warmup_steps is not None and args.warmup_steps < 0:
        p.error(f'--warmup_steps must be at least 0, got {args.warmup_steps}')
    try:
        parse_device(args.device)
    except ValueError as e:
        p.error(str(e))
    args.table_list = [t.strip() for t in args.tables.split(',') if t.strip()]
    unknown = [t for t in args.table_list if t not in TABLE_KEYS]
    if unknown or not args.table_list:
        p.error(f'unknown --tables {unknown}; choose from {", ".join(TABLE_KEYS)}')
    try:
        args.seed_list = [int(s) for s in args.seeds.split(',') if s.strip()]
    except ValueError:
        p.error(f'--seeds takes comma-separated integers, got {args.seeds!r}')
    if not args.seed_list:
        p.error('--seeds is empty')
    settings = needed_runs(args)
    args.run_list = settings if args.runs is None else [r.strip() for r in args.runs.split(',') if r.strip()]
    unknown = [r for r in args.run_list if r not in settings]
    if unknown or not args.run_list:
        p.error(f'unknown --runs {unknown} for tables {args.tables}; choose from {", ".join(settings)}')
    if args.warmup_steps is None:
        args.warmup_steps = args.steps // 10
    args.fingerprint = backbone_fingerprint(args.backbone)
    return args


# -----------------------------------------------------------------------------
# commands and runs


def script(name: str) -> list:
    """train.py, or a world module (world.evaluate), as the commands name them: a path relative to the working
    directory when inside it; a module runs with the repository on PYTHONPATH (the runs' env)."""
    if not name.endswith('.py'):
        return ['-m', name]
    path = os.path.relpath(os.path.join(ROOT, name))
    return [os.path.join(ROOT, name) if path.startswith('..') else path]


def sections(args):
    return [s for s in SECTIONS if s['table'] in args.table_list]


def needed_runs(args):
    """The runs the chosen tables need, in grid order, each once."""
    names = {run for s in sections(args) for _, run, _ in s['rows']}
    return [name for name in RUNS if name in names]


def run_dir(args, name: str, seed: int) -> str:
    return os.path.join(args.out, name, f'seed{seed}')


def records_dir(args, name: str, seed: int) -> str:
    """Where --records keeps a run's records."""
    return os.path.join(args.records, name, f'seed{seed}')


def domain_folder(args) -> str:
    """Where the cross-domain runs' image folder is exported: as many training images as the shapes runs get, and as
    many held-out images as FD_judge compares the class-to-image samples with."""
    return os.path.join(args.out, f'domain_{DOMAIN_STYLE}_{args.shapes_n}_{args.per_class}')


def domain_export_command(args, folder: str):
    return [*script('world.shapes'), 'export', folder, '--style', DOMAIN_STYLE,
            '--train_per_class', str(max(1, args.shapes_n // 10)), '--test_per_class', str(args.per_class)]


def export_domain(args, env):
    """The cross-domain runs' image folder (world.shapes export writes it whole or not at all)."""
    subprocess.run([sys.executable, *domain_export_command(args, domain_folder(args))], check=True, env=env)


def commands(args, name: str, seed: int):
    """(train.py command, world.evaluate command) of one run, as argument lists without the interpreter."""
    flags = [f.format(seed=seed, domain=domain_folder(args)) for f in RUNS[name]]
    if '--data' in flags:  # an image folder, with its captions
        data = ['--captions', os.path.join(domain_folder(args), 'captions.jsonl')]
    else:
        data = ['--data', 'shapes', '--shapes_n', str(args.shapes_n)]
    method = flags[flags.index('--prompt') + 1] if '--prompt' in flags else 'mvp'
    lr = {'lora': args.lr_lora, 'full': args.lr_full}.get(method, args.lr)
    extra = ['--lora_rank', str(args.lora_rank)] if method == 'lora' else []
    out = run_dir(args, name, seed)
    train = [*script('train.py'), '--backbone', args.backbone, *data, '--batch_size', str(args.batch_size),
             '--max_steps', str(args.steps), '--lr', str(lr), '--warmup_steps', str(args.warmup_steps),
             '--seed', str(seed), '--device', args.device, '--num_workers', '0',
             '--sample_every', '0', '--log_every', '10', *flags, *extra, '--out_dir', out]
    evaluate = [*script('world.evaluate'), '--ckpt', os.path.join(out, 'ckpt.pt'), '--per_class', str(args.per_class),
                '--n_texts', str(args.n_texts), '--seed', str(seed), '--json', os.path.join(out, 'eval.json')]
    return train, evaluate


def shown(cmd) -> str:
    return 'python ' + shlex.join(cmd)


def read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class LoadSampler:
    """The machine's 1-minute load average every `every` seconds, from a daemon thread: a run's mean load over its
    training says whether it had the CPU the grid gave it (--jobs x --threads) or shared it with other work, which
    its train s then shows."""

    def __init__(self, every: float = 15.0):
        self.samples = []  # (time, load)
        threading.Thread(target=self.sample, args=(every,), daemon=True).start()

    def sample(self, every: float):
        while True:
            self.samples.append((time.time(), os.getloadavg()[0]))
            time.sleep(every)

    def mean(self, t0: float, t1: float):
        loads = [load for t, load in self.samples if t0 <= t <= t1] or [load for t, load in self.samples if t <= t1][-1:]
        return round(statistics.fmean(loads), 2) if loads else None  # (a run shorter than `every`: the last sample)


def cpu_name() -> str:
    """The CPU's model name (platform.processor() is empty on most Linux systems)."""
    try:
        with open('/proc/cpuinfo') as f:
            return next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def code_version() -> str:
    """The checkout's commit (with '-dirty' for uncommitted changes), so a record says which code made it."""
    try:
        return subprocess.run(['git', '-C', ROOT, 'describe', '--always', '--dirty', '--abbrev=12'], capture_output=True,
                              text=True, timeout=10).stdout.strip() or 'unknown'
    except (OSError, subprocess.SubprocessError):
        return 'unknown'


RECORD_FILES = ('run.json', 'eval.json', 'config.json')  # all the report needs of a run
OPTIONAL_RECORDS = ('log.jsonl',)  # kept where the run has it: the losses and the gradient record
BACKBONE_FILES = ('backbone.json', 'vqvae.pth', 'var.pth', 'clip/open_clip_config.json', 'clip/open_clip_model.safetensors',
                  'judge.pth')  # what a run's figures depend on


def backbone_fingerprint(folder: str) -> str:
    """The first 12 hex digits of a SHA-256 over the backbone's files: a run counts as done, and enters the report,
    only if it was made with the same backbone (the same commands on a retrained CLIP measure something else)."""
    digest = hashlib.sha256()
    for name in BACKBONE_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            digest.update(name.encode())
            with open(path, 'rb') as f:
                digest.update(f.read())
    return digest.hexdigest()[:12]


def read_record(args, folder: str) -> dict:
    """A run's run.json, or {} where there is none or where other backbone files made it: its figures are not this
    grid's, so it counts as not run."""
    record = read_json(os.path.join(folder, 'run.json')) or {}
    return record if record.get('backbone') == args.fingerprint else {}


def copy_records(source: str, target: str):
    """A run's records from one run folder to another, when source has them all."""
    if all(os.path.isfile(os.path.join(source, f)) for f in RECORD_FILES):
        os.makedirs(target, exist_ok=True)
        for f in RECORD_FILES + tuple(f for f in OPTIONAL_RECORDS if os.path.isfile(os.path.join(source, f))):
            shutil.copyfile(os.path.join(source, f), os.path.join(target, f))


def restore_records(args, grid):
    """Runs kept in --records and not finished in --out with this backbone are copied there (over a run that other
    backbone files made); run_one then finds them done if their commands are the ones this grid would run."""
    for name, seed in grid:
        out, kept = run_dir(args, name, seed), records_dir(args, name, seed)
        finished_here = os.path.isfile(os.path.join(out, 'eval.json')) and read_record(args, out)
        if not finished_here and read_record(args, kept):
            copy_records(kept, out)


def has_judge(folder: str) -> bool:
    """The run's eval.json has the judge's FD (evaluations made before world.evaluate wrote it do not)."""
    after = (read_json(os.path.join(folder, 'eval.json')) or {}).get('after') or {}
    return 'FD_judge' in after


def is_cached(args, name: str, seed: int) -> bool:
    """The run is trained and evaluated in --out by exactly the commands this grid would run, with today's figures."""
    out = run_dir(args, name, seed)
    record = read_record(args, out)
    return [record.get('train_cmd'), record.get('eval_cmd')] == list(commands(args, name, seed)) \
        and record.get('train_rc') == record.get('eval_rc') == 0 and has_judge(out)


def run_one(args, name: str, seed: int, env: dict, load: LoadSampler) -> str:
    """Train and evaluate one run unless done already by the same commands; returns 'cached', 'done' or 'failed'."""
    out = run_dir(args, name, seed)
    train_cmd, eval_cmd = commands(args, name, seed)
    record_path = os.path.join(out, 'run.json')
    record = read_record(args, out)
    same_train = record.get('train_cmd') == train_cmd and record.get('train_rc') == 0
    if is_cached(args, name, seed):
        return 'cached'
    os.makedirs(out, exist_ok=True)
    if not (same_train and os.path.isfile(os.path.join(out, 'ckpt.pt'))):
        record = {'run': name, 'seed': seed, 'train_cmd': train_cmd, 'backbone': args.fingerprint,
                  'code': code_version()}
        t0 = time.time()
        with open(os.path.join(out, 'train.log'), 'w') as log:
            proc = subprocess.Popen([sys.executable, *train_cmd], stdout=log, stderr=subprocess.STDOUT, env=env)
            _, status, usage = os.wait4(proc.pid, 0)  # this child's own resource usage, peak RSS included
            proc.returncode = os.waitstatus_to_exitcode(status)
        record.update(train_rc=proc.returncode, train_wall_s=round(time.time() - t0, 2),
                      peak_mb=round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KB on Linux
                      cpu=cpu_name(), cores=os.cpu_count(), load=load.mean(t0, time.time()))
        config = read_json(os.path.join(out, 'config.json')) or {}  # train.py writes the count and its autocast there
        record.update(trainable=config.get('trainable_parameters'), autocast=config.get('autocast'))
        try:
            with open(os.path.join(out, 'log.jsonl')) as f:
                record['train_s'] = [json.loads(line) for line in f if line.strip()][-1]['time']  # the training loop
        except (OSError, ValueError, IndexError, KeyError):
            record['train_s'] = None
        write_json(record_path, record)
        if proc.returncode != 0:
            return 'failed'
    if os.path.exists(os.path.join(out, 'eval.json')):
        os.remove(os.path.join(out, 'eval.json'))
    t0 = time.time()
    with open(os.path.join(out, 'eval.log'), 'w') as log:
        rc = subprocess.run([sys.executable, *eval_cmd], stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    record.update(eval_cmd=eval_cmd, eval_rc=rc, eval_wall_s=round(time.time() - t0, 2))
    write_json(record_path, record)
    return 'done' if rc == 0 else 'failed'


def write_text(path: str, text: str):
    """Atomically (a temporary file, then a rename), as pretrained.atomic_write: this file imports no project module,
    so that the grid's bookkeeping runs without torch."""
    tmp = path + '.part'
    with open(tmp, 'w') as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj):
    write_text(path, json.dumps(obj, indent=1))


def evaluated(args, name: str, seed: int) -> bool:
    """For the estimate: the run has an evaluation of this backbone in --out or in --records (whether by the same
    commands, run_one decides)."""
    folders = [run_dir(args, name, seed)] + ([records_dir(args, name, seed)] if args.records else [])
    return any(has_judge(folder) and read_record(args, folder) for folder in folders)


def estimate_seconds(args, name: str, autocast: str) -> float:
    flags = RUNS[name]
    given = lambda flag: flags[flags.index(flag) + 1] if flag in flags else None
    task = 'text-to-image' if '--t2i' in flags else 'class-to-image'
    ce_only = all((default if given(flag) is None else float(given(flag))) == 0
                  for flag, default in zip(('--lambda_sen', '--lambda_cap'), DEFAULT_LAMBDAS[task]))
    kind = 'ce' if ce_only else 'rollout' if (given('--tokens') or DEFAULT_TOKENS[task]) == 'rollout' else 'semantic'
    step = STEP_S[autocast][kind] * args.batch_size / 16
    images = 2 * (args.n_texts if '--t2i' in flags else 10 * args.per_class)  # "before" and "after"
    return START_S + args.steps * step + images * EVAL_S_PER_IMAGE[autocast]


# -----------------------------------------------------------------------------
# the report


def collect(args, name: str, which: str):
    """{metric: [value per seed that has one]} of one row, and the seeds that have results."""
    values, seeds = {}, []
    for seed in args.seed_list:
        out = run_dir(args, name, seed)
        if not is_cached(args, name, seed):  # only what this grid's own commands made counts
            continue
        results, record = read_json(os.path.join(out, 'eval.json')), read_record(args, out)
        seeds.append(seed)
        row = dict(results[which])
        if which == 'after':
            row.update({k: record.get(k) for k in ('trainable', 'train_s', 'peak_mb')})
            row['machine'] = machine(record)
            config = read_json(os.path.join(out, 'config.json')) or {}
            if row['trainable'] is not None and config.get('var_parameters'):
                row['trainable_pct'] = 100 * row['trainable'] / config['var_parameters']
            row.update(gradient_record(os.path.join(out, 'log.jsonl')))
        for k, v in row.items():
            values.setdefault(k, {})[seed] = v
    return values, seeds


def gradient_record(log_path: str) -> dict:
    """From a run's log.jsonl: the median over its logged steps of each CLIP level's gradient norm over CE's (the
    weighted terms, before any balancing) and the percentage of logged steps where the clip bound; {} without one."""
    rows = []
    try:
        with open(log_path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a torn line (a run killed mid-write)
                    continue
    except OSError:
        return {}
    rows = [r for r in rows if isinstance(r, dict) and r.get('grad_ce')]
    if not rows:
        return {}
    record = {'clipped_pct': 100 * statistics.fmean(bool(r.get('clipped')) for r in rows)}
    for level in ('sen', 'cap'):
        ratios = [r[f'grad_{level}'] / r['grad_ce'] for r in rows if f'grad_{level}' in r]
        if ratios:
            record[f'{level}_over_ce'] = statistics.median(ratios)
    return record


def mean_std(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def cell(values: dict, metric: str) -> str:
    """mean ± std over seeds, and [the mean over seeds of world.evaluate's standard error] where it reports one."""
    m, s = mean_std(list(values.get(metric, {}).values()))
    if m is None:
        return '–'
    fmt = METRICS[metric][2]
    if metric in ('trainable', 'trainable_pct') or s is None:
        text = fmt.format(m)
    else:
        text = f'{fmt.format(m)} ± {fmt.format(s)}'
    se, _ = mean_std(list(values.get(metric + '_se', {}).values()))
    return text if se is None else f'{text} [{fmt.format(se)}]'


def verdict(a: dict, b: dict, metric: str):
    """Does a beat b on metric, as the paper finds? Paired over the seeds both have (for a machine-bound figure, the
    seeds whose two runs ran on one machine): (text, the verdict). The verdict is 'agrees' or 'disagrees' only where
    a paired t-test over two or more seeds rejects no difference at 5% (two-sided); else 'noise' (within it), 'one
    seed' (no error bar) or None (no results)."""
    seeds = sorted(set(a.get(metric, {})) & set(b.get(metric, {})))
    seeds = [s for s in seeds if a[metric][s] is not None and b[metric][s] is not None]
    if not seeds:
        return 'no results yet', None
    if metric in MACHINE_BOUND:  # a time or a memory compares only between runs on one machine
        seeds = [s for s in seeds if a['machine'].get(s) is not None and a['machine'][s] == b['machine'].get(s)]
        if not seeds:
            return 'no seed ran both runs on one machine', None
    fmt = METRICS[metric][2]
    diffs = [a[metric][s] - b[metric][s] for s in seeds]
    d = statistics.fmean(diffs)
    ma, mb = statistics.fmean(a[metric][s] for s in seeds), statistics.fmean(b[metric][s] for s in seeds)
    better = d < 0 if METRICS[metric][1] == 'lower' else d > 0
    text = f'{fmt.format(ma)} vs {fmt.format(mb)}, difference {d:+.4g}'
    leaning = 'the paper\'s way' if better else 'against the paper' if d != 0 else 'neither way'
    if len(seeds) == 1:
        return f'{text} (1 seed: no error bar, no verdict; leans {leaning})', 'one seed'
    se = statistics.stdev(diffs) / math.sqrt(len(diffs))
    critical = stats.t.ppf(0.975, len(diffs) - 1)  # the paired t-test's threshold at 5%, two-sided
    if abs(d) <= critical * se:
        return f'{text} (paired SE {se:.2g}, {len(seeds)} seeds: within noise; leans {leaning})', 'noise'
    return (f'{text} (paired SE {se:.2g}, {len(seeds)} seeds, beyond {critical:.2f} SE): '
            + ('**agrees**' if better else '**disagrees**')), ('agrees' if better else 'disagrees')


def default_loss(task: str) -> str:
    (lambda_sen, lambda_cap), tokens = DEFAULT_LAMBDAS[task], DEFAULT_TOKENS[task]
    return f'{task}: lambda_sen {lambda_sen:g}, lambda_cap {lambda_cap:g}, --tokens {tokens}'


def report(args, argv, status: dict, started: float) -> str:
    now = datetime.datetime.now().strftime('%Y-%m-%d %H:%M')
    records = [read_record(args, run_dir(args, n, s)) for n in needed_runs(args) for s in args.seed_list]
    records = [r for r in records if r]
    run_seconds = sum((r.get('train_wall_s') or 0) + (r.get('eval_wall_s') or 0) for r in records)
    counts = {k: sum(v == k for v in status.values()) for k in ('done', 'cached', 'failed')}
    total = len(needed_runs(args)) * len(args.seed_list)
    resolved = ['--backbone', args.backbone, '--tables', ','.join(args.table_list),
                '--seeds', ','.join(map(str, args.seed_list)), '--steps', str(args.steps),
                '--batch_size', str(args.batch_size), '--lr', str(args.lr), '--lr_lora', str(args.lr_lora),
                '--lr_full', str(args.lr_full), '--lora_rank', str(args.lora_rank), '--warmup_steps', str(args.warmup_steps),
                '--shapes_n', str(args.shapes_n), '--per_class', str(args.per_class), '--n_texts', str(args.n_texts),
                '--device', args.device, '--jobs', str(args.jobs), '--threads', str(args.threads), '--out', args.out,
                '--report', args.report] + (['--records', args.records] if args.records else [])
    parent_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    lines = [
        '# MVP\'s tables in miniature: the shapes world', '',
        f'Written by `{shown(["-m", "world.experiments", *argv])}` on {now}, which with every setting spelled out is',
        '', f'    {shown(["-m", "world.experiments", *resolved])}', '',
        f'{total} runs (settings x seeds): {counts["done"]} run now, {counts["cached"]} found done by the same commands'
        f'{f" (in {args.out}, or kept in {args.records} by an earlier session)" if args.records else ""}, '
        f'{counts["failed"]} failed, {total - len(status)} not run yet. This invocation took {(time.time() - started) / 60:.1f} min; the runs\' own '
        f'training + evaluation processes took {run_seconds / 60:.1f} min in all ({args.jobs} at a time, '
        f'{args.threads} torch thread(s) each, {os.cpu_count()} CPU cores; {platform.platform()}, '
        f'Python {platform.python_version()}).', '',
        '## How to read this', '',
        f'- Backbone `{args.backbone}` (its files\' SHA-256 begins {args.fingerprint}: only runs made with these files '
        f'count); every run trains {args.steps} steps at batch {args.batch_size} on '
        f'{args.shapes_n} shapes images (lr {args.lr} for prompts, {args.lr_lora} for LoRA rank {args.lora_rank}, '
        f'{args.lr_full} for full fine-tuning; {args.warmup_steps} warm-up steps, then cosine decay), with MVP\'s '
        f'defaults unless the row says otherwise: frame prompts, tau 20, the first-scale prompt off for '
        f'class-to-image and on for text-to-image, the semantic loss at its default (beta 0.6; '
        f'{default_loss("class-to-image")}; {default_loss("text-to-image")}). LoRA and full fine-tuning use the same '
        f'loss and steps as MVP.',
        f'- Cells are mean ± sample std over the seeds ({", ".join(map(str, args.seed_list))}); a seed sets the '
        f'training run and the evaluation (its samples and its held-out reference images). In brackets: the '
        f'standard error within one seed\'s evaluation (over its samples; bootstrap for FD), averaged over '
        f'the seeds: what the evaluation\'s sample size alone leaves uncertain.',
        f'- FD_judge: Fréchet distance between {10 * args.per_class} class-to-image samples ({args.per_class} per '
        f'class) or {args.n_texts} text-to-image samples and as many held-out renders, in the pooled features of the '
        f'judge (a CNN trained on renders that no loss uses, the miniature\'s Inception: not comparable with the '
        f'paper\'s FID, only the direction is). class acc, IS_judge: the share of class-to-image samples the judge '
        f'assigns to their class, and the Inception score of its class softmax. attribute acc: the share of the '
        f'caption\'s shape, colour, texture and background the judge reads in the image; "of it, shape", texture: '
        f'those attributes alone. FD_clip and CLIP-score are the training CLIP\'s own (100 x cosine of image and '
        f'caption): a loss that games that CLIP moves them without better samples, so no verdict uses them.',
        '- "VAR (no tuning)" / "untuned" rows: world.evaluate\'s "before" model of that run (the plain VAR; for '
        'text-to-image the least-squares text projection with zero prompts).',
        '- trainable params: what train.py trains (printed by it). train s: seconds of the training loop (the last '
        'row of log.jsonl), not process start-up or evaluation; with several runs at a time they share the CPU, so '
        'it grows with the load a run saw (the All runs table\'s load: 2.0 is two runs on two cores; a row whose '
        'seeds ran beside other jobs reads slower than its setting is). A comparison of train s pairs only the seeds '
        'whose two runs ran on one machine (the All runs table\'s CPU).',
        f'- peak RSS MB (Table 4): the peak resident memory of the whole train.py process (ru_maxrss from wait4): '
        f'Python, torch, the frozen VQVAE, VAR and CLIP, the data and the training itself, the CPU\'s analogue of '
        f'the paper\'s peak GPU memory. A child\'s ru_maxrss is never below the RSS its launcher had when it started '
        f'it (this report\'s process: {parent_mb:.0f} MB; the grid\'s launcher is the same program). Like a time, it '
        f'compares only between runs on one machine.',
        '- Beside each table, the paper\'s finding, and per comparison whether the miniature agrees: the mean paired '
        'difference over the seeds both runs have, a verdict where a paired t-test over two or more seeds rejects no '
        'difference at 5%, else "within noise" or "no verdict" with the way it leans. Nothing here was tuned to '
        'agree.', '']
    all_verdicts = []
    for sec in sections(args):
        metrics = sec['metrics']
        lines += [f'## {sec["title"]}', '', f'Paper: {sec["paper"]}', '',
                  '| | ' + ' | '.join(METRICS[m][0] for m in metrics) + ' |', '|---' * (len(metrics) + 1) + '|']
        rows = {}
        for label, name, which in sec['rows']:
            values, seeds = collect(args, name, which)
            rows[label] = values
            suffix = '' if len(seeds) == len(args.seed_list) else f' ({len(seeds)} of {len(args.seed_list)} seeds)'
            lines.append(f'| {label}{suffix} | ' + ' | '.join(cell(values, m) for m in metrics) + ' |')
        lines += ['', 'Paper vs here:', '']
        for a, b, metric in sec['claims']:
            text, outcome = verdict(rows[a], rows[b], metric)
            all_verdicts.append((sec['title'], a, b, metric, text, outcome))
            lines.append(f'- {a} beats {b} on {METRICS[metric][0]}: {text}')
        lines += ['', f'Commands (seed {args.seed_list[0]}; the other seeds change `--seed`, the run folder and, for the '
                  f'random placement, `--placement_seed`):', '']
        done = set()
        for _, name, _ in sec['rows']:
            if name not in done:
                done.add(name)
                train_cmd, eval_cmd = commands(args, name, args.seed_list[0])
                lines += [f'    {shown(train_cmd)}', f'    {shown(eval_cmd)}']
        lines.append('')
    count = lambda outcome: sum(v[5] == outcome for v in all_verdicts)
    summary = [f'## Summary: of {len(all_verdicts)} comparisons with the paper, {count("agrees")} agree and '
               f'{count("disagrees")} disagree beyond noise; {count("noise")} lie within noise, {count("one seed")} '
               f'have one seed and {count(None)} no results yet', '',
               'A verdict needs two or more seeds and a paired t-test that rejects no difference at 5% (two-sided). '
               f'With {len(all_verdicts)} comparisons, about one in twenty verdicts can be chance; none is corrected '
               'for the others.', '']
    for outcome, heading in (('disagrees', 'Where the miniature disagrees'), ('agrees', 'Where it agrees')):
        found = [v for v in all_verdicts if v[5] == outcome]
        if found:
            summary += [f'{heading}:', '']
            summary += [f'- {title}: {a} vs {b} on {METRICS[metric][0]}: {text.split(": **")[0]}'
                        for title, a, b, metric, text, _ in found] + ['']
    lines[lines.index('## How to read this'):lines.index('## How to read this')] = summary

    machines = list(dict.fromkeys(machine(r) for r in records if machine(r)))
    letter = {m: chr(ord('A') + i) for i, m in enumerate(machines)}  # a short name per CPU, explained under the table
    lines += ['## All runs', '', '| run | seed | status | FD_clip before / after | class or attribute acc after | '
              'trainable | train s | peak RSS MB | train + eval wall s | CPU | mean load |', '|---' * 11 + '|']
    for name in needed_runs(args):
        for seed in args.seed_list:
            out = run_dir(args, name, seed)
            record, results = read_record(args, out), read_json(os.path.join(out, 'eval.json'))
            state = status.get((name, seed), 'not run')
            fd = acc = '–'
            if results and record.get('eval_rc') == 0:
                fd = f'{results["before"]["FD_clip"]:.2f} / {results["after"]["FD_clip"]:.2f}'
                after = results['after']
                acc = f'{after.get("class_accuracy", after.get("attribute_accuracy")):.3f}'
            wall = (record.get('train_wall_s') or 0) + (record.get('eval_wall_s') or 0)
            fmt = lambda v, f: '–' if v is None else f.format(v)
            lines.append(f'| {name} | {seed} | {state} | {fd} | {acc} | {fmt(record.get("trainable"), "{:,}")} | '
                         f'{fmt(record.get("train_s"), "{:.1f}")} | {fmt(record.get("peak_mb"), "{:.0f}")} | '
                         f'{wall:.0f} | {letter.get(machine(record), "–")} | {fmt(record.get("load"), "{:.1f}")} |')
    lines += ['', 'CPU: ' + '; '.join(f'{k}: {m}' for m, k in letter.items()) +
              ('; –: not recorded' if any(not r.get('cpu') for r in records) else '') + '. mean load: the machine\'s '
              '1-minute load average over the run\'s training; above --jobs x --threads, other work shared the CPU and '
              'train s is longer than the run alone would take. train s compares only between runs on one CPU at one '
              'load.', '',
              f'Each run\'s folder `{args.out}/<run>/seed<s>/` holds its checkpoint, train.log, log.jsonl, '
              f'eval.log, eval.json and run.json (the commands, exit codes, times, peak memory, CPU, load and, for runs '
              f'made from 2026-12-07 on, the commit of the code that made it).', '']
    return '\n'.join(lines)


def machine(record: dict):
    """The CPU a run ran on and the autocast train.py chose there (one CPU name can cover models with and without bf16
    matrix units), as the report names it; None for a record from before the grid recorded the CPU."""
    if not record.get('cpu'):
        return None
    autocast = f', autocast {record["autocast"]}' if record.get('autocast') else ''
    return f'{record["cpu"]} ({record["cores"]} cores{autocast})'


def write_report(args, argv, status, started):
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    write_text(args.report, report(args, argv, status, started))


# -----------------------------------------------------------------------------


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args(argv)
    started = time.time()
    # seed-major order: a third of the way through, every table has one seed
    grid = [(name, seed) for seed in args.seed_list for name in needed_runs(args)]
    chosen = [] if args.report_only else [(name, seed) for name, seed in grid if name in args.run_list]
    todo = [(name, seed) for name, seed in chosen if not evaluated(args, name, seed)]
    hours = {a: sum(estimate_seconds(args, name, a) for name, _ in todo) / 3600 for a in STEP_S}
    parallel = max(1, min(args.jobs, os.cpu_count() or 1))
    print(f'{len(grid)} runs ({len(needed_runs(args))} settings x {len(args.seed_list)} seeds) for tables '
          f'{", ".join(args.table_list)}, {len(chosen)} of them chosen to run, {len(chosen) - len(todo)} of those '
          f'evaluated already: {2 * len(todo)} commands to run, estimated {hours["bfloat16"]:.1f} h of run time, '
          f'~{hours["bfloat16"] / parallel:.1f} h with {args.jobs} at a time (at {STEP_S["bfloat16"]["semantic"]} s '
          f'per step at batch 16, {EVAL_S_PER_IMAGE["bfloat16"]} s per evaluated image, measured on a 2-core CPU with '
          f'bf16 autocast, two runs at a time at one thread each; ~{hours["float32"] / parallel:.1f} h, estimated, on a '
          f'2-core CPU without bf16 units, which trains in fp32)')
    cross_domain = any('--data' in RUNS[name] for name, _ in chosen)
    if args.dry_run:
        if cross_domain:
            print(shown(domain_export_command(args, domain_folder(args))))
        for name, seed in chosen:
            for cmd in commands(args, name, seed):
                print(shown(cmd))
        return 0
    if not os.path.isdir(args.backbone):
        raise SystemExit(f'error: no backbone folder at {args.backbone} (make one with python -m world.pretrain)')
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED='1',
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get('PYTHONPATH')])))
    if cross_domain and not os.path.isdir(domain_folder(args)):
        export_domain(args, env)
    if args.records:
        restore_records(args, grid)
    status, lock, load = {}, threading.Lock(), LoadSampler()
    status.update({run: 'cached' for run in grid if run not in chosen and is_cached(args, *run)})

    def job(name, seed):
        t0 = time.time()
        result = run_one(args, name, seed, env, load)
        if args.records and result != 'failed':
            copy_records(run_dir(args, name, seed), records_dir(args, name, seed))
        with lock:
            status[(name, seed)] = result
            print(f'[{len(status)}/{len(grid)}] {name} seed {seed}: {result} ({time.time() - t0:.0f}s)'
                  + (f'; see {run_dir(args, name, seed)}/*.log' if result == 'failed' else ''), flush=True)
            write_report(args, argv, status, started)

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for future in [pool.submit(job, name, seed) for name, seed in chosen]:
            future.result()
    write_report(args, argv, status, started)
    failed = [k for k, v in status.items() if v == 'failed']
    print(f'wrote {args.report}; {len(failed)} failed' + (f': {failed}' if failed else ''))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
