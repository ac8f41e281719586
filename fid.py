"""
Sample-quality metrics for generated images: FID, IS, precision/recall and CLIP-score.

    python fid.py GENERATED REFERENCE [--is] [--pr] [--clip-score TEXTS]
                  [--features inception|clip] [--clip-model NAME --clip-pretrained TAG_OR_PATH]
                  [--batch-size 50] [--device cuda|cpu] [--no-cache]

GENERATED and REFERENCE are each one of
    a folder        images found recursively (png, jpg, jpeg, webp, any case), taken in
                    sorted order of their paths relative to the folder
    an images .npz  key arr_0 holding uint8 (N, H, W, 3), the format of the OpenAI
                    guided-diffusion evaluation suite (github.com/openai/guided-diffusion,
                    evaluations/), which VAR reports its numbers with
    a stats .npz    keys mu and sigma, e.g. the suite's reference batch
                    VIRTUAL_imagenet256_labeled.npz (which also holds arr_0) or a cache
                    file written by this script. Without a feature_space key the
                    statistics are taken to be Inception ones; they are used in preference
                    to arr_0 when the feature space matches. --pr, --is and --clip-score
                    need per-image features: those of a features key (as in a cache
                    file), else arr_0 is featurised.
All images of one input must have the same size.

What is computed (each as in the reference implementation named):
    FD          Frechet distance between Gaussians fitted to the features of both sides,
                ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in float64 with
                scipy.linalg.sqrtm; eps*I is added to both covariances when the product
                is singular, and a large imaginary part raises, exactly as in TTUR
                (Heusel et al. 2017, github.com/bioinf-jku/TTUR) and pytorch-fid
                (github.com/mseitzer/pytorch-fid). On Inception features it is FID.
    features    "inception": pool3 (2048-d) of the TF Inception-v3 FID graph
                (pt_inception-2015-12-05), as ported by pytorch-fid, whose network and
                preprocessing (bilinear resize to 299, scale to [-1, 1]) are used as is.
                FID from it matches pytorch-fid; it is close to, not bit-equal with, the
                TF numbers of the guided-diffusion suite (TF resizes differently), so
                paper-grade numbers against the suite's mu/sigma carry that small offset.
                "clip": the image embedding (encode_image, not normalised) of any
                open_clip model, as the CLIP feature spaces of clean-fid
                (github.com/GaParmar/clean-fid) and Kynkaenniemi et al. 2023, "The Role of
                ImageNet Classes in Frechet Inception Distance". Its FD is printed as
                FD_clip(MODEL/PRETRAINED), never as FID. It works offline with a local
                checkpoint.
    IS          Inception Score, exp(E_x KL(p(y|x) || p(y))) averaged over 10 splits of the
                generated set, mean and std (Salimans et al. 2016). p(y|x) is the softmax
                of the FID Inception's 1008 logits computed as pool3 @ W without the bias,
                as the original IS code and torch-fidelity ("logits_unbiased") do.
    precision   fraction of generated samples inside the real manifold, and recall the
    recall      fraction of real samples inside the generated manifold, where a manifold
                is the union of balls around each sample with radius the distance to its
                k-th (k=3) nearest neighbour in the same set (Kynkaenniemi et al. 2019,
                "Improved Precision and Recall Metric for Assessing Generative Models").
                They are computed in the chosen feature space; on Inception pool3, as in
                the guided-diffusion suite (the paper used VGG-16 features).
    CLIP-score  100 * max(cos(image embedding, text embedding), 0) averaged over the
                generated images, as torchmetrics' CLIPScore (Hessel et al. 2021 scale
                it by 2.5 instead of 100). TEXTS is a text file with one text per line or
                a JSONL file with one string, or one object with a "text" key, per line;
                text i goes with image i in the sorted order above.

Inception weights are downloaded once by torch.hub (as pytorch-fid itself does) from FID_WEIGHTS_URL into
the torch hub cache, $TORCH_HOME/hub/checkpoints/ (default ~/.cache/torch/hub/checkpoints/); offline, the
download fails with one line: download the file elsewhere and place it there.

CLIP models: --clip-pretrained is an open_clip tag (downloaded by open_clip), a checkpoint file
for the built-in architecture --clip-model, or a folder in open_clip's own local-dir layout
(open_clip_config.json + open_clip_model.safetensors, as world/pretrain.py writes the shapes world's
tiny CLIP to checkpoints/shapes/clip/). Loading is pretrained.load_clip, the project's one CLIP
loader (offline, a tag that is not in the Hugging Face cache fails within seconds, naming the repo,
the file and the cache).

Statistics and per-image features of each input are cached next to it, as
<input>.<feature space>.stats.npz (samples.npz.inception.stats.npz; for a folder DIR:
DIR.clip-ViT-B-32-openai.stats.npz), and
reused while the input's files (names, sizes, mtimes) and the feature network's weights
are unchanged; --no-cache neither reads nor writes them.

Results go to stdout, one "name: value" line each; progress bars go to stderr.

From Python: evaluate(generated, reference, ...) returns what the CLI prints as a dict;
the pieces are feature_statistics, frechet_distance, precision_recall, inception_score,
clip_score, InceptionFeatures, ClipFeatures and load_images.
"""

