"""Class-incremental scenarios as Avalanche benchmarks: split digits, Split CIFAR-100 and ImageNet-R.

All of them pass an explicit ``fixed_class_order`` to ``nc_benchmark`` (its seed path mutates the global torch
RNG) and remap class ids to their position in the order, so experience ``e`` holds classes
``e * k .. (e + 1) * k - 1``. The order used is stored on the benchmark as ``benchmark.class_order`` (original
ids, in training order).
"""
from __future__ import annotations

import os
import tarfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import yaml
from avalanche.benchmarks import nc_benchmark
from avalanche.benchmarks.utils import PathsDataset
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR100

from mambacl.benchmarks.fscil import _CIFAR100Files
from mambacl.benchmarks.registry import register_benchmark

__all__ = ["class_order", "image_transforms", "split_digits", "split_cifar100", "read_coda_split", "imagenet_r",
           "IMAGENET_R_URL"]

PathLike = Union[str, Path]
ClassOrder = Union[str, int, Sequence[int]]
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
_CODA_PREFIX = "data/imagenet-r/"


def class_order(order: ClassOrder, classes: Sequence[int]) -> List[int]:
    """Resolve a class-order spec over ``classes`` (sorted ids).

    Args:
        order: 'natural' (sorted), 'pycil' (``np.random.seed(1993); np.random.permutation(C)`` as in PyCIL),
            an int seed (numpy ``RandomState(seed).permutation``), or an explicit permutation of ``classes``.
        classes: the class ids present.
    Returns:
        the class ids in training order.
    """
    classes = sorted(int(c) for c in classes)
    if isinstance(order, str):
        if order == "natural":
            return classes
        if order == "pycil":
            order = 1993
        else:
            raise ValueError(f"class_order must be 'natural', 'pycil', an int seed or a list, got {order!r}")
    if isinstance(order, (int, np.integer)) and not isinstance(order, bool):
        # RandomState(s).permutation equals np.random.seed(s); np.random.permutation without touching global state
        return [classes[i] for i in np.random.RandomState(int(order)).permutation(len(classes))]
    if isinstance(order, Sequence) and sorted(int(c) for c in order) == classes:
        return [int(c) for c in order]
    raise ValueError(f"class_order must be 'natural', 'pycil', an int seed or a permutation of the {len(classes)} "
                     f"classes, got {order!r}")


