"""Tiny data sets in the real on-disk layouts of the image benchmarks, shared by tests (no real data needed).

Every image is a small solid-colour picture whose pixel value is its class label, so a test can check that an
image reached the label it was written for. The layouts are those the builders read: ImageNet-R
``<wnid>/<file>`` with CODA-Prompt split YAMLs, DomainNet ``<domain>/<class_name>/<file>`` for the packaged
split lists, miniImageNet ``MINI-ImageNet/{train,test}/<wnid>/*.jpg``, CUB ``CUB_200_2011/`` with images/,
images.txt and train_test_split.txt, and CEC index lists (``session_N.txt``, one entry a line).
"""
from __future__ import annotations

import gzip
from importlib import resources
from pathlib import Path
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np
import yaml
from PIL import Image

from mambacl.benchmarks.fscil import FSCILSpec

Entry = Tuple[str, int]  # (path relative to the data root, class label)


def write_images(root: Path, entries: Iterable[Entry], size: int = 4) -> None:
    """One ``size`` x ``size`` RGB image per entry under ``root``, every pixel equal to its label (the format
    follows the suffix: PNG for .png, JPEG for .jpg)."""
    for rel, label in entries:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((size, size, 3), label, dtype=np.uint8)).save(path)


def write_imagenet_r(root: Path, num_classes: int, train_per_class: int, test_per_class: int) -> Tuple[Path, Path]:
    """An ``imagenet-r/<wnid>/art_<k>.jpg`` tree under ``root`` and its CODA-Prompt split files.

    The split labels run against the sorted-wnid order (label ``num_classes - 1 - position``), as CODA's labels
    are not the sorted-wnid positions either.

    Returns:
        (train_split, test_split): ``root/imagenet-r_{train,test}.yaml``; the images are in ``root/imagenet-r``.
    """
    wnids = [f"n{1440000 + 7 * c:08d}" for c in range(num_classes)]
    splits: Dict[str, List[Entry]] = {"train": [], "test": []}
    for position, wnid in enumerate(wnids):
        label = num_classes - 1 - position
        for k in range(train_per_class + test_per_class):
            splits["train" if k < train_per_class else "test"].append((f"{wnid}/art_{k}.jpg", label))
    paths = []
    for name, entries in splits.items():
        write_images(root / "imagenet-r", entries)
        path = root / f"imagenet-r_{name}.yaml"
        path.write_text(yaml.safe_dump({"data": [f"data/imagenet-r/{rel}" for rel, _ in entries],
                                        "targets": [label for _, label in entries]}))
        paths.append(path)
    return paths[0], paths[1]


def _first_listed_per_class(name: str) -> Dict[int, str]:
    """``{label: path}`` of the first entry of every label in a packaged DomainNet split list."""
    data = resources.files("mambacl.benchmarks").joinpath("splits", "domainnet", name).read_bytes()
    chosen: Dict[int, str] = {}
    for line in gzip.decompress(data).decode().splitlines():
        rel, label = line.split(" ")
        chosen.setdefault(int(label), rel)
    return chosen


def write_domainnet(root: Path) -> Tuple[Dict[int, str], Dict[int, str]]:
    """The first listed train and val image of every class of the packaged split lists, in DomainNet's layout.

    Returns:
        the ``{label: path}`` written from the train list and from the val list.
    """
    train, val = (_first_listed_per_class(f"sdomain_{split}.txt.gz") for split in ("train", "val"))
    write_images(root, [(rel, label) for chosen in (train, val) for label, rel in chosen.items()])
    return train, val


def write_mini_imagenet(root: Path, num_classes: int, train_per_class: int, test_per_class: int) -> List[Entry]:
    """``root/MINI-ImageNet/{train,test}/<wnid>/<wnid><8 digits>.jpg``, labels in sorted-wnid order.

    Returns:
        the training images ``(MINI-ImageNet/train/<wnid>/<file>, label)``, class by class (CEC list paths).
    """
    train: List[Entry] = []
    for label in range(num_classes):
        wnid = f"n{2000000 + 13 * label:08d}"
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            entries = [(f"MINI-ImageNet/{split}/{wnid}/{wnid}{k:08d}.jpg", label) for k in range(count)]
            write_images(root, entries, size=8)
            train += entries if split == "train" else []
    return train


def write_cub200(root: Path, train_per_class: Sequence[int], test_per_class: int) -> List[Entry]:
    """``root/CUB_200_2011/`` with ``images/<NNN.Bird_c>/img_<k>.jpg``, images.txt and train_test_split.txt.

    Args:
        train_per_class: training images of each class c (its folder prefix is ``c + 1``; 200 in CUB).
        test_per_class: test images per class (written after the training ones).
    Returns:
        the training images ``(CUB_200_2011/images/<folder>/<file>, label)``, class by class (CEC list paths).
    """
    base = root / "CUB_200_2011"
    lines, split, train = [], [], []
    for label, n_train in enumerate(train_per_class):
        for k in range(n_train + test_per_class):
            rel = f"{label + 1:03d}.Bird_{label}/img_{k}.jpg"
            write_images(base / "images", [(rel, label)], size=8)
            lines.append(f"{len(lines) + 1} {rel}")
            split.append(f"{len(lines)} {int(k < n_train)}")
            train += [(f"CUB_200_2011/images/{rel}", label)] if k < n_train else []
    (base / "images.txt").write_text("\n".join(lines) + "\n")
    (base / "train_test_split.txt").write_text("\n".join(split) + "\n")
    return train


def write_cec_lists(index_dir: Path, train: Sequence[Entry], spec: FSCILSpec) -> List[List[str]]:
    """CEC index lists for ``train``: ``session_1.txt`` lists every image of the base classes, ``session_t.txt``
    the first ``n_shot`` images of each class of session t, class by class (icoz69/CEC-CVPR2021's shapes).

    Args:
        train: the training images as ``(entry, label)``; an entry is a CIFAR row index or an image path.
    Returns:
        the entries written, per session.
    """
    index_dir.mkdir(parents=True, exist_ok=True)
    by_class: Dict[int, List[str]] = {}
    for entry, label in train:
        by_class.setdefault(label, []).append(entry)
    sessions = [[entry for entry, label in train if label < spec.num_base]]
    for t in range(1, spec.num_sessions):
        sessions.append([entry for c in spec.session_classes(t) for entry in by_class[c][:spec.n_shot]])
    for t, entries in enumerate(sessions, start=1):
        (index_dir / f"session_{t}.txt").write_text("\n".join(entries) + "\n")
    return sessions