import argparse
import hashlib
import json
import os
import re
import sys
import zipfile

import numpy as np
import torch
from PIL import Image
from scipy import linalg
from scipy.special import rel_entr, softmax
from tqdm import tqdm

# the file pytorch-fid loads; a mirror URL may serve the same file
FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   'pt_inception-2015-12-05-6726825d.pth')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp')  # compared lower-cased


class FIDError(Exception):
    """A bad input or a missing resource, reported by the CLI as one line."""


def _one_line(error, limit=300):
    text = str(error).strip().splitlines()
    text = text[0] if text else type(error).__name__
    return text if len(text) <= limit else text[:limit] + '...'

# -----------------------------------------------------------------------------
# metrics on features


def feature_statistics(features):
    """mean (D,) and covariance (D, D), in float64, of features (N, D)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f'need features of shape (N, D) with N >= 2, got {features.shape}')
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), as pytorch-fid / TTUR."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))  # (D,)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))  # (D, D)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f'statistics of different sizes: mu {mu1.shape} vs {mu2.shape}, '
                         f'sigma {sigma1.shape} vs {sigma2.shape}')
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)  # (D, D), may be complex
    if not np.isfinite(covmean).all():
        # the product is (near) singular, e.g. fewer samples than dimensions
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # numerical error gives a slight imaginary component; a large one is a real problem
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f'Frechet distance: imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm')
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fd_clip(features, generated, reference_stats):
    """FD between uint8 images (N, H, W, 3) and reference statistics in a ClipFeatures space."""
    return frechet_distance(*feature_statistics(features.images(generated)), *reference_stats)


def _knn_radii(feats, k, chunk):
    """distance of each row of feats (N, D) to its k-th nearest other row: (N,)"""
    # k + 1: the row itself is its own nearest neighbour, at distance 0
    return torch.cat([torch.cdist(c, feats).kthvalue(k + 1, dim=1).values for c in feats.split(chunk)])


def _inside_fraction(queries, feats, radii, chunk):
    """fraction of queries (M, D) within radii (N,) of some row of feats (N, D)"""
    inside = [(torch.cdist(c, feats) <= radii[None]).any(dim=1) for c in queries.split(chunk)]  # (c, N) -> (c,)
    return torch.cat(inside).double().mean().item()


def precision_recall(real_feats, fake_feats, k=3, device='cpu', chunk=1000):
    """improved precision and recall (Kynkaenniemi et al. 2019) of fake vs real features (N, D)."""
    real = torch.as_tensor(np.asarray(real_feats), dtype=torch.float32, device=device)  # (N, D)
    fake = torch.as_tensor(np.asarray(fake_feats), dtype=torch.float32, device=device)  # (M, D)
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f'need features (N, D) and (M, D), got {tuple(real.shape)} and {tuple(fake.shape)}')
    if min(len(real), len(fake)) <= k:
        raise ValueError(f'need more than k={k} samples on each side, got {len(real)} and {len(fake)}')
    precision = _inside_fraction(fake, real, _knn_radii(real, k, chunk), chunk)
    recall = _inside_fraction(real, fake, _knn_radii(fake, k, chunk), chunk)
    return precision, recall


def inception_score(logits_or_probs, splits=10):
    """mean and std over splits of exp(E KL(p(y|x) || p(y))) (Salimans et al. 2016).
    Rows that are non-negative and sum to 1 are taken as probabilities, others as logits."""
    x = np.asarray(logits_or_probs, dtype=np.float64)  # (N, C)
    if x.ndim != 2 or len(x) < splits:
        raise ValueError(f'need (N, C) logits or probabilities with N >= splits={splits}, got {x.shape}')
    is_probs = x.min() >= 0 and np.allclose(x.sum(axis=1), 1, atol=1e-3)
    p = x if is_probs else softmax(x, axis=1)  # (N, C)
    n = len(p)
    scores = []
    for i in range(splits):  # same split boundaries as the original code
        part = p[i * n // splits:(i + 1) * n // splits]  # (n/splits, C)
        py = part.mean(axis=0, keepdims=True)  # (1, C) marginal p(y)
        scores.append(np.exp(rel_entr(part, py).sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def clip_score(image_feats, text_feats):
    """100 * max(cos, 0) averaged over image/text pairs (rows of (N, D) and (N, D)), as torchmetrics."""
    img, txt = np.asarray(image_feats, np.float64), np.asarray(text_feats, np.float64)  # (N, D)
    if img.ndim != 2 or img.shape != txt.shape:
        raise ValueError(f'need paired features of the same shape (N, D), got {img.shape} and {txt.shape}')
    cos = (img * txt).sum(axis=1) / (np.linalg.norm(img, axis=1) * np.linalg.norm(txt, axis=1))  # (N,)
    return float(100 * np.maximum(cos, 0).mean())

# -----------------------------------------------------------------------------
# feature networks


def _inception_weights(url):
    """path of the FID Inception weights in the torch hub cache, downloaded from url by torch.hub if absent."""
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(FID_WEIGHTS_URL))
    if os.path.isfile(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:  # torch.hub writes a temporary file and renames it: a broken download leaves nothing at path
        torch.hub.download_url_to_file(url, path)
    except OSError as e:  # URLError, HTTPError and socket errors are all OSErrors
        reason = getattr(e, 'reason', e)
        raise FIDError(f'could not download the FID Inception weights from {url} ({_one_line(reason)}); '
                       f'download that file and place it at {path}') from None
    return path


class InceptionFeatures:
    """pool3 features (N, 2048) and IS logits (N, 1008) of the TF FID Inception-v3, via pytorch-fid."""

    def __init__(self, device='cpu', batch_size=50, weights_url=None):
        from pytorch_fid.inception import InceptionV3
        path = _inception_weights(weights_url or FID_WEIGHTS_URL)
        try:  # pytorch-fid finds the file in the hub cache and loads it
            self.model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device).eval()
            fc = torch.load(path, map_location='cpu', weights_only=True)['fc.weight']  # (1008, 2048)
        except Exception as e:
            raise FIDError(f'could not load the Inception weights {path} ({_one_line(e)}); '
                           f'delete the file to download it again') from None
        self.fc_weight = fc.double().numpy()  # (1008, 2048)
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def images(self, images):
        """pool3 features (N, 2048) float32 of uint8 images (N, H, W, 3) or a list of (H, W, 3)."""
        images = np.stack([np.asarray(im) for im in images])  # (N, H, W, 3) uint8
        feats = []
        for i in range(0, len(images), self.batch_size):
            x = torch.from_numpy(images[i:i + self.batch_size]).to(self.device)
            x = x.permute(0, 3, 1, 2).float() / 255  # (B, 3, H, W) in [0, 1]; the model resizes to 299
            feats.append(self.model(x)[0].flatten(1).cpu())  # (B, 2048)
        return torch.cat(feats).numpy()

    def logits(self, features):
        """unbiased logits (N, 1008) = pool3 (N, 2048) @ W.T, the input of the original IS code."""
        return np.asarray(features, np.float64) @ self.fc_weight.T


def _clip_name(model_name, pretrained):
    """a CLIP's display name: the folder's name for a local-dir folder, else the open_clip model name"""
    return os.path.basename(os.path.normpath(pretrained)) if pretrained and os.path.isdir(pretrained) else model_name


class ClipFeatures:
    """image and text embeddings (N, embed_dim) of an open_clip model; see the module docstring for pretrained."""

    def __init__(self, model_name='ViT-B-32', pretrained='openai', device='cpu', batch_size=50):
        import open_clip
        from open_clip.transform import PreprocessCfg, image_transform_v2
        from pretrained import load_clip  # the project's one CLIP loader: tags, checkpoint files, local-dir folders
        try:
            self.model, self.tokenizer = load_clip(model_name, pretrained, device)
        except (ValueError, OSError, RuntimeError) as e:  # OSError covers FileNotFoundError and ConnectionError
            raise FIDError(f'could not load CLIP model {model_name} with pretrained={pretrained} ({_one_line(e)})') from None
        self.preprocess = image_transform_v2(PreprocessCfg(**open_clip.get_model_preprocess_cfg(self.model)), is_train=False)
        self.label = f'{_clip_name(model_name, pretrained)}/{pretrained}'
        self.device, self.batch_size = device, batch_size

    @torch.no_grad()
    def images(self, images):
        """embeddings (N, embed_dim) float32 of PIL images, uint8 (N, H, W, 3) or a list of (H, W, 3)."""
        pil = [im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im)) for im in images]
        feats = []
        for i in range(0, len(pil), self.batch_size):
            x = torch.stack([self.preprocess(im) for im in pil[i:i + self.batch_size]]).to(self.device)  # (B, 3, S, S)
            feats.append(self.model.encode_image(x).float().cpu())  # (B, embed_dim)
        return torch.cat(feats).numpy()

    @torch.no_grad()
    def texts(self, texts):
        """embeddings (N, embed_dim) float32 of a list of strings."""
        feats = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(list(texts[i:i + self.batch_size])).to(self.device)  # (B, context_length)
            feats.append(self.model.encode_text(tokens).float().cpu())  # (B, embed_dim)
        return torch.cat(feats).numpy()


def _feature_space(features, clip_model, clip_pretrained):
    """(id, FD label, fingerprint of the network's weights) of a feature space, without loading it."""
    if features == 'inception':
        return 'inception', 'FID', os.path.basename(FID_WEIGHTS_URL)
    name = _clip_name(clip_model, clip_pretrained)
    tag = os.path.basename(os.path.normpath(clip_pretrained)) if clip_pretrained else 'random'
    space = re.sub(r'[^A-Za-z0-9._-]+', '_', f'clip-{name}-{tag}')
    if clip_pretrained and os.path.isdir(clip_pretrained):
        weight_files = sorted(os.path.join(clip_pretrained, f) for f in os.listdir(clip_pretrained))
    else:
        weight_files = [clip_pretrained] if clip_pretrained and os.path.isfile(clip_pretrained) else []
    fingerprint = ';'.join(f'{os.path.abspath(f)}:{os.stat(f).st_size}:{os.stat(f).st_mtime_ns}' for f in weight_files) \
        or str(clip_pretrained)
    return space, f'FD_clip({name}/{clip_pretrained})', fingerprint

# -----------------------------------------------------------------------------
# inputs


def _list_images(folder):
    """image paths under folder, relative to it, sorted"""
    return sorted(os.path.relpath(os.path.join(root, f), folder)
                  for root, _, files in os.walk(folder) for f in files
                  if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS)


def _read_image(path):
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert('RGB'))  # (H, W, 3) uint8
    except OSError as e:
        raise FIDError(f'{path}: cannot read image ({_one_line(e)})') from None


