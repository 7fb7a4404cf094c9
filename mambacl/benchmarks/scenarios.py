"""Class-incremental scenarios as Avalanche benchmarks: split digits, Split CIFAR-100, ImageNet-R and DomainNet.

All of them pass an explicit ``fixed_class_order`` to ``nc_benchmark`` (its seed path mutates the global torch
RNG) and remap class ids to their position in the order, so experience ``e`` holds classes
``e * k .. (e + 1) * k - 1``. The order used is stored on the benchmark as ``benchmark.class_order`` (original
ids, in training order).

The Mamba-CL authors' data protocol (zugexiaodui/mamba-cl) is available on the image builders as
``class_order="mambacl:<seed>"`` (seeds 2024, 2025, 2026 in the paper) and ``augment="mambacl"`` with
``img_size=192``. Nothing is downloaded unless a builder is told to (``split_cifar100(download=True)``).
"""
from __future__ import annotations

import os
import tarfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import yaml
from avalanche.benchmarks import nc_benchmark
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, TensorDataset
from torchvision import transforms as T
from torchvision.datasets import CIFAR100

from mambacl.benchmarks.datasets import (CIFAR100Files, ImageFiles, LabelledSubset, cap_per_class,
                                         check_folder_labels, check_int, read_label_list, require_files)
from mambacl.benchmarks.registry import register_benchmark

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["class_order", "image_transforms", "mambacl_transforms", "split_digits", "split_cifar100",
           "read_coda_split", "imagenet_r", "domainnet", "IMAGENET_R_URL", "DOMAINNET_URL", "DOMAINNET_DOMAINS",
           "AUGMENTS"]

PathLike = Union[str, Path]
ClassOrder = Union[str, int, Sequence[int]]
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_R_URL = "https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar"
DOMAINNET_URL = "https://ai.bu.edu/M3SDA/"
DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
#: Values of the image builders' ``augment`` argument.
AUGMENTS = ("default", "mambacl")
_CODA_PREFIX = "data/imagenet-r/"
_MAMBACL_PREFIX = "mambacl:"


def class_order(order: ClassOrder, classes: Sequence[int],
                mambacl_labels: Optional[Sequence[int]] = None) -> List[int]:
    """Resolve a class-order spec over ``classes`` (sorted ids).

    Args:
        order: 'natural' (sorted), 'pycil' (``np.random.seed(1993); np.random.permutation(C)`` as in PyCIL),
            'mambacl:<seed>' (Mamba-CL's ``ClassIncrementalManager``: ``np.random.Generator(PCG64(seed)).shuffle``
            of the list of its dataset's class labels, zugexiaodui/mamba-cl utils/continual_manager.py), an int
            seed (numpy ``RandomState(seed).permutation``), or an explicit permutation of ``classes``.
        classes: the class ids present.
        mambacl_labels: for 'mambacl:<seed>', our class id of each of Mamba-CL's labels in their order
            (their label i is ``mambacl_labels[i]``); None when the labels agree (sorted ``classes``).
    Returns:
        the class ids in training order.
    """
    classes = sorted(int(c) for c in classes)
    if isinstance(order, str):
        if order == "natural":
            return classes
        if order.startswith(_MAMBACL_PREFIX) and order[len(_MAMBACL_PREFIX):].isdigit():
            labels = classes if mambacl_labels is None else [int(c) for c in mambacl_labels]
            if sorted(labels) != classes:
                raise ValueError(f"mambacl_labels must be a permutation of the {len(classes)} classes, got {labels}")
            # their manager shuffles np.array(class_list) in place; shuffling positions is the same permutation
            positions = np.arange(len(labels))
            np.random.Generator(np.random.PCG64(int(order[len(_MAMBACL_PREFIX):]))).shuffle(positions)
            return [labels[i] for i in positions]
        if order == "pycil":
            order = 1993
        else:
            raise ValueError(f"class_order must be 'natural', 'pycil', 'mambacl:<seed>', an int seed or a list, "
                             f"got {order!r}")
    if isinstance(order, (int, np.integer)) and not isinstance(order, bool):
        # RandomState(s).permutation equals np.random.seed(s); np.random.permutation without touching global state
        return [classes[i] for i in np.random.RandomState(int(order)).permutation(len(classes))]
    if isinstance(order, Sequence) and sorted(int(c) for c in order) == classes:
        return [int(c) for c in order]
    raise ValueError(f"class_order must be 'natural', 'pycil', 'mambacl:<seed>', an int seed or a permutation of "
                     f"the {len(classes)} classes, got {order!r}")


