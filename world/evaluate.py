"""
Score a tuned run on the shapes world against the same backbone without MVP, with a judge no loss trains against.

    python -m world.evaluate --ckpt runs/quickstart

Every figure comes from the judge (world/shapes.py: a CNN trained on renders, used by no loss), the miniature's
Inception. Class-to-image: the class it recognises in the samples, FD_judge (the Fréchet distance of its pooled
features to held-out renders'), IS_judge, precision and recall in its space. Text-to-image, for held-out captions:
the share of each caption's attributes (shape, colour, texture, background) it reads in the sample. The training
CLIP's FD_clip and CLIP-score are a second column: a loss that games that CLIP moves them without better samples.
"before" is the same backbone with nothing trained: the plain VAR for class-to-image; zero prompts (or a zero LoRA
update, or the pretrained VAR for full fine-tuning) and the least-squares text projection for text-to-image. A run
on an image folder of the world's classes (Table 8's upside-down domain) is scored against the folder's test split.

    python -m world.evaluate --ckpt runs/t2i --caption "a striped red heart on a navy background"   # one caption
    python -m world.evaluate --semantic_signal checkpoints/shapes/mvp_c2i   # Eq. 8's signal on every differentiable path
    python -m world.evaluate --partial_sums checkpoints/shapes partial_sums.png   # renders decoded up to each scale
"""
import argparse
import os
import sys
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from clip_loss import SemanticLoss, contrastive_loss, inter_anchor
from data import FolderDataset, build_dataset, collate
from device import DTYPES, set_conv_layout
from fid import ClipFeatures, clip_score, feature_statistics, frechet_distance, inception_score, precision_recall
from mvp import (MVP, build_run, check_sampling, first_scale_fixed, generate_images, init_text_projection, load_run,
                 read_run)
from pretrained import check_writable, load_backbone, save_grid, to_uint8, write_json
from update import norm_of, term_gradients
from world import shapes


def fd_with_se(feats: np.ndarray, reference_stats, n_boot: int = 50, seed: int = 0):
    """The Fréchet distance of features (N, D) to the reference statistics, and its standard error over the generated
    samples (the std of FD over bootstrap resamples)."""
    fd_of = lambda f: frechet_distance(*feature_statistics(f), *reference_stats)
    rng = np.random.default_rng(seed)
    boot = [fd_of(feats[rng.integers(0, len(feats), len(feats))]) for _ in range(n_boot)]
    return fd_of(feats), float(np.std(boot))


def mean_with_se(values) -> tuple:  # (mean, standard error of the mean)
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def reference_set(data: str, n: int, seed: int):
    """The held-out images a run's samples are compared with, uint8 (n, H, W, 3), and their shapes-world items: renders
    of the world's test split, or n images drawn (seeded) from DATA/test of an image folder of the world's classes
    (items with a label only), center-cropped as data.py does for evaluation."""
    if data == 'shapes':
        return shapes.rendered('test', n, seed)
    if not os.path.isdir(os.path.join(data, 'test')):
        raise FileNotFoundError(f'no held-out split {os.path.join(data, "test")}: the samples are compared with the '
                                f'training folder\'s test/<class>/<images>')
    dataset = FolderDataset(data, 'test', shapes.IMAGE_SIZE, train=False)
    if dataset.class_names != shapes.CLASS_NAMES:  # the judge names the world's classes, in their order
        raise ValueError(f'{data}: its classes {dataset.class_names[:4]}... are not the shapes world\'s '
                         f'{shapes.CLASS_NAMES[:4]}...: the judge cannot score them')
    chosen = np.random.default_rng(seed).choice(len(dataset), size=n, replace=n > len(dataset))
    images = to_uint8(torch.stack([dataset.load_image(int(i)) for i in chosen]).add(1).mul(0.5))
    return images, [{'label': dataset.samples[int(i)][1]} for i in chosen]


def before_and_after(config: dict, vae, var, clip, parts, device) -> list:
    """[(name, VAR, trained parts)] for "before" and "after": before is the same backbone with nothing trained (the
    plain VAR in class-to-image, a fresh copy for LoRA and full fine-tuning, which change the VAR itself; zero prompts
    and the least-squares text projection in text-to-image), after the run."""
    if not config['t2i']:
        plain = var if config['prompt'] in ('mvp', 'prefilled') else load_backbone(config['backbone'], config['depth'],
                                                                                 config.get('cache_dir'), device)[1]
        return [('before', plain, None), ('after', var, parts)]
    _, plain, _, untrained = build_run(config, device, need_clip=False)  # the same run's modules, before any step:
    if untrained.prompt is not None:
        untrained.prompt.tokens.data.zero_()  # zero prompts (MVP's init; LoRA starts at a zero update) ...
    run_dataset = build_dataset(argparse.Namespace(**config), vae.image_size)  # ... and the least-squares text projection,
    init_text_projection(untrained.text_cond, clip, plain, run_dataset)  # fitted on the run's own training texts
    return [('before', plain, untrained), ('after', var, parts)]