def _npz_keys(path):
    try:
        with np.load(path) as f:
            return set(f.files), str(f['feature_space']) if 'feature_space' in f.files else 'inception'
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise FIDError(f'{path}: cannot read .npz ({_one_line(e)})') from None


def _check_input(path, space_id=None, need_features=True):
    """raise FIDError, before any featurising, unless path gives images, or statistics in
    feature space space_id if need_features is False"""
    if not os.path.exists(path):
        raise FIDError(f'{path}: no such file or directory')
    if os.path.isdir(path):
        if not _list_images(path):
            raise FIDError(f'{path}: no images ({", ".join(IMAGE_EXTENSIONS)}) in this folder')
        return
    if not path.endswith('.npz'):
        raise FIDError(f'{path}: expected a folder of images or an .npz file')
    keys, file_space = _npz_keys(path)
    has_stats = {'mu', 'sigma'} <= keys and file_space == space_id
    if 'arr_0' in keys or (has_stats and (not need_features or 'features' in keys)):  # a cache file has features
        return
    if {'mu', 'sigma'} <= keys:
        why = ('images are needed' if space_id is None else f'{space_id} features need images' if file_space != space_id
               else 'per-image features (--is, --pr, --clip-score) need images')
        raise FIDError(f'{path} holds {file_space} statistics only and no images (arr_0); {why}')
    raise FIDError(f"{path}: .npz has neither images ('arr_0') nor statistics ('mu' and 'sigma')")


