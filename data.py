"""
Training data with MVP's three levels of tuning text: (image, label, sentence, caption).

An ImageNet-style folder `ROOT/train/<class folder>/<image>`: labels are the class folders in sorted order, as VAR
was trained. Each image carries
  - its label (the class index),
  - a sentence "a photo of a {class name}" (names from ROOT/class_names.txt or --class_names, one per line in
    sorted-folder order; for ImageNet's 1000 wnid folders open_clip's ImageNet class names; else the folder name),
  - a caption from an optional JSONL file of {"path": <path relative to ROOT>, "caption": ...} lines (BLIP-2
    captions in the paper); an image without a caption falls back to its sentence, and the count is reported.
Preprocessing is VAR's: resize the short side to 1.125x the final size (Lanczos), random crop (center crop for
evaluation), scale to [-1, 1]. The crop of item i in epoch e depends only on (seed, e, i), so a resumed run sees
exactly the crops an uninterrupted one would.
"""
import json
import os
import random
import signal
from typing import Dict, List, Optional

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.webp', '.bmp')


def text_lines(path: str):
    """(line number, line) of a UTF-8 text file; a line that is not UTF-8 is an error naming the file and the line."""
    with open(path, 'rb') as f:
        for line_no, raw in enumerate(f, 1):
            try:
                yield line_no, raw.decode('utf-8')
            except UnicodeDecodeError:
                raise ValueError(f'{path}, line {line_no}: not UTF-8 text') from None


def load_captions(path: str) -> Dict[str, str]:
    captions = {}
    for line_no, line in text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            image_path, caption = record['path'], record['caption']
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f'{path}, line {line_no}: not a {{"path": ..., "caption": ...}} JSON object ({e})') from None
        if not isinstance(image_path, str) or not isinstance(caption, str) or not caption.strip():
            raise ValueError(f'{path}, line {line_no}: "path" and "caption" must be non-empty strings, got '
                             f'{json.dumps(image_path)} and {json.dumps(caption)}')
        captions[os.path.normpath(image_path)] = caption
    return captions


def class_names_for(root: str, folders: List[str], class_names_file: Optional[str]) -> List[str]:
    if class_names_file and not os.path.isfile(class_names_file):
        raise FileNotFoundError(f'no class names file {class_names_file}')
    path = class_names_file or os.path.join(root, 'class_names.txt')
    if os.path.isfile(path):
        names = [line.strip() for _, line in text_lines(path) if line.strip()]
        if len(names) != len(folders):
            raise ValueError(f'{path} lists {len(names)} class names but {root} has {len(folders)} class folders')
        return names
    if len(folders) == 1000 and all(f.startswith('n') and f[1:].isdigit() for f in folders):  # ImageNet wnids
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
        return list(IMAGENET_CLASSNAMES)
    return [f.replace('_', ' ') for f in folders]