def image_transforms(img_size: int, mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                     std: Sequence[float] = IMAGENET_DEFAULT_STD,
                     native_size: Optional[int] = None) -> Tuple[Callable, Callable]:
    """Train/eval transforms for PIL images: at the data's ``native_size`` RandomCrop(pad size/8) + flip and
    no resizing; otherwise RandomResizedCrop + flip for training and Resize(size / 0.875) + CenterCrop for
    evaluation.

    Returns:
        (train_transform, eval_transform), both ending in ToTensor + Normalize(mean, std).
    """
    check_int(img_size, "img_size", 8)
    tail = [T.ToTensor(), T.Normalize(mean, std)]
    if img_size == native_size:
        return (T.Compose([T.RandomCrop(img_size, padding=img_size // 8), T.RandomHorizontalFlip(), *tail]),
                T.Compose(tail))
    train = T.Compose([T.RandomResizedCrop(img_size, interpolation=T.InterpolationMode.BICUBIC),
                       T.RandomHorizontalFlip(), *tail])
    test = T.Compose([T.Resize(int(round(img_size / 0.875)), interpolation=T.InterpolationMode.BICUBIC),
                      T.CenterCrop(img_size), *tail])
    return train, test


def mambacl_transforms(dataset: str, img_size: int = 192) -> Tuple[Callable, Callable]:
    """The Mamba-CL authors' transforms (zugexiaodui/mamba-cl utils/dataset_builder.py ``define_dataset``,
    ``transform_type='autoaug'``; 192 px for their De-focus Mamba-L).

    Training: AutoAugment (CIFAR10 policy for cifar100, IMAGENET policy otherwise; bilinear) on the original image,
    then RandomResizedCrop((s, s)) at the default scale (0.08, 1) and ratio (3/4, 4/3), no flip. Evaluation:
    cifar100 Resize((s, s)); imagenet_r and domainnet Resize((s + 32, s + 32)) + CenterCrop(s). The resizes and
    crops interpolate bicubic for cifar100 and bilinear otherwise (their ``interp_mode='auto'``); both end in
    ToTensor + Normalize with timm's ImageNet mean/std (their model's ``pretrained_cfg`` has no mean/std).

    Args:
        dataset: 'cifar100', 'imagenet_r' or 'domainnet'.
        img_size: s.
    Returns:
        (train_transform, eval_transform) for PIL images.
    """
    if dataset not in ("cifar100", "imagenet_r", "domainnet"):
        raise ValueError(f"dataset must be 'cifar100', 'imagenet_r' or 'domainnet', got {dataset!r}")
    check_int(img_size, "img_size", 8)
    cifar = dataset == "cifar100"
    mode = T.InterpolationMode.BICUBIC if cifar else T.InterpolationMode.BILINEAR
    policy = T.AutoAugmentPolicy.CIFAR10 if cifar else T.AutoAugmentPolicy.IMAGENET
    tail = [T.ToTensor(), T.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    train = T.Compose([T.AutoAugment(policy, T.InterpolationMode.BILINEAR),
                       T.RandomResizedCrop((img_size, img_size), interpolation=mode, antialias=True), *tail])
    if cifar:
        test = T.Compose([T.Resize((img_size, img_size), interpolation=mode, antialias=True), *tail])
    else:
        test = T.Compose([T.Resize((img_size + 32, img_size + 32), interpolation=mode, antialias=True),
                          T.CenterCrop(img_size), *tail])
    return train, test


def _builder_transforms(augment: str, dataset: str, img_size: int,
                        default: Callable[[], Tuple[Callable, Callable]]) -> Tuple[Callable, Callable]:
    if augment == "mambacl":
        return mambacl_transforms(dataset, img_size)
    if augment != "default":
        raise ValueError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    return default()


def _class_incremental(train: Dataset, test: Dataset, n_experiences: int, order: ClassOrder,
                       transforms: Tuple[Optional[Callable], Optional[Callable]],
                       mambacl_labels: Optional[Sequence[int]] = None):
    present = sorted(set(int(t) for t in train.targets))
    untested = sorted(set(present) - {int(t) for t in test.targets})
    if untested:
        raise ValueError(f"classes {untested[:10]} have training but no test images; use another split")
    if isinstance(n_experiences, bool) or not isinstance(n_experiences, int) or n_experiences < 1 \
            or len(present) % n_experiences:
        raise ValueError(f"n_experiences must be a positive divisor of the number of classes ({len(present)}), "
                         f"got {n_experiences!r}")
    resolved = class_order(order, present, mambacl_labels)
    bench = nc_benchmark(train, test, n_experiences=n_experiences, task_labels=False, fixed_class_order=resolved,
                         class_ids_from_zero_from_first_exp=True, train_transform=transforms[0],
                         eval_transform=transforms[1])
    bench.class_order = resolved
    return bench


def _capped(dataset: Dataset, max_per_class: Optional[int]) -> Dataset:
    """``dataset`` with at most ``max_per_class`` items per class (its first ones), itself when None."""
    return dataset if max_per_class is None else LabelledSubset(dataset, cap_per_class(dataset.targets,
                                                                                       max_per_class))


def _capped_files(files: List[Tuple[str, int]], max_per_class: Optional[int]) -> List[Tuple[str, int]]:
    return [files[i] for i in cap_per_class([label for _, label in files], max_per_class)]


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
        idx = idx[cap_per_class(digits.target[idx].tolist(), max_per_class)]
        ds = TensorDataset(x[idx], y[idx])
        ds.targets = y[idx].tolist()
        return ds
    return _class_incremental(subset(train_idx), subset(test_idx), n_experiences, class_order, (None, None))


@register_benchmark("split_cifar100")
def split_cifar100(root: PathLike = "~/.cache/mambacl/cifar100", n_experiences: int = 10,
                   class_order: ClassOrder = "natural", img_size: int = 224, augment: str = "default",
                   max_per_class: Optional[int] = None, download: bool = False):
    """Split CIFAR-100 (torchvision): ``n_experiences`` experiences over 100 classes, 32 px or resized.

    The split is torchvision's 50,000 / 10,000 train/test pickles, which is also Mamba-CL's
    (tools/cifar100_{train,val}.txt list train row ``<label>/<row>.bmp`` for all 50,000 rows and test rows for all
    10,000, labelled by fine label).

    Args:
        root: folder holding (or, with ``download``, receiving) ``cifar-100-python/``. An existing folder is read
            as is (no checksum).
        n_experiences: a divisor of 100 (10 is the usual setting).
        class_order: 'natural' (L2P/DualPrompt), 'pycil' (seed 1993), 'mambacl:<seed>', an int seed, or a list
            (see :func:`class_order`).
        img_size: 32 for the native resolution (RandomCrop + flip, CIFAR statistics); otherwise images are
            resized for pretrained backbones (ImageNet statistics).
        augment: 'default' (as above) or 'mambacl' (the authors' AutoAugment pipeline, see
            :func:`mambacl_transforms`; use ``img_size=192``).
        max_per_class: keep at most this many train and test images per class (the first ones; toy-size runs).
        download: let torchvision fetch the archive (needs a network) when the folder is missing; off by default.
    """
    root = Path(root).expanduser()
    folder = root / "cifar-100-python"
    if folder.is_dir():
        train, test = CIFAR100Files(str(root), train=True), CIFAR100Files(str(root), train=False)
    elif download:
        try:
            train, test = CIFAR100(str(root), train=True, download=True), CIFAR100(str(root), train=False)
        except (OSError, RuntimeError) as err:
            raise FileNotFoundError(f"CIFAR-100 not found in {folder} and the download failed ({err}); fetch "
                                    f"{CIFAR100.url} and extract it into root={root}") from err
    else:
        raise FileNotFoundError(f"CIFAR-100 not found: {folder} does not exist (root={root}); pass download=True to "
                                f"let torchvision fetch it (needs a network) or extract {CIFAR100.url} into {root}")
    stats = (CIFAR100_MEAN, CIFAR100_STD) if img_size == 32 else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    transforms = _builder_transforms(augment, "cifar100", img_size,
                                     lambda: image_transforms(img_size, *stats, native_size=32))
    return _class_incremental(_capped(train, max_per_class), _capped(test, max_per_class), n_experiences,
                              class_order, transforms)


def read_coda_split(path: PathLike, argument: str = "path") -> List[Tuple[str, int]]:
    """Read a CODA-Prompt split file (YAML with parallel ``data`` / ``targets`` lists).

    Args:
        path: e.g. ``imagenet-r_train.yaml``; entries look like ``data/imagenet-r/<wnid>/<file>``.
        argument: the builder argument the file came from, named in errors.
    Returns:
        ``(<wnid>/<file>, label)`` pairs in file order.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: split file {path} does not exist")
    try:
        with open(path) as f:
            content = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"{argument}: split file {path} is not valid YAML: {err}") from None
    if not isinstance(content, dict) or not {"data", "targets"} <= set(content):
        raise ValueError(f"{argument}: split file {path} must be a YAML mapping with 'data' and 'targets' lists")
    data, targets = content["data"], content["targets"]
    if len(data) != len(targets):
        raise ValueError(f"{argument}: split file {path}: {len(data)} paths but {len(targets)} targets")
    try:
        entries = [("/".join(Path(p).parts[-2:]), int(t)) for p, t in zip(data, targets)]
    except (TypeError, ValueError) as err:
        raise ValueError(f"{argument}: split file {path} must hold path strings and integer targets: {err}") from None
    check_folder_labels(entries, f"{argument}: split file {path}")
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
        raise FileNotFoundError(f"ImageNet-R not found: root={root} is not a folder and no tarball at {tar}; download "
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


def _sorted_folder_labels(files: Sequence[Tuple[str, int]]) -> List[int]:
    """The labels of ``files``' class folders in sorted folder-name order (Mamba-CL's ImageFolder labels)."""
    label_of = {Path(rel).parent.name: label for rel, label in files}
    return [label_of[folder] for folder in sorted(label_of)]


@register_benchmark("imagenet_r")
def imagenet_r(root: PathLike = "~/.cache/mambacl/imagenet-r", train_split: Optional[PathLike] = None,
               test_split: Optional[PathLike] = None, n_experiences: int = 10, class_order: ClassOrder = "natural",
               img_size: int = 224, augment: str = "default", max_per_class: Optional[int] = None,
               split_seed: int = 0, train_fraction: float = 0.8, tarball: Optional[PathLike] = None):
    """ImageNet-R (200 classes) from a ``<wnid>/<image>`` folder, 10 or 20 experiences at 224 px.

    Mamba-CL's split (tools/imagenet_r_{train,val}.txt) lists the same 24,000 / 6,000 images as CODA-Prompt's
    files, in the same order; its labels are the sorted-wnid positions, which ``class_order='mambacl:<seed>'``
    accounts for whatever the split's label order.

    Args:
        root: the extracted ``imagenet-r`` folder (extracted from ``tarball`` or ``<root>/../imagenet-r.tar``
            when missing).
        train_split, test_split: CODA-Prompt split files (the standard 24,000 / 6,000 split, CODA label order).
            When both are None, a seeded ``train_fraction`` split (labels = sorted wnids) is written once into
            ``root`` as ``mambacl_split_seed<split_seed>_{train,test}.yaml`` and reused.
        n_experiences: a divisor of the number of classes.
        class_order: see :func:`class_order` (applied to the split's labels).
        img_size: training/eval resolution.
        augment: 'default' (RandomResizedCrop + flip / resize + center crop) or 'mambacl' (the authors'
            AutoAugment pipeline, see :func:`mambacl_transforms`; use ``img_size=192``).
        max_per_class: keep at most this many train and test images per class (the first ones in split order;
            only those must exist under ``root``).
    """
    if (train_split is None) != (test_split is None):
        raise ValueError("train_split and test_split must be given together (CODA-Prompt's two YAML files)")
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction!r}")
    root = _imagenet_r_root(Path(root).expanduser(), tarball)
    if train_split is None:
        train_split, test_split = _seeded_split(root, check_int(split_seed, "split_seed", 0), train_fraction)
    train_files = _capped_files(read_coda_split(train_split, "train_split"), max_per_class)
    test_files = _capped_files(read_coda_split(test_split, "test_split"), max_per_class)
    require_files(root, train_files + test_files)
    transforms = _builder_transforms(augment, "imagenet_r", img_size, lambda: image_transforms(img_size))
    return _class_incremental(ImageFiles(root, train_files), ImageFiles(root, test_files), n_experiences,
                              class_order, transforms, _sorted_folder_labels(train_files))


def _packaged_split(name: str) -> "Traversable":
    """A split list shipped in the package (``mambacl/benchmarks/splits/domainnet/<name>``)."""
    return resources.files(__package__).joinpath("splits", "domainnet", name)


@register_benchmark("domainnet")
def domainnet(root: PathLike = "~/.cache/mambacl/domainnet", train_split: Optional[PathLike] = None,
              test_split: Optional[PathLike] = None, n_experiences: int = 10, class_order: ClassOrder = "natural",
              img_size: int = 224, augment: str = "default", max_per_class: Optional[int] = None):
    """DomainNet, Mamba-CL's 200-class subset over the six domains (47,532 train / 20,450 test), 10 x 20 classes.

    The split lists are the authors' tools/sdomain_{train,val}.txt (zugexiaodui/mamba-cl, shipped gzipped in
    ``mambacl/benchmarks/splits/domainnet``): one ``<domain>/<class_name>/<file> <label>`` line per image. Their
    labels are also Mamba-CL's (class folders ``000``..``199``), so ``class_order='mambacl:<seed>'`` gives the
    paper's orders.

    Args:
        root: the DomainNet folder holding the six domain folders as distributed (clipart, infograph, painting,
            quickdraw, real, sketch), each ``<class_name>/<file>``; nothing is downloaded.
        train_split, test_split: other list files in the same format (plain or ``.gz``), each replacing the
            packaged one.
        n_experiences: a divisor of the number of classes (10 in the paper).
        class_order: see :func:`class_order` (applied to the list labels).
        img_size: training/eval resolution.
        augment: 'default' or 'mambacl' (see :func:`imagenet_r`).
        max_per_class: keep at most this many train and test images per class (the first ones in list order;
            only those must exist under ``root``).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"DomainNet not found: root={root} is not a folder; download the domains "
                                f"{', '.join(DOMAINNET_DOMAINS)} from {DOMAINNET_URL} and extract them into it")
    splits = {"train_split": _packaged_split("sdomain_train.txt.gz") if train_split is None else train_split,
              "test_split": _packaged_split("sdomain_val.txt.gz") if test_split is None else test_split}
    files: Dict[str, List[Tuple[str, int]]] = {}
    for argument, path in splits.items():
        path = Path(path).expanduser() if isinstance(path, (str, Path)) else path
        files[argument] = _capped_files(read_label_list(path, argument), max_per_class)
    check_folder_labels(files["train_split"] + files["test_split"], "train_split and test_split")
    require_files(root, files["train_split"] + files["test_split"])
    transforms = _builder_transforms(augment, "domainnet", img_size, lambda: image_transforms(img_size))
    return _class_incremental(ImageFiles(root, files["train_split"]), ImageFiles(root, files["test_split"]),
                              n_experiences, class_order, transforms)