def _image_reader(path):
    """(n, read) for a folder or an images .npz, where read(i, j) gives images i..j-1 as uint8 (j-i, H, W, 3)"""
    _check_input(path)
    if os.path.isdir(path):
        files = _list_images(path)
        shape = _read_image(os.path.join(path, files[0])).shape

        def read(i, j):
            batch = []
            for f in files[i:j]:
                batch.append(_read_image(os.path.join(path, f)))
                if batch[-1].shape != shape:
                    raise FIDError(f'{os.path.join(path, f)}: image is {batch[-1].shape[1]}x{batch[-1].shape[0]} but '
                                   f'{files[0]} is {shape[1]}x{shape[0]}; all images must have the same size')
            return np.stack(batch)
        return len(files), read
    with np.load(path) as f:
        images = f['arr_0']
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or not len(images):
        raise FIDError(f'{path}: arr_0 must be uint8 (N, H, W, 3) with N > 0, got {images.dtype} {images.shape}')
    return len(images), lambda i, j: images[i:j]


def load_images(path):
    """all images of a folder or an images .npz as uint8 (N, H, W, 3), folder images in sorted path order."""
    n, read = _image_reader(path)
    return read(0, n)


def _load_texts(path):
    """one text per line of a text file, or per line of a JSONL file (a string or {"text": ...})"""
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise FIDError(f'{path}: cannot read texts ({_one_line(e)})') from None
    if not path.endswith('.jsonl'):
        return lines
    texts = []
    for i, line in enumerate(lines):
        try:
            item = json.loads(line)
            texts.append(item if isinstance(item, str) else item['text'])
        except (ValueError, KeyError, TypeError):
            raise FIDError(f'{path}:{i + 1}: expected a JSON string or an object with a "text" key') from None
    return texts