@torch.no_grad()
def evaluate_run(ckpt: str, per_class: int = 50, n_texts: int = 500, seed: int = 0, cfg_scale: float = 1.5,
                 device='cpu', dtype=torch.float32) -> dict:
    """{"before": figures, "after": figures} of a run, each figure with its standard error over the samples where it
    has one (FD: bootstrap over the samples)."""
    config, vae, var, clip, parts = load_run(ckpt, device, need_clip=True)
    if config['t2i'] and config['data'] != 'shapes':
        raise ValueError(f'{ckpt}: text-to-image is scored on the shapes world\'s captions (--data shapes), not on '
                         f'{config["data"]}')
    set_conv_layout(vae, dtype)
    judge = shapes.load_judge(config['backbone']).to(device)
    features = ClipFeatures(pretrained=os.path.join(config['backbone'], 'clip'), device=device)
    n = per_class * var.num_classes if not config['t2i'] else n_texts
    reference, items = reference_set(config['data'], n, seed)
    reference_feats = shapes.judged(judge, shapes.to_input(reference, device))[0]
    reference_judge, reference_clip = feature_statistics(reference_feats), feature_statistics(features.images(reference))
    labels = torch.arange(n, device=device) % var.num_classes  # every class equally often (the test split's order)
    captions = [shapes.caption(a) for a in items] if config['t2i'] else None
    results = {}
    for name, model, tuned in before_and_after(config, vae, var, clip, parts, device):
        conditions = dict(texts=captions) if config['t2i'] else dict(labels=labels)
        images = torch.cat([generate_images(vae, model, tuned, clip, cfg_scale=cfg_scale, seed=seed + i, dtype=dtype,
                                            **{k: v[i:i + 100] for k, v in conditions.items()})
                            for i in range(0, n, 100)])
        x, arrays = images * 2 - 1, to_uint8(images)
        feats, class_logits = shapes.judged(judge, x)
        row = dict(zip(('FD_judge', 'FD_judge_se'), fd_with_se(feats, reference_judge, seed=seed)))
        if config['t2i']:
            right_NA = (shapes.read(judge, x) == shapes.targets(items).to(device)).float().cpu().numpy()
            row['attribute_accuracy'], row['attribute_accuracy_se'] = mean_with_se(right_NA.mean(axis=1))
            for a, column in zip(shapes.ATTRIBUTES, right_NA.T):
                row[f'{a}_accuracy'], row[f'{a}_accuracy_se'] = mean_with_se(column)
        else:
            row['class_accuracy'], row['class_accuracy_se'] = mean_with_se(class_logits.argmax(1) == labels.cpu().numpy())
            row['IS_judge'] = inception_score(class_logits)[0]
            row['precision'], row['recall'] = precision_recall(reference_feats, feats)
        clip_images = features.images(arrays)
        row['FD_clip'], row['FD_clip_se'] = fd_with_se(clip_images, reference_clip, seed=seed)
        if config['t2i']:
            row['clip_score'] = clip_score(clip_images, features.texts(captions))
        results[name] = row
    return results


@torch.no_grad()
def score_caption(ckpt: str, caption: str, n: int = 50, seed: int = 0, cfg_scale: float = 1.5, device='cpu',
                  dtype=torch.float32) -> dict:
    """One caption, n samples before and after a text-to-image run: {name: {attribute: samples in which the judge
    reads the value the caption names}}, for each attribute it names."""
    config, vae, var, clip, parts = load_run(ckpt, device, need_clip=True)
    if config['data'] != 'shapes' or not config['t2i']:
        raise ValueError(f'--caption scores a text-to-image run of the shapes world (--data shapes --t2i), not {ckpt}')
    named = shapes.attributes_named(caption)
    if not named:
        raise ValueError(f'--caption {caption!r} names no shape, colour, texture or background of the shapes world')
    judge = shapes.load_judge(config['backbone']).to(device)
    scores = {}
    for name, model, tuned in before_and_after(config, vae, var, clip, parts, device):
        images = generate_images(vae, model, tuned, clip, texts=[caption] * n, cfg_scale=cfg_scale, seed=seed,
                                 dtype=dtype)
        read_NA = shapes.read(judge, images * 2 - 1).cpu()
        scores[name] = {a: int((read_NA[:, i] == shapes.VALUES[a].index(named[a])).sum())
                        for i, a in enumerate(shapes.ATTRIBUTES) if a in named}
    return scores


