"""The shipped shapes-world models (checkpoints/shapes, made by pretrain.py) still do what the README says."""
import os

import numpy as np
import torch

import shapes
from fid import ClipFeatures, clip_score

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'checkpoints', 'shapes')


def held_out(n: int, seed: int = 0):
    items = shapes.make_split('test', n, seed)
    return np.stack([shapes.render(a, 64) for a in items]), items


def test_tiny_clip_scores_matching_captions_above_shuffled():
    clip = ClipFeatures(pretrained=os.path.join(ROOT, 'clip'))
    images, items = held_out(60)
    image_feats = clip.images(images)
    captions = [shapes.caption(a) for a in items]
    matched = clip_score(image_feats, clip.texts(captions))
    shuffled = clip_score(image_feats, clip.texts(captions[1:] + captions[:1]))  # every image with another's caption
    assert matched > shuffled + 5, (matched, shuffled)
    sentences = [shapes.sentence(a['label']) for a in items]
    assert clip_score(image_feats, clip.texts(sentences)) > clip_score(image_feats, clip.texts(sentences[7:] + sentences[:7]))