def _fingerprint(path, weights_fingerprint):
    """changes when the input's files (names, sizes, mtimes) or the feature network's weights change"""
    files = [os.path.join(path, f) for f in _list_images(path)] if os.path.isdir(path) else [path]
    h = hashlib.sha1(weights_fingerprint.encode())
    for f in files:
        st = os.stat(f)
        h.update(f'{os.path.relpath(f, path)}:{st.st_size}:{st.st_mtime_ns}\n'.encode())
    return h.hexdigest()


def _featurise(path, model, batch_size, space_id):
    """features (N, D) of all images of a folder or an images .npz, with a progress bar"""
    n, read = _image_reader(path)
    feats = []
    with tqdm(total=n, unit='img', desc=f'{space_id} features of {os.path.basename(os.path.normpath(path))}') as bar:
        for i in range(0, n, batch_size):
            feats.append(model.images(read(i, i + batch_size)))
            bar.update(min(batch_size, n - i))
    return np.concatenate(feats)


def _statistics(path, space, load_model, need_features, batch_size, use_cache):
    """mu (D,), sigma (D, D) and per-image features (N, D) of an input that passed _check_input,
    in feature space space = (id, label, weights fingerprint); features is None only for a
    statistics .npz when not needed. load_model() gives the feature network, loaded on first use."""
    space_id, _, weights_fingerprint = space
    file_stats = None
    if os.path.isfile(path):
        keys, file_space = _npz_keys(path)
        if {'mu', 'sigma'} <= keys and file_space == space_id:
            with np.load(path) as f:
                file_stats = f['mu'], f['sigma']
                if not need_features or 'features' in keys:  # per-image features, as in a cache file
                    return *file_stats, f['features'] if 'features' in keys else None
    cache = os.path.abspath(path).rstrip(os.sep) + f'.{space_id}.stats.npz'
    key = _fingerprint(path, weights_fingerprint)
    features = None
    if use_cache and os.path.isfile(cache):
        try:
            with np.load(cache) as c:
                if str(c['fingerprint']) == key:
                    mu, sigma, features = c['mu'], c['sigma'], c['features']
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # unreadable cache: recompute and overwrite
    if features is None:
        features = _featurise(path, load_model(), batch_size, space_id)  # (N, D)
        mu, sigma = feature_statistics(features)
        if use_cache:
            try:
                np.savez(cache + '.tmp.npz', mu=mu, sigma=sigma, features=features,
                         feature_space=space_id, fingerprint=key)
                os.replace(cache + '.tmp.npz', cache)
            except OSError as e:
                print(f'fid.py: warning: could not write the cache {cache} ({_one_line(e)})', file=sys.stderr)
    if file_stats is not None:
        mu, sigma = file_stats  # the reference statistics as published win over our own
    return mu, sigma, features