PATHS = (('soft tokens, T = 0.5', 'soft', 0.5), ('soft tokens, T = 1', 'soft', 1.0), ('soft tokens, T = 2', 'soft', 2.0),
         ('straight-through Gumbel', 'gumbel', 1.0), ('straight-through argmax', 'argmax', 1.0),
         ('free-running rollout', 'rollout', 1.0))  # train.py's --tokens and --soft_temperature


def semantic_signal(run: str, batches: int = 3, batch_size: int = 16, seed: int = 0,
                    beta: Optional[float] = None) -> str:
    """Whether Eq. 8's losses carry a signal, at the start of a run's training (zero prompts; text-to-image: the
    least-squares projection) on the untuned VAR, for every differentiable path (clip_loss.py): the sentence loss on
    I_sen and the caption loss on I_cap against log(batch), what a contrastive loss pays for guessing; how often CLIP
    names the class of I_sen; each term's gradient at the trainable parameters beside CE's, and its cosine with CE's.
    The real images and their own tokens give the losses' floor. beta: I_sen's scale kappa = floor(beta K), the
    run's own unless given."""
    config = dict(read_run(run)[0], **({} if beta is None else {'beta': beta}))
    if config['data'] != 'shapes':
        raise ValueError(f'--semantic_signal {run}: a run on --data {config["data"]}; this measures runs on the shapes world')
    vae, var, clip, parts = build_run(config, 'cpu', need_clip=True)
    dataset = shapes.Dataset('train', config['shapes_n'])
    floor = SemanticLoss(clip, vae, config['beta'])
    if config['t2i']:
        init_text_projection(parts.text_cond, clip, var, dataset)
    params = list(parts.parameters())
    order = np.random.default_rng(seed).permutation(len(dataset))[:batches * batch_size]
    class_texts = clip.encode_text([shapes.sentence(c) for c in range(var.num_classes)])
    one_hot = lambda idx_BL: F.one_hot(idx_BL, vae.vocab_size).float() * 1e4  # logits whose softmax is exactly one-hot
    rows = {}
    for b in range(batches):
        images, labels, sentences, captions = collate([dataset[int(i)] for i in order[b::batches]])
        idx = vae.img_to_idx(images)
        decoded = {'the real images': (images, images),
                   "the image's own tokens": floor.decode_sen_cap(one_hot(torch.cat(idx, 1)))}
        for name, (img_sen, img_cap) in decoded.items():
            with torch.no_grad():
                feats = clip.encode_image(img_sen)
                row = rows.setdefault(name, {})
                row.setdefault('sen', []).append(
                    contrastive_loss(feats, clip.encode_text(sentences), sentences, clip.logit_scale()).item())
                row.setdefault('cap', []).append(contrastive_loss(
                    clip.encode_image(img_cap), clip.encode_text(captions), captions, clip.logit_scale()).item())
                row.setdefault('named', []).append(((feats @ class_texts.T).argmax(1) == labels).float().mean().item())
        for name, tokens, temperature in PATHS:
            semantic = SemanticLoss(clip, vae, config['beta'], 1.0, 1.0, temperature, tokens)
            model = MVP(vae, var, parts, clip, semantic, config['cond_drop'], first_scale_fixed(config))
            torch.manual_seed(seed + b)  # the condition drop and the Gumbel draws
            _, losses = model(idx, labels, sentences, captions)
            grads = term_gradients(losses, params)
            norms = {term: norm_of(g).item() for term, g in grads.items()}
            dot = lambda a, c: sum((x * y).sum() for x, y in zip(grads[a], grads[c])).item()
            row = rows.setdefault(name, {})
            for key, value in (('sen', losses['sen'].item()), ('cap', losses['cap'].item()),
                               ('g_ce', norms['ce']), ('g_sen', norms['sen'] / norms['ce']),
                               ('g_cap', norms['cap'] / norms['ce']),
                               ('cos_sen', dot('ce', 'sen') / (norms['ce'] * norms['sen'] + 1e-12)),
                               ('cos_cap', dot('ce', 'cap') / (norms['ce'] * norms['cap'] + 1e-12))):
                row.setdefault(key, []).append(value)
    task = 'text-to-image' if config['t2i'] else 'class-to-image'
    lines = [f'{task}, {batches} batches of {batch_size} training images, log({batch_size}) = {np.log(batch_size):.2f}; '
             f'I_sen from scales 1..{inter_anchor(config["beta"], len(vae.patch_nums))} of {len(vae.patch_nums)}',
             '| I_sen and I_cap from | sentence loss | caption loss | CLIP names the class of I_sen | gradient norm CE | '
             'sentence / CE | caption / CE | cos(CE, sentence) | cos(CE, caption) |', '|---' * 9 + '|']
    formats = {'sen': '{:.2f}', 'cap': '{:.2f}', 'named': '{:.0%}', 'g_ce': '{:.3g}', 'g_sen': '{:.2g}',
               'g_cap': '{:.2g}', 'cos_sen': '{:+.2f}', 'cos_cap': '{:+.2f}'}
    for name, row in rows.items():
        cells = [fmt.format(np.mean(row[key])) if key in row else '-' for key, fmt in formats.items()]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