def image_transforms(img_size: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                     std: Sequence[float] = IMAGENET_DEFAULT_STD,
                     native_size: Optional[int] = None) -> Tuple[Callable, Callable]:
    """Train/eval transforms for PIL images: at the data's ``native_size`` RandomCrop(pad size/8) + flip and
    no resizing; otherwise RandomResizedCrop + flip for training and Resize(size / 0.875) + CenterCrop for
    evaluation.

    Returns:
        (train_transform, eval_transform), both ending in ToTensor + Normalize(mean, std).
    """
    if img_size < 8:
        raise ValueError(f"img_size must be >= 8, got {img_size}")
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    if img_size == native_size:
        return (T.Compose([T.RandomCrop(img_size, padding=img_size // 8), T.RandomHorizontalFlip(), *tail]),
                T.Compose(tail))
    train = T.Compose([T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC),
                       T.RandomHorizontalFlip(), *tail])
    test = T.Compose([T.Resize(int(round(img_size / 0.875)), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(img_size), *tail])
    return train, test


def _class_incremental(train: Dataset, test: Dataset, targets: Sequence[int], n_experiences: int,
                       order: ClassOrder, transforms: Tuple[Optional[Callable], Optional[Callable]]):
    present = sorted(set(int(t) for t in targets))
    untested = sorted(set(present) - {int(t) for t in test.targets})
    if untested:
        raise ValueError(f"classes {untested[:10]} have training but no test images; use another split")
    if not isinstance(n_experiences, int) or n_experiences < 1 or len(present) % n_experiences:
        raise ValueError(f"n_experiences must be a positive divisor of the number of classes ({len(present)}), "
                         f"got {n_experiences!r}")
    resolved = class_order(order, present)
    bench = nc_benchmark(train, test, n_experiences=n_experiences, task_labels=False, fixed_class_order=resolved,
                         class_ids_from_zero_from_first_exp=True, train_transform=transforms[0],
                         eval_transform=transforms[1])
    bench.class_order = resolved
    return bench


@register_benchmark("split_digits", default_model="test_vim",
                    default_model_args={"img_size": 8, "patch_size": 2, "in_chans": 1})
def split_digits(n_experiences: int = 5, class_order: ClassOrder = "natural", test_size: float = 0.25,
                 split_seed: int = 0, max_per_class: Optional[int] = None):
    """Split digits: scikit-learn's bundled 8x8 digits (1,797 real images), 5 experiences x 2 classes.

    Args:
        n_experiences: 1, 2, 5 or 10.
        class_order: see :func:`class_order`.
        test_size: test fraction of the fixed stratified split. split_seed: seed of that split.
        max_per_class: keep at most this many train and test images per class (quick smoke runs).
    Returns:
        an Avalanche benchmark of [1, 8, 8] tensors in [0, 1].
    """
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=test_size, stratify=digits.target,
                                           random_state=split_seed)

    def subset(idx: np.ndarray) -> TensorDataset:
        if max_per_class is not None:
            idx = np.concatenate([idx[digits.target[idx] == c][:max_per_class] for c in range(10)])
        ds = TensorDataset(x[idx], y[idx])
        ds.targets = y[idx].tolist()
        return ds
    return _class_incremental(subset(train_idx), subset(test_idx), digits.target.tolist(), n_experiences,
                              class_order, (None, None))


@register_benchmark("split_cifar100")
def split_cifar100(root: PathLike = "~/.cache/mambacl/cifar100", n_experiences: int = 10,
                   class_order: ClassOrder = "natural", img_size: int = 224, download: bool = True):
    """Split CIFAR-100 (torchvision): ``n_experiences`` experiences over 100 classes, 32 px or resized.

    Args:
        root: folder holding (or receiving) ``cifar-100-python/``. An existing folder is read as is.
        n_experiences: a divisor of 100 (10 is the usual setting).
        class_order: 'natural' (L2P/DualPrompt), 'pycil' (seed 1993), an int seed, or a list.
        img_size: 32 for the native resolution (RandomCrop + flip, CIFAR statistics); otherwise images are
            resized for pretrained backbones (ImageNet statistics).
        download: fetch the archive through torchvision when the folder is missing.
    """
    root = Path(root).expanduser()
    folder = root / "cifar-100-python"
    if folder.is_dir():
        train, test = _CIFAR100Files(str(root), train=True), _CIFAR100Files(str(root), train=False)
    elif download:
        try:
            train, test = CIFAR100(str(root), train=True, download=True), CIFAR100(str(root), train=False)
        except (OSError, RuntimeError) as err:
            raise FileNotFoundError(f"CIFAR-100 not found in {folder} and the download failed ({err}); fetch "
                                    f"{CIFAR100.url} and extract it into {root}") from err
    else:
        raise FileNotFoundError(f"CIFAR-100 not found: {folder} does not exist; run once with download=True (needs "
                                f"a network) or extract {CIFAR100.url} into {root}")
    stats = (CIFAR100_MEAN, CIFAR100_STD) if img_size == 32 else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    return _class_incremental(train, test, train.targets, n_experiences, class_order,
                              image_transforms(img_size, *stats, native_size=32))


def read_coda_split(path: PathLike) -> List[Tuple[str, int]]:
    """Read a CODA-Prompt split file (YAML with parallel ``data`` / ``targets`` lists).

    Args:
        path: e.g. ``imagenet-r_train.yaml``; entries look like ``data/imagenet-r/<wnid>/<file>``.
    Returns:
        ``(<wnid>/<file>, label)`` pairs in file order.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"split file {path} does not exist")
    with open(path) as f:
        content = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if not isinstance(content, dict) or not {"data", "targets"} <= set(content):
        raise ValueError(f"split file {path} must be a YAML mapping with 'data' and 'targets' lists")
    data, targets = content["data"], content["targets"]
    if len(data) != len(targets):
        raise ValueError(f"split file {path}: {len(data)} paths but {len(targets)} targets")
    entries = [("/".join(Path(p).parts[-2:]), int(t)) for p, t in zip(data, targets)]
    label_of = {}
    for rel, label in entries:
        if label_of.setdefault(rel.split("/")[0], label) != label:
            raise ValueError(f"split file {path}: class folder {rel.split('/')[0]} has labels "
                             f"{label_of[rel.split('/')[0]]} and {label}")
    return entries


def _write_coda_split(path: Path, entries: Sequence[Tuple[str, int]]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump({"data": [_CODA_PREFIX + rel for rel, _ in entries], "targets": [t for _, t in entries]}, f)
    os.replace(tmp, path)


def _imagenet_r_root(root: Path, tarball: Optional[PathLike]) -> Path:
    if root.is_dir():
        return root
    tar = Path(tarball) if tarball is not None else root.parent / "imagenet-r.tar"
    if not tar.is_file():
        raise FileNotFoundError(f"ImageNet-R not found: {root} is not a folder and no tarball at {tar}; download "
                                f"{IMAGENET_R_URL} and pass its path as tarball (or extract it to {root})")
    with tarfile.open(tar) as archive:
        archive.extractall(root.parent, filter="data")
    if not root.is_dir():
        raise FileNotFoundError(f"{tar} did not contain a top-level {root.name}/ folder")
    return root


def _seeded_split(root: Path, seed: int, train_fraction: float) -> Tuple[Path, Path]:
    paths = (root / f"mambacl_split_seed{seed}_train.yaml", root / f"mambacl_split_seed{seed}_test.yaml")
    if all(p.is_file() for p in paths):
        return paths
    wnids = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not wnids:
        raise FileNotFoundError(f"ImageNet-R folder {root} holds no <wnid>/ class folders")
    files = [(f"{w}/{f.name}", label) for label, w in enumerate(wnids) for f in sorted((root / w).iterdir())
             if f.is_file()]
    perm = np.random.RandomState(seed).permutation(len(files))
    n_train = int(round(train_fraction * len(files)))
    _write_coda_split(paths[0], [files[i] for i in sorted(perm[:n_train])])
    _write_coda_split(paths[1], [files[i] for i in sorted(perm[n_train:])])
    return paths


class _Images(PathsDataset):
    """Avalanche PathsDataset exposing ``targets`` (needed by nc_benchmark)."""

    def __init__(self, root: Path, files: List[Tuple[str, int]]) -> None:
        super().__init__(root, files)
        self.targets = [label for _, label in files]


@register_benchmark("imagenet_r")
def imagenet_r(root: PathLike = "~/.cache/mambacl/imagenet-r", train_split: Optional[PathLike] = None,
               test_split: Optional[PathLike] = None, n_experiences: int = 10, class_order: ClassOrder = "natural",
               img_size: int = 224, split_seed: int = 0, train_fraction: float = 0.8,
               tarball: Optional[PathLike] = None):
    """ImageNet-R (200 classes) from a ``<wnid>/<image>`` folder, 10 or 20 experiences at 224 px.

    Args:
        root: the extracted ``imagenet-r`` folder (extracted from ``tarball`` or ``<root>/../imagenet-r.tar``
            when missing).
        train_split, test_split: CODA-Prompt split files (the standard 24,000 / 6,000 split, CODA label order).
            When both are None, a seeded ``train_fraction`` split (labels = sorted wnids) is written once into
            ``root`` as ``mambacl_split_seed<split_seed>_{train,test}.yaml`` and reused.
        n_experiences: a divisor of the number of classes.
        class_order: see :func:`class_order` (applied to the split's labels).
        img_size: training/eval resolution.
    """
    if (train_split is None) != (test_split is None):
        raise ValueError("train_split and test_split must be given together (CODA-Prompt's two YAML files)")
    root = _imagenet_r_root(Path(root).expanduser(), tarball)
    if train_split is None:
        train_split, test_split = _seeded_split(root, split_seed, train_fraction)
    train_files, test_files = read_coda_split(train_split), read_coda_split(test_split)
    missing = [rel for rel, _ in (*train_files, *test_files) if not (root / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of the split files are missing under {root} "
                                f"(e.g. {root / missing[0]})")
    train, test = _Images(root, train_files), _Images(root, test_files)
    return _class_incremental(train, test, train.targets, n_experiences, class_order, image_transforms(img_size))