# -----------------------------------------------------------------------------
# evaluation and CLI


def evaluate(generated, reference, features='inception', clip_model='ViT-B-32', clip_pretrained='openai',
             isc=False, prc=False, texts=None, batch_size=50, device='cpu', use_cache=True):
    """metrics of generated vs reference images (inputs as in the module docstring), as a dict
    name -> value in print order: the FD, named after its feature space ("FID", "FD_clip(...)"),
    then IS and IS_std (isc), precision and recall (prc), CLIP-score(...) (texts: a texts file)."""
    if features not in ('inception', 'clip'):
        raise ValueError(f"features must be 'inception' or 'clip', got {features!r}")
    inception = _feature_space('inception', clip_model, clip_pretrained)
    clip = _feature_space('clip', clip_model, clip_pretrained) if features == 'clip' or texts else None
    fd_space = inception if features == 'inception' else clip
    needs = [(generated, fd_space, prc), (reference, fd_space, prc)]  # (input, feature space, per-image features?)
    if isc:
        needs.append((generated, inception, True))
    if texts:
        needs.append((generated, clip, True))
    for path, space, need_features in needs:
        _check_input(path, space[0], need_features)  # every input, before any long featurising
    text_list = _load_texts(texts) if texts else None
    models = {}

    def load_model(space):  # each feature network is loaded once, and only if some input needs it
        if space[0] not in models:
            models[space[0]] = (InceptionFeatures(device, batch_size) if space is inception
                                else ClipFeatures(clip_model, clip_pretrained, device, batch_size))
        return models[space[0]]

    def stats(path, space, need_features):
        return _statistics(path, space, lambda: load_model(space), need_features, batch_size, use_cache)

    results, score = {}, None
    if texts:  # first, so that a count mismatch fails before the long part
        _, _, img = stats(generated, clip, True)  # (N, D)
        if len(text_list) != len(img):
            raise FIDError(f'{generated} has {len(img)} images but {texts} has {len(text_list)} texts')
        score = clip_score(img, load_model(clip).texts(text_list))
    mu_g, sigma_g, feats_g = stats(generated, fd_space, prc)
    mu_r, sigma_r, feats_r = stats(reference, fd_space, prc)
    if mu_g.shape != mu_r.shape:
        raise FIDError(f'{generated} and {reference} have {fd_space[0]} statistics of different sizes '
                       f'({len(mu_g)} vs {len(mu_r)})')
    results[fd_space[1]] = frechet_distance(mu_g, sigma_g, mu_r, sigma_r)
    if isc:
        _, _, pool3 = stats(generated, inception, True)  # (N, 2048)
        results['IS'], results['IS_std'] = inception_score(load_model(inception).logits(pool3))
    if prc:
        results['precision'], results['recall'] = precision_recall(feats_r, feats_g, k=3, device=device)
    if score is not None:
        results[f'CLIP-score({load_model(clip).label})'] = score
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(prog='fid.py', description='FID (and IS, precision/recall, CLIP-score) of '
                                     'GENERATED vs REFERENCE images; see the module docstring for inputs.')
    parser.add_argument('generated', help='folder of images, images .npz (arr_0) or statistics .npz (mu, sigma)')
    parser.add_argument('reference', help='same kinds as GENERATED')
    parser.add_argument('--features', choices=['inception', 'clip'], default='inception',
                        help='feature space of the Frechet distance and precision/recall')
    parser.add_argument('--clip-model', default='ViT-B-32', help='open_clip model name')
    parser.add_argument('--clip-pretrained', default='openai', help='open_clip tag, checkpoint file or folder')
    parser.add_argument('--is', dest='isc', action='store_true', help='also the Inception Score of GENERATED')
    parser.add_argument('--pr', dest='prc', action='store_true', help='also precision and recall (k=3)')
    parser.add_argument('--clip-score', metavar='TEXTS', help='also the CLIP-score of GENERATED against these '
                        'texts (.txt: one per line; .jsonl: a string or {"text": ...} per line)')
    parser.add_argument('--batch-size', type=int, default=50)
    parser.add_argument('--device', default='auto', help='auto (CUDA if available), cpu, cuda, cuda:1, ...')
    parser.add_argument('--no-cache', action='store_true', help='neither read nor write cached statistics')
    args = parser.parse_args(argv)
    from device import parse_device  # the project's one --device parser
    try:
        if args.batch_size < 1:
            raise ValueError(f'--batch-size must be at least 1, got {args.batch_size}')
        args.device = parse_device(args.device)
    except ValueError as e:
        parser.exit(1, f'fid.py: error: {e}\n')
    try:
        results = evaluate(args.generated, args.reference, args.features, args.clip_model, args.clip_pretrained,
                           args.isc, args.prc, args.clip_score, args.batch_size, args.device, not args.no_cache)
    except (FIDError, ValueError) as e:
        parser.exit(1, f'fid.py: error: {_one_line(e, limit=1000)}\n')
    for name, value in results.items():
        print(f'{name}: {value:.4f}')


if __name__ == '__main__':
    main()