@torch.no_grad()
def partial_sums_figure(backbone: str, path: str, n: int = 8):
    """A PNG: n held-out renders (top row) and, below, the image decoded from its own tokens up to scale 1, 2, ..., K
    (the last row is the VQVAE's reconstruction): what I_sen and I_cap look like when the predictions are exact."""
    vae, _ = load_backbone(backbone)
    images = shapes.to_input(shapes.rendered('test', n)[0])
    rows = [images] + [vae.fhat_to_img(f_hat) for f_hat in vae.img_to_partial_sums(images)]
    save_grid(torch.cat(rows).add(1).mul(0.5), path, nrow=n)


def format_results(results: dict) -> str:
    """A markdown table, each figure as value ± its standard error where it has one."""
    keys = [k for k in results['before'] if not k.endswith('_se')]
    lines = ['| | ' + ' | '.join(keys) + ' |', '|---' * (len(keys) + 1) + '|']
    for name, row in results.items():
        cells = [f'{row[k]:.3f} ± {row[k + "_se"]:.3f}' if k + '_se' in row else f'{row[k]:.3f}' for k in keys]
        lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description='Evaluate an MVP run on the shapes world (before vs after tuning).')
    p.add_argument('--ckpt', help='a run of train.py on the shapes backbone (its ckpt.pt, prompt folder or repo id)')
    p.add_argument('--semantic_signal', metavar='RUN', help='instead: Eq. 8\'s losses and gradients at the start of a '
                   'run\'s training (its settings, zero prompts) for every differentiable path, and their floor')
    p.add_argument('--beta', type=float, default=None, help='with --semantic_signal: kappa = floor(beta K), I_sen\'s '
                   'scale (default: the run\'s)')
    p.add_argument('--partial_sums', nargs=2, metavar=('BACKBONE', 'PNG'), help='instead: draw held-out renders '
                   'decoded from their own tokens up to every scale')
    p.add_argument('--per_class', type=int, default=50, help='class-to-image samples per class')
    p.add_argument('--n_texts', type=int, default=500, help='text-to-image: held-out captions')
    p.add_argument('--caption', default=None, help='with --ckpt of a text-to-image run: instead, this one '
                   'caption\'s samples, each attribute it names counted where the judge reads it')
    p.add_argument('--n', type=int, default=50, help='with --caption: samples before and after')
    p.add_argument('--cfg', type=float, default=1.5)
    p.add_argument('--dtype', default='fp32', choices=('fp32', 'bf16'), help='autocast dtype of sampling (the '
                   'README\'s figures: fp32)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', default=None, help='also write the results here')
    args = p.parse_args(argv)
    for name in ('per_class', 'n_texts', 'n'):
        if getattr(args, name) < 1:
            p.error(f'--{name} must be at least 1, got {getattr(args, name)}')
    if args.beta is not None and not 0 < args.beta < 1:
        p.error(f'--beta must lie between 0 and 1, got {args.beta}')
    try:
        check_sampling(args.cfg, top_k=0, top_p=1)
    except ValueError as e:
        p.error(str(e))
    if args.json:
        check_writable(args.json, '--json', create=True)
    if args.partial_sums:
        check_writable(args.partial_sums[1], '--partial_sums', create=True)
    if args.semantic_signal:
        print(semantic_signal(args.semantic_signal, seed=args.seed, beta=args.beta))
        return
    if args.partial_sums:
        partial_sums_figure(*args.partial_sums)
        print(f'wrote {args.partial_sums[1]}')
        return
    if not args.ckpt:
        p.error('--ckpt, --semantic_signal or --partial_sums is required')
    if args.caption is not None:
        scores = score_caption(args.ckpt, args.caption, args.n, args.seed, args.cfg, dtype=DTYPES[args.dtype])
        for name, row in scores.items():
            print(f'{name}: ' + ', '.join(f'{a} {right}/{args.n}' for a, right in row.items()))
        if args.json:
            write_json(args.json, scores)
        return
    results = evaluate_run(args.ckpt, args.per_class, args.n_texts, args.seed, args.cfg, dtype=DTYPES[args.dtype])
    print(format_results(results))
    if args.json:
        write_json(args.json, results)


if __name__ == '__main__':
    try:
        main()
    except (ValueError, FileNotFoundError, ConnectionError) as e:
        sys.exit(f'error: {e}')