class FolderDataset(torch.utils.data.Dataset):
    def __init__(self, root: str, split: str = 'train', image_size: int = 256, captions: Optional[str] = None,
                 class_names: Optional[str] = None, train: bool = True, seed: int = 0):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f'no folder {folder}: expected an ImageNet-style {root}/{split}/<class>/<images>')
        classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        self.samples = [(os.path.join(split, c, f), label) for label, c in enumerate(classes)
                        for f in sorted(os.listdir(os.path.join(folder, c))) if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.samples:
            raise ValueError(f'{folder} holds no images ({", ".join(IMAGE_EXTENSIONS)}) in class folders')
        self.root, self.image_size, self.train, self.seed, self.epoch = root, image_size, train, seed, 0
        self.class_names = class_names_for(root, classes, class_names)
        self.sentences = [f'a photo of a {name}' for name in self.class_names]
        caption_of = load_captions(captions) if captions else {}
        self.captions = [caption_of.get(os.path.normpath(path)) for path, _ in self.samples]
        self.missing_captions = sum(c is None for c in self.captions)
        self.captions = [c if c is not None else self.sentences[label] for c, (_, label) in zip(self.captions, self.samples)]

    def __len__(self):
        return len(self.samples)

    def load_image(self, index: int) -> torch.Tensor:  # (3, H, W) in [-1, 1]
        path = os.path.join(self.root, self.samples[index][0])
        try:
            img = Image.open(path).convert('RGB')
        except OSError as e:
            raise ValueError(f'cannot read image {path} ({e})') from None
        short = round(1.125 * self.image_size)
        scale = short / min(img.size)
        img = img.resize((max(short, round(img.width * scale)), max(short, round(img.height * scale))), Image.LANCZOS)
        if self.train:
            rng = random.Random(hash((self.seed, self.epoch, index)))
            left, top = rng.randint(0, img.width - self.image_size), rng.randint(0, img.height - self.image_size)
        else:
            left, top = (img.width - self.image_size) // 2, (img.height - self.image_size) // 2
        img = img.crop((left, top, left + self.image_size, top + self.image_size))
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)

    def caption_and_label(self, index: int):  # without loading the image
        return self.captions[index], self.samples[index][1]

    def __getitem__(self, index: int):
        label = self.samples[index][1]
        return self.load_image(index), label, self.sentences[label], self.captions[index]


# -----------------------------------------------------------------------------
# the training loop's data: the dataset of a run's flags, and its seeded batches


def build_dataset(args, image_size: int):
    if args.data is None:
        raise ValueError('no dataset: pass --data /path/to/imagenet (an ImageNet-style folder) or --data shapes')
    if args.data == 'shapes':  # the offline world (world/shapes.py), imported only by the runs that use it
        from world.shapes import IMAGE_SIZE, Dataset
        if image_size != IMAGE_SIZE:
            raise ValueError(f'--data shapes renders {IMAGE_SIZE}-px images; the backbone takes {image_size} px')
        return Dataset('train', args.shapes_n, seed=args.seed)
    dataset = FolderDataset(args.data, 'train', image_size, args.captions, args.class_names, train=True, seed=args.seed)
    if args.captions and dataset.missing_captions:
        print(f'{dataset.missing_captions} of {len(dataset)} images have no caption in {args.captions}: '
              f'they use their sentence instead')
    return dataset


def batches_of_epoch(n: int, batch_size: int, epoch: int, seed: int, rank: int, world: int):
    """This process's batches of one epoch: a seeded permutation, split across processes, the last partial batch dropped."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    per_step = batch_size * world
    return [order[s + rank * batch_size: s + (rank + 1) * batch_size] for s in range(0, n - per_step + 1, per_step)]


def ignore_interrupts(worker_id: int):  # DataLoader workers: Ctrl-C is the main process's to handle (train.main)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def collate(items):
    images, labels, sentences, captions = zip(*items)
    return torch.stack(images), torch.tensor(labels), list(sentences), list(captions)


def epoch_loader(dataset, batch_size: int, seed: int, num_workers: int, step: int, steps_per_epoch: int, rank: int = 0,
                 world: int = 1, pin_memory: bool = False):
    """The batches of the epoch that `step` is in, from that step on: a resumed run sees the same batches.
    pin_memory: host-to-GPU copies without a staging copy (CUDA)."""
    epoch, offset = divmod(step, steps_per_epoch)
    if hasattr(dataset, 'epoch'):
        dataset.epoch = epoch
    batch_lists = batches_of_epoch(len(dataset), batch_size, epoch, seed, rank, world)[offset:]
    return torch.utils.data.DataLoader(dataset, batch_sampler=batch_lists, collate_fn=collate,
                                       num_workers=num_workers, persistent_workers=False, pin_memory=pin_memory,
                                       worker_init_fn=ignore_interrupts,
                                       generator=torch.Generator())  # not the global RNG: resume stays exact
