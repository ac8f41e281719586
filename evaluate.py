"""
Score a tuned run on the shapes world, against the same backbone without MVP.

    python evaluate.py --ckpt runs/quickstart/ckpt.pt

World v3 (--data world3): every figure from the judge (world3.Judge, trained on renders, used by no loss), the
miniature's Inception: class-to-image, the class it recognises in the samples, FD_judge, IS_judge, precision and
recall; text-to-image, the share of each held-out caption's attributes it reads in the sample. The training CLIP's
FD_clip is a second column. World v2 (--data shapes), until it retires:

Class-to-image: FD between samples and held-out renders in the tiny CLIP's feature space (FD_clip, lower is
better; never called FID: these are not Inception features) and the fraction of samples the shape classifier
recognises as their class. Text-to-image, for held-out captions: attribute accuracy (the fraction of the caption's
shape, colour, size, position and background that the image shows, read by shapes.read_attributes and the shape
classifier), CLIP-score (100 * cosine in the tiny CLIP) and FD_clip. "before" is the same backbone with nothing
trained: the plain VAR for class-to-image; zero prompts (or a zero LoRA update, or the pretrained VAR for full
fine-tuning) and the least-squares text projection for text-to-image.

    python evaluate.py --semantic_signal checkpoints/shapes   # Eq. 8's losses on images decoded in each way train.py offers
    python evaluate.py --coarse_probe checkpoints/shapes      # how much of the class, size, place the coarse scales hold
    python evaluate.py --prefix_probe checkpoints/shapes      # at which scale the VAR's samples part from the renders
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

import shapes
import world3
from clip_loss import FrozenClip, SemanticLoss, contrastive_loss, inter_anchor
from data import build_dataset, collate
from device import DTYPES, set_conv_layout
from fid import (ClipFeatures, clip_score, fd_clip, feature_statistics, frechet_distance, inception_score,
                 precision_recall)
from mvp import build_run, check_sampling, generate_images, init_text_projection, load_run
from pretrained import check_writable, load_backbone, load_clip, save_grid, to_uint8, write_json


def fd_with_se(feats: np.ndarray, reference_stats, n_boot: int = 50, seed: int = 0):
    """The Fréchet distance of features (N, D) to the reference statistics, and its standard error over the generated
    samples (the std of FD over bootstrap resamples)."""
    fd_of = lambda f: frechet_distance(*feature_statistics(f), *reference_stats)
    rng = np.random.default_rng(seed)
    boot = [fd_of(feats[rng.integers(0, len(feats), len(feats))]) for _ in range(n_boot)]
    return fd_of(feats), float(np.std(boot))


@torch.no_grad()
def classifier_features(classifier, images_uint8: np.ndarray) -> np.ndarray:
    """The shape classifier's pooled features (N, 128) of uint8 images: the space of FD_cls, a judge no loss trains
    against (the miniature's Inception), where FD_clip is the training CLIP's own."""
    return torch.cat([classifier.pooled(shapes.to_input(images_uint8[i:i + 250]))
                      for i in range(0, len(images_uint8), 250)]).double().numpy()


def mean_with_se(values) -> tuple:  # (mean, standard error of the mean)
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0


def held_out_images(data: str, items, image_size: int, n: int, seed: int) -> np.ndarray:
    """The run's held-out images, uint8 (n, H, W, 3): renders of the shapes world's test items, or n images drawn
    (seeded) from DATA/test of an image folder, center-cropped as data.py does for evaluation."""
    if data == 'shapes':
        return np.stack([shapes.render(a, image_size) for a in items])
    from data import FolderDataset
    if not os.path.isdir(os.path.join(data, 'test')):
        raise FileNotFoundError(f'no held-out split {os.path.join(data, "test")}: FD_clip compares samples with the '
                                f'training folder\'s test/<class>/<images>')
    dataset = FolderDataset(data, 'test', image_size, train=False)
    chosen = np.random.default_rng(seed).choice(len(dataset), size=n, replace=n > len(dataset))
    return to_uint8(torch.stack([dataset.load_image(int(i)) for i in chosen]).add(1).mul(0.5))


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
def evaluate_world3_run(config: dict, vae, var, clip, parts, per_class: int, n_texts: int, seed: int,
                        cfg_scale: float, device, dtype) -> dict:
    """World v3: every figure from the judge (world3.Judge, trained on renders, used by no loss): class-to-image,
    the class it recognises, FD_judge, IS_judge, precision and recall in its space; text-to-image, the fraction of
    held-out captions' attributes (shape, colour, texture, background) it reads in the samples, and FD_judge. The
    training CLIP's FD_clip is a second column."""
    judge = world3.load_judge(config['backbone']).to(device)
    features = ClipFeatures(pretrained=os.path.join(config['backbone'], 'clip'), device=device)
    reference, items = world3.rendered('test', per_class * var.num_classes if not config['t2i'] else n_texts, seed)
    reference_feats = world3.judged(judge, shapes.to_input(reference, device))[0]
    reference_judge = feature_statistics(reference_feats)
    reference_clip = feature_statistics(features.images(reference))
    labels = torch.tensor([a['label'] for a in items], device=device)
    captions = [world3.caption(a) for a in items]
    results = {}
    for name, model, tuned in before_and_after(config, vae, var, clip, parts, device):
        conditions = dict(texts=captions) if config['t2i'] else dict(labels=labels)
        images = torch.cat([generate_images(vae, model, tuned, clip, cfg_scale=cfg_scale, seed=seed + i, dtype=dtype,
                                            **{k: v[i:i + 100] for k, v in conditions.items()})
                            for i in range(0, len(items), 100)])
        x = images * 2 - 1
        feats, class_logits = world3.judged(judge, x)
        fd, fd_se = fd_with_se(feats, reference_judge, seed=seed)
        fd_c, fd_c_se = fd_with_se(features.images(to_uint8(images)), reference_clip, seed=seed)
        row = {'FD_judge': fd, 'FD_judge_se': fd_se}
        if config['t2i']:
            right_NA = (world3.read(judge, x) == world3.targets(items).to(device)).float().cpu().numpy()
            row['attribute_accuracy'], row['attribute_accuracy_se'] = mean_with_se(right_NA.mean(axis=1))
            for a, column in zip(world3.ATTRIBUTES, right_NA.T):
                row[f'{a}_accuracy'], row[f'{a}_accuracy_se'] = mean_with_se(column)
        else:
            recognised = class_logits.argmax(1) == labels.cpu().numpy()
            row['class_accuracy'], row['class_accuracy_se'] = mean_with_se(recognised)
            row['IS_judge'] = inception_score(class_logits)[0]
            row['precision'], row['recall'] = precision_recall(reference_feats, feats)
        row['FD_clip'], row['FD_clip_se'] = fd_c, fd_c_se
        results[name] = row
    return results


@torch.no_grad()
def score_caption(ckpt: str, caption: str, n: int = 50, seed: int = 0, cfg_scale: float = 1.5, device='cpu',
                  dtype=torch.float32) -> dict:
    """One caption, n samples before and after a world v3 text-to-image run: {name: {attribute: samples in which the
    judge reads the value the caption names}}, for each attribute it names."""
    config, vae, var, clip, parts = load_run(ckpt, device, need_clip=True)
    if config['data'] != 'world3' or not config['t2i']:
        raise ValueError(f'--caption scores a text-to-image run of world v3 (--data world3 --t2i), not {ckpt}')
    named = world3.attributes_named(caption)
    if not named:
        raise ValueError(f'--caption {caption!r} names no shape, colour, texture or background of world v3')
    judge = world3.load_judge(config['backbone']).to(device)
    scores = {}
    for name, model, tuned in before_and_after(config, vae, var, clip, parts, device):
        images = generate_images(vae, model, tuned, clip, texts=[caption] * n, cfg_scale=cfg_scale, seed=seed,
                                 dtype=dtype)
        read_NA = world3.read(judge, images * 2 - 1).cpu()
        scores[name] = {a: int((read_NA[:, i] == world3.VALUES[a].index(named[a])).sum())
                        for i, a in enumerate(world3.ATTRIBUTES) if a in named}
    return scores


@torch.no_grad()
def evaluate_run(ckpt: str, per_class: int = 50, n_texts: int = 500, seed: int = 0, cfg_scale: float = 1.5,
                 device='cpu', dtype=torch.float32) -> dict:
    config, vae, var, clip, parts = load_run(ckpt, device, need_clip=True)
    set_conv_layout(vae, dtype)
    if config['data'] == 'world3':
        return evaluate_world3_run(config, vae, var, clip, parts, per_class, n_texts, seed, cfg_scale, device, dtype)
    if config['t2i'] and config['data'] != 'shapes':
        raise ValueError(f'{ckpt}: text-to-image is scored on the shapes world\'s captions only (--data shapes), '
                         f'not on {config["data"]}')
    classifier = shapes.load_shape_classifier(config['backbone'])
    features = ClipFeatures(pretrained=os.path.join(config['backbone'], 'clip'), device=device)
    n_reference = per_class * var.num_classes if not config['t2i'] else n_texts
    reference_items = shapes.make_split('test', n_reference, seed) if config['data'] == 'shapes' else None
    reference = held_out_images(config['data'], reference_items, vae.image_size, n_reference, seed)
    reference_stats = feature_statistics(features.images(reference))
    reference_cls = feature_statistics(classifier_features(classifier, reference))
    results, runs = {}, before_and_after(config, vae, var, clip, parts, device)
    if not config['t2i']:
        labels = torch.arange(var.num_classes, device=device).repeat_interleave(per_class)
        for name, model, tuned in runs:
            images = torch.cat([generate_images(vae, model, tuned, clip, labels=labels[i:i + 100], cfg_scale=cfg_scale,
                                                seed=seed + i, dtype=dtype) for i in range(0, len(labels), 100)])
            recognised = (classifier(images * 2 - 1).argmax(1) == labels).float().cpu().numpy()
            arrays = to_uint8(images)
            fd, fd_se = fd_with_se(features.images(arrays), reference_stats, seed=seed)
            fd_cls, fd_cls_se = fd_with_se(classifier_features(classifier, arrays), reference_cls, seed=seed)
            accuracy, accuracy_se = mean_with_se(recognised)
            results[name] = {'FD_cls': fd_cls, 'FD_cls_se': fd_cls_se, 'class_accuracy': accuracy,
                             'class_accuracy_se': accuracy_se, 'FD_clip': fd, 'FD_clip_se': fd_se}
        return results
    items = reference_items[:n_texts]
    captions = [shapes.caption(a) for a in items]
    for name, model, tuned in runs:
        images = torch.cat([generate_images(vae, model, tuned, clip, texts=captions[i:i + 50], cfg_scale=cfg_scale,
                                            seed=seed + i, dtype=dtype) for i in range(0, len(captions), 50)])
        arrays = to_uint8(images)
        fd, fd_se = fd_with_se(features.images(arrays), reference_stats, seed=seed)
        fd_cls, fd_cls_se = fd_with_se(classifier_features(classifier, arrays), reference_cls, seed=seed)
        row = {'FD_cls': fd_cls, 'FD_cls_se': fd_cls_se, 'FD_clip': fd, 'FD_clip_se': fd_se}
        matches = [shapes.attribute_matches(im, a, shape_classifier=classifier.predict) for im, a in zip(arrays, items)]
        correct = np.array([[m[key] for key in shapes.ATTRIBUTES] for m in matches], dtype=np.float64)  # (N, 5)
        row['attribute_accuracy'], row['attribute_accuracy_se'] = mean_with_se(correct.mean(axis=1))
        for key, column in zip(shapes.ATTRIBUTES, correct.T):
            row[f'{key}_accuracy'], row[f'{key}_accuracy_se'] = mean_with_se(column)
        row['clip_score'] = clip_score(features.images(arrays), features.texts(captions))
        results[name] = row
    return results


@torch.no_grad()
def semantic_signal(backbone: str, batches: int = 4, batch_size: int = 16, seed: int = 0, beta: float = 0.6) -> str:
    """Where the semantic loss's signal is lost (the README's table): the sentence loss on I_sen and the caption loss on
    I_cap (Eq. 7-8) for training images, with I_sen and I_cap decoded from the real image, from its own tokens, and
    from the backbone's teacher-forced predictions (no prompt) made differentiable in the ways train.py offers, and
    how often CLIP names the class of I_sen. log(batch_size) is what a contrastive loss pays for guessing. beta sets
    I_sen's scale, kappa = floor(beta K) (the paper's 0.6)."""
    vae, var = load_backbone(backbone)
    clip = FrozenClip(*load_clip(os.path.join(backbone, 'clip')))
    semantic = SemanticLoss(clip, vae, beta)
    dataset = shapes.ShapesDataset('train', 5000, image_size=vae.image_size)
    order = np.random.default_rng(seed).permutation(len(dataset))[:batches * batch_size]
    class_texts = clip.encode_text([shapes.sentence(c) for c in range(var.num_classes)])
    one_hot = lambda idx_BL: F.one_hot(idx_BL, vae.vocab_size).float() * 1e4  # logits whose softmax is exactly one-hot
    rows = {}
    for b in range(batches):
        images, labels, sentences, captions = collate([dataset[int(i)] for i in order[b::batches]])
        idx = vae.img_to_idx(images)
        logits = var(var.class_emb(labels), vae.quantize.teacher_forcing_input(idx))  # (B, L, V)
        own_first = idx[0]
        decoded = {
            'the real images': (images, images),
            "the image's own tokens": semantic.decode_sen_cap(one_hot(torch.cat(idx, 1))),
            'soft tokens, T = 1, predicted first map': semantic.decode_sen_cap(logits),
            "soft tokens, T = 1, the image's own first map (train.py's choice, class-to-image)":
                semantic.decode_sen_cap(logits, own_first),
            "argmax tokens (a straight-through estimator's forward), own first map":
                semantic.decode_sen_cap(one_hot(logits.argmax(-1)), own_first),
        }
        for name, (img_sen, img_cap) in decoded.items():
            feats = clip.encode_image(img_sen)
            row = rows.setdefault(name, {'sen': [], 'cap': [], 'named': []})
            row['sen'].append(contrastive_loss(feats, clip.encode_text(sentences), sentences, clip.logit_scale()).item())
            row['cap'].append(contrastive_loss(clip.encode_image(img_cap), clip.encode_text(captions), captions,
                                               clip.logit_scale()).item())
            row['named'].append(((feats @ class_texts.T).argmax(1) == labels).float().mean().item())
    lines = [f'{batches} batches of {batch_size} training images, log({batch_size}) = {np.log(batch_size):.2f}; '
             f'I_sen from scales 1..{semantic.kappa} of {len(vae.patch_nums)}',
             '| I_sen and I_cap decoded from | sentence loss (I_sen) | CLIP names the class of I_sen | caption loss (I_cap) |',
             '|---|---|---|---|']
    for name, row in rows.items():
        lines.append(f'| {name} | {np.mean(row["sen"]):.2f} | {100 * np.mean(row["named"]):.0f}% | {np.mean(row["cap"]):.2f} |')
    return '\n'.join(lines)


def class_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                epochs: int = 20, seed: int = 0) -> float:
    """Held-out accuracy of a two-layer MLP trained to name the class from features (N, ...): how much of the class
    any judge could read from them, not only CLIP. Features are standardised with the training set's statistics."""
    torch.manual_seed(seed)
    train_x, test_x = train_x.flatten(1).float(), test_x.flatten(1).float()
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    num_classes = int(train_y.max()) + 1
    mlp = torch.nn.Sequential(torch.nn.Linear(train_x.shape[1], 512), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                              torch.nn.Linear(512, 512), torch.nn.ReLU(), torch.nn.Linear(512, num_classes))
    opt = torch.optim.AdamW(mlp.parameters(), lr=1e-3, weight_decay=0.05)
    for _ in range(epochs):
        for batch in torch.randperm(len(train_x)).split(128):
            loss = F.cross_entropy(mlp(train_x[batch]), train_y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (mlp.eval()(test_x).argmax(1) == test_y).float().mean().item()


def coarse_probe(backbone: str, n_train: int = 8000, n_test: int = 1000, seed: int = 0) -> str:
    """What the coarse scales hold (the README's table): class_probe, trained on renders and scored on held-out ones,
    names the class, and the size and position the class leaves free, from the VQVAE's latent before and after each
    step that turns it into f_hat_kappa, the sum of the coarse scales that I_sen decodes (Eq. 7), and from the first
    scales' partial sums, which the VAR's next maps are drawn given."""
    vae, _ = load_backbone(backbone)
    kappa = inter_anchor(0.6, len(vae.patch_nums))
    pn = vae.patch_nums[kappa - 1]
    targets = {'class': lambda a: a['label'], 'size': lambda a: list(shapes.SIZES).index(a['size']),
               'position': lambda a: shapes.POSITIONS.index(a['position'])}

    @torch.no_grad()
    def views(split: str, n: int, split_seed: int):
        items = shapes.make_split(split, n, split_seed)
        rows = {}
        for begin in range(0, n, 250):
            x = torch.stack([shapes.to_tensor(shapes.render(a, vae.image_size)) for a in items[begin:begin + 250]])
            z_BChw = vae.quant_conv(vae.encoder(x)).float()
            f_hats = vae.quantize.residual_quantize(z_BChw)[1]
            for name, v in ((f'the latent, {z_BChw.shape[-1]}x{z_BChw.shape[-1]}', z_BChw),
                            (f'the latent area-averaged to {pn}x{pn} (scale kappa = {kappa}), not quantized',
                             F.adaptive_avg_pool2d(z_BChw, pn)),
                            ("f_hat_1: the image's own token of scale 1 (what scale 2 is drawn given)", f_hats[0]),
                            ("f_hat_2: its own tokens, scales 1..2", f_hats[1]),
                            (f"f_hat_kappa: its own tokens, scales 1..{kappa} (what I_sen decodes)",
                             f_hats[kappa - 1]),
                            ('f_hat_K: all scales (what the reconstruction decodes)', f_hats[-1])):
                rows.setdefault(name, []).append(v)
        labels = {target: torch.tensor([label(a) for a in items]) for target, label in targets.items()}
        return {name: torch.cat(v) for name, v in rows.items()}, labels

    (train_views, train_y), (test_views, test_y) = views('train', n_train, seed), views('test', n_test, seed + 1)
    chance = ' / '.join(f'{1 / (int(train_y[t].max()) + 1):.0%}' for t in targets)
    lines = [f'class_probe (MLP, {n_train} training renders, {n_test} held-out; chance {chance})',
             '| features | ' + ' | '.join(f'names the {t}' for t in targets) + ' |', '|---' * (1 + len(targets)) + '|']
    for name in train_views:
        accuracies = [class_probe(train_views[name], train_y[t], test_views[name], test_y[t], seed=seed) for t in targets]
        lines.append(f'| {name} | ' + ' | '.join(f'{a:.1%}' for a in accuracies) + ' |')
    return '\n'.join(lines)


@torch.no_grad()
def prefix_probe(backbone: str, n: int = 1000, cfg_scale: float = 1.5, top_k: int = 900, top_p: float = 0.96,
                 seed: int = 0) -> str:
    """Where the VAR's samples part from the renders (the README's table): held-out renders' own token maps are given
    for scales 1..j and the VAR samples the rest (given_idx in VAR.generate), for j = 0 (plain sampling) to K (the
    reconstruction). FD_clip against other held-out renders, the class recognised, and the total variation distance
    of each attribute the class leaves free: the scale at which a figure jumps is where the samples go astray. And, at
    the first sampled scale, how many tokens per image leave that scale's commonest code (where the image holds
    something beyond the background) in the samples and in the renders' own maps, and how often those tokens form two
    or more separate groups (4-connected): a count that matches with more scattered groups is the mark of tokens
    sampled independently where the image's tokens go together (one shape, one group)."""
    from shapes import attribute_distributions, attribute_tv, rendered, to_input
    vae, var = load_backbone(backbone)
    classifier = shapes.load_shape_classifier(backbone)
    features = ClipFeatures(pretrained=os.path.join(backbone, 'clip'))
    renders = rendered('test', n, 1, vae.image_size)[0]  # the pretrain gate's sets: the reference ...
    images, items = rendered('test', n, 2, vae.image_size)  # ... and the renders whose tokens are given
    labels = torch.tensor([a['label'] for a in items])
    renders_stats, reference = feature_statistics(features.images(renders)), attribute_distributions(renders)
    chunks = [vae.img_to_idx(to_input(images[i:i + 250])) for i in range(0, n, 250)]
    own_idx = [torch.cat(maps) for maps in zip(*chunks)]  # K maps, (n, pn*pn) each
    lines = [f'{n} held-out renders, class-conditional, cfg {cfg_scale}, top-k {top_k}, top-p {top_p}',
             '| scales given (the rest sampled) | FD_clip | class recognised | ' +
             ' | '.join(f'TV {a}' for a in reference) + ' | the next scale: tokens off its commonest code per image, '
             'sampled / own (mean ± sd) | maps where they form 2+ groups, sampled / own |',
             '|---' * (5 + len(reference)) + '|']
    for j in range(len(var.patch_nums) + 1):
        chunks, generated = [], []
        for i in range(0, n, 250):
            idx = var.generate(vae, var.class_emb(labels[i:i + 250]), cfg=cfg_scale, top_k=min(top_k, var.vocab_size),
                               top_p=top_p, seed=seed + i, given_idx=[m[i:i + 250] for m in own_idx[:j]])
            chunks.append(idx)
            generated.append(vae.idx_to_img(idx).add(1).mul(0.5).clamp(0, 1))  # (B, 3, H, W) in [0, 1]
        sampled, generated = [torch.cat(maps) for maps in zip(*chunks)], torch.cat(generated)  # K maps (n, pn*pn); images
        recognised = (classifier(generated * 2 - 1).argmax(1) == labels).float().mean().item()
        samples = to_uint8(generated)
        tv = attribute_tv(attribute_distributions(samples), reference)
        given = 'none' if j == 0 else f'1..{j} of {len(var.patch_nums)}'
        off = groups = ''
        if j < len(var.patch_nums):
            pn = var.patch_nums[j]
            commonest = own_idx[j].flatten().mode().values
            off_tokens = [maps[j] != commonest for maps in (sampled, own_idx)]  # (n, pn*pn) bool each
            counts = [o.sum(1).float() for o in off_tokens]  # (n,) each
            off = ' / '.join(f'{c.mean():.2f} ± {c.std():.2f}' for c in counts)
            groups = ' / '.join(f'{np.mean([ndimage.label(m.reshape(pn, pn))[1] >= 2 for m in o.numpy()]):.1%}'
                                for o in off_tokens)
        lines.append(f'| {given} | {fd_clip(features, samples, renders_stats):.2f} | {recognised:.1%} | ' +
                     ' | '.join(f'{v:.2f}' for v in tv.values()) + f' | {off} | {groups} |')
    return '\n'.join(lines)


@torch.no_grad()
def partial_sums_figure(backbone: str, path: str, n: int = 8):
    """A PNG: n held-out renders (top row) and, below, the image decoded from its own tokens up to scale 1, 2, ..., K
    (the last row is the VQVAE's reconstruction): what I_sen and I_cap look like when the predictions are exact."""
    vae, _ = load_backbone(backbone)
    images = torch.stack([shapes.to_tensor(shapes.render(a, vae.image_size)) for a in shapes.make_split('test', n)])
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
    p.add_argument('--ckpt', help='a checkpoint of train.py run on a shapes backbone')
    p.add_argument('--semantic_signal', metavar='BACKBONE', help='instead: the semantic loss on images decoded in '
                   'several ways from a shapes backbone folder (the README\'s table)')
    p.add_argument('--beta', type=float, default=0.6, help='with --semantic_signal: kappa = floor(beta K), I_sen\'s scale')
    p.add_argument('--coarse_probe', metavar='BACKBONE', help='instead: how well an MLP names the class, size and '
                   'position from a shapes backbone\'s latents, averaged and quantized down to the coarse scales (the '
                   'README\'s table)')
    p.add_argument('--prefix_probe', metavar='BACKBONE', help='instead: samples of a shapes backbone\'s VAR given '
                   'held-out renders\' own tokens up to each scale (the README\'s table)')
    p.add_argument('--partial_sums', nargs=2, metavar=('BACKBONE', 'PNG'), help='instead: draw held-out renders '
                   'decoded from their own tokens up to every scale')
    p.add_argument('--per_class', type=int, default=50, help='class-to-image samples per class (50: FD_clip\'s '
                   'standard error about 0.3, accuracy\'s about 1 point)')
    p.add_argument('--n_texts', type=int, default=500, help='text-to-image: held-out captions')
    p.add_argument('--caption', default=None, help='with --ckpt of a world v3 text-to-image run: instead, this one '
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
    if not 0 < args.beta < 1:
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
    if args.coarse_probe:
        print(coarse_probe(args.coarse_probe, seed=args.seed))
        return
    if args.prefix_probe:
        print(prefix_probe(args.prefix_probe, cfg_scale=args.cfg, seed=args.seed))
        return
    if args.partial_sums:
        partial_sums_figure(*args.partial_sums)
        print(f'wrote {args.partial_sums[1]}')
        return
    if not args.ckpt:
        p.error('--ckpt, --semantic_signal, --coarse_probe, --prefix_probe or --partial_sums is required')
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
