"""Few-shot class-incremental (FSCIL) scenarios as Avalanche benchmarks: CIFAR-100, miniImageNet and CUB-200.

Sessions follow the CEC protocol (icoz69/CEC-CVPR2021): session 1 holds all training images of the base
classes, each later session ``n_way`` classes x ``n_shot`` images; the test experience of session t holds the
test images of every class seen up to t. The training subsets come from the CEC index lists (a folder of
``session_N.txt``) when given, otherwise from a seeded sampler with the same shapes.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from avalanche.benchmarks.scenarios import benchmark_from_datasets, with_classes_timeline, with_task_labels
# The helper Avalanche's own generators use to attach task label 0 (metric names then carry "Task000").
from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_classification_dataset
from torchvision import transforms as T

from mambacl.benchmarks.datasets import CIFAR100Files, ImageFiles, cap_per_class, require_dir
from mambacl.benchmarks.registry import register_benchmark

__all__ = ["FSCILSpec", "FSCIL_SPECS", "read_index_list", "label_from_list_entry", "cec_sessions",
           "sample_sessions", "fscil_transforms", "fscil_benchmark", "write_synthetic_cifar100", "fscil_cifar100",
           "fscil_mini_imagenet", "fscil_cub200"]

PathLike = Union[str, Path]


@dataclass(frozen=True)
class FSCILSpec:
    """Session shapes of one FSCIL benchmark."""

    num_classes: int
    num_base: int
    n_way: int
    n_shot: int

    def __post_init__(self) -> None:
        if min(self.num_base, self.n_way, self.n_shot) < 1 or self.num_classes <= self.num_base:
            raise ValueError(f"FSCILSpec needs positive num_base, n_way, n_shot and num_classes > num_base, got {self}")
        if (self.num_classes - self.num_base) % self.n_way:
            raise ValueError(f"num_classes - num_base must be a multiple of n_way, got {self}")

    @property
    def num_sessions(self) -> int:
        return 1 + (self.num_classes - self.num_base) // self.n_way

    def session_classes(self, session: int) -> List[int]:
        """Class ids added in ``session`` (0-based; 0 is the base session)."""
        if not 0 <= session < self.num_sessions:
            raise ValueError(f"session must be in [0, {self.num_sessions}), got {session}")
        if session == 0:
            return list(range(self.num_base))
        start = self.num_base + (session - 1) * self.n_way
        return list(range(start, start + self.n_way))


FSCIL_SPECS: Dict[str, FSCILSpec] = {
    "cifar100": FSCILSpec(100, 60, 5, 5),
    "mini_imagenet": FSCILSpec(100, 60, 5, 5),
    "cub200": FSCILSpec(200, 100, 10, 5),
}


def read_index_list(index_dir: PathLike, num_sessions: int) -> List[List[str]]:
    """Read ``session_1.txt .. session_<num_sessions>.txt`` of a CEC index-list folder.

    Args:
        index_dir: folder holding the lists.
        num_sessions: number of sessions expected.
    Returns:
        one list of non-empty, stripped lines per session.
    """
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise FileNotFoundError(f"index_dir {index_dir} is not a folder of session_N.txt files")
    sessions = []
    for t in range(1, num_sessions + 1):
        path = index_dir / f"session_{t}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"index list {path} is missing (expected session_1 .. session_{num_sessions})")
        sessions.append([line.strip() for line in path.read_text().splitlines() if line.strip()])
    return sessions


def label_from_list_entry(dataset: str, entry: str, wnids: Optional[Sequence[str]] = None) -> int:
    """Class id of an index-list path: CUB folder prefix NNN - 1; mini the wnid's position in sorted ``wnids``."""
    folder = Path(entry).parent.name
    if dataset == "cub200":
        return int(folder.split(".", 1)[0]) - 1
    if dataset == "mini_imagenet":
        if wnids is None:
            raise ValueError("wnids (the sorted class folders) are required for mini_imagenet entries")
        return list(wnids).index(folder)
    raise ValueError(f"dataset must be 'cub200' or 'mini_imagenet' for path entries, got {dataset!r}")


def cec_sessions(dataset: str, index_dir: PathLike) -> List[List[str]]:
    """The CEC index lists of ``dataset`` (a key of :data:`FSCIL_SPECS`), one list of entries per session."""
    if dataset not in FSCIL_SPECS:
        raise ValueError(f"dataset must be one of {sorted(FSCIL_SPECS)}, got {dataset!r}")
    return read_index_list(index_dir, FSCIL_SPECS[dataset].num_sessions)


def sample_sessions(targets: Sequence[int], spec: FSCILSpec, seed: int = 0) -> List[List[int]]:
    """Seeded CEC-shaped split: all images of the base classes, then ``n_shot`` random images per novel class.

    Args:
        targets: class id of every training image.
        spec: session shapes.
        seed: numpy seed of the shot sampler.
    Returns:
        per session, the indices into ``targets`` (class by class).
    """
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    sessions = [np.flatnonzero(targets < spec.num_base).tolist()]
    for t in range(1, spec.num_sessions):
        shots = []
        for c in spec.session_classes(t):
            pool = np.flatnonzero(targets == c)
            if len(pool) < spec.n_shot:
                raise ValueError(f"class {c} has {len(pool)} training images, fewer than n_shot = {spec.n_shot}")
            shots += sorted(rng.choice(pool, spec.n_shot, replace=False).tolist())
        sessions.append(shots)
    return sessions


#: Mamba-FSCIL's per-dataset pipeline parameters (xiaojieli0903/Mamba-FSCIL configs/_base_/datasets/*_fscil.py;
#: CUB's ColorJitter 0.3 from configs/cub/resnet18_etf_bs512_80e_cub_mambafscil.py): train crop size, crop scale,
#: crop interpolation, ColorJitter strength, test resize (short side), Normalize mean/std on a 0-255 scale.
_FSCIL_PIPELINES = {
    "cifar100": (32, (0.6, 1.0), T.InterpolationMode.BICUBIC, 0.4, 36,
                 (129.304, 124.070, 112.434), (68.170, 65.392, 70.418)),
    "mini_imagenet": (84, (0.08, 1.0), T.InterpolationMode.BILINEAR, 0.4, 96,
                      (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    "cub200": (224, (0.08, 1.0), T.InterpolationMode.BILINEAR, 0.3, 256,
               (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
}


def fscil_transforms(dataset: str) -> Tuple[Callable, Callable]:
    """Mamba-FSCIL's train/test pipelines for PIL images, as torchvision transforms.

    Train: RandomResizedCrop (CIFAR scale 0.6-1 bicubic; mini and CUB mmcls's default scale 0.08-1 bilinear),
    horizontal flip, ColorJitter (brightness = contrast = saturation = 0.4, CUB 0.3), ToTensor, Normalize. Test:
    Resize of the short side (CIFAR 36 bicubic, mini 96, CUB 256), CenterCrop, ToTensor, Normalize. Normalize uses
    the configs' ``img_norm_cfg`` divided by 255 (CIFAR-100 statistics; ImageNet's for mini and CUB).

    Args:
        dataset: a key of :data:`FSCIL_SPECS`.
    Returns:
        (train_transform, eval_transform).
    """
    if dataset not in _FSCIL_PIPELINES:
        raise ValueError(f"dataset must be one of {sorted(_FSCIL_PIPELINES)}, got {dataset!r}")
    size, scale, mode, jitter, resize, mean, std = _FSCIL_PIPELINES[dataset]
    tail = [T.ToTensor(), T.Normalize([m / 255 for m in mean], [s / 255 for s in std])]
    train = T.Compose([T.RandomResizedCrop(size, scale=scale, interpolation=mode), T.RandomHorizontalFlip(),
                       T.ColorJitter(jitter, jitter, jitter), *tail])
    # the test Resize is bicubic on CIFAR and mmcls's default bilinear otherwise, as the train crop
    test = T.Compose([T.Resize(resize, interpolation=mode), T.CenterCrop(size), *tail])
    return train, test


def fscil_benchmark(train_set, test_set, train_sessions: Sequence[Sequence[int]], spec: FSCILSpec,
                    train_transform: Callable, eval_transform: Callable, max_per_class: Optional[int] = None):
    """Avalanche benchmark with one train experience per session and cumulative test experiences.

    Args:
        train_set, test_set: datasets with ``targets`` (torchvision style).
        train_sessions: indices into ``train_set`` per session.
        spec: session shapes (test experience t holds classes ``< num_base + t * n_way``).
        train_transform, eval_transform: the 'train' and 'eval' transform groups.
        max_per_class: keep at most this many images per class in every session (its first ones, e.g. 2 of
            the 5 shots) and in the test set (toy-size runs); None keeps all.
    Returns:
        a ``CLScenario`` with ``train_stream`` and ``test_stream``, a classes timeline and task label 0.
    """
    if len(train_sessions) != spec.num_sessions:
        raise ValueError(f"train_sessions must have {spec.num_sessions} sessions, got {len(train_sessions)}")
    groups = {"train": (train_transform, None), "eval": (eval_transform, None)}
    train_ds = _make_taskaware_classification_dataset(train_set, task_labels=0, transform_groups=groups)
    test_ds = _make_taskaware_classification_dataset(test_set, task_labels=0, transform_groups=groups)
    train_targets = np.asarray(train_set.targets)
    test_targets = np.asarray(test_set.targets)
    test_kept = np.asarray(cap_per_class(test_targets.tolist(), max_per_class), dtype=np.int64)
    train, test = [], []
    for t, idx in enumerate(train_sessions):
        seen = spec.num_base + t * spec.n_way
        idx = [idx[i] for i in cap_per_class(train_targets[list(idx)].tolist(), max_per_class)]
        train.append(train_ds.subset(idx))
        test.append(test_ds.subset(test_kept[test_targets[test_kept] < seen].tolist()).eval())
    return with_task_labels(with_classes_timeline(benchmark_from_datasets(train=train, test=test)))


def write_synthetic_cifar100(root: PathLike, num_classes: int, train_per_class: int, test_per_class: int,
                             seed: int = 0) -> Path:
    """Write a small ``cifar-100-python`` folder in torchvision's exact pickle format (for smoke runs and tests).

    Each class is a random colour per 8x8 block plus noise, so a tiny model can tell classes apart.

    Args:
        root: folder to create ``cifar-100-python/`` in.
        num_classes: fine classes 0 .. num_classes - 1 (at most 100).
        train_per_class, test_per_class: images per class in the train and test pickles.
        seed: numpy seed.
    Returns:
        the ``cifar-100-python`` folder.
    """
    if not 1 <= num_classes <= 100:
        raise ValueError(f"num_classes must be in [1, 100], got {num_classes}")
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, 256, size=(num_classes, 3, 4, 4)).repeat(8, axis=2).repeat(8, axis=3)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(num_classes), per_class)
        rng.shuffle(labels)
        noise = rng.normal(0, 24, size=(len(labels), 3, 32, 32))
        data = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8).reshape(len(labels), -1)
        entry = {"filenames": [f"img_{i}.png" for i in range(len(labels))], "batch_label": f"{split} batch",
                 "fine_labels": labels.tolist(), "coarse_labels": (labels // 5).tolist(), "data": data}
        with open(folder / split, "wb") as f:
            pickle.dump(entry, f)
    meta = {"fine_label_names": [f"class_{c}" for c in range(100)],
            "coarse_label_names": [f"super_{c}" for c in range(20)]}
    with open(folder / "meta", "wb") as f:
        pickle.dump(meta, f)
    return folder


def _as_spec(spec: Union[FSCILSpec, Dict[str, int]]) -> FSCILSpec:
    """``spec`` as an FSCILSpec; a mapping of its fields (e.g. ``--benchmark-arg spec={...}``) is accepted."""
    if isinstance(spec, FSCILSpec):
        return spec
    if not isinstance(spec, dict):
        raise TypeError(f"spec must be an FSCILSpec or a mapping of its fields, got {type(spec).__name__}")
    try:
        return FSCILSpec(**spec)
    except TypeError as err:
        raise TypeError(f"spec must map the FSCILSpec fields num_classes, num_base, n_way, n_shot: {err}") from None


def _row_indices(entries: Sequence[str], num_rows: int) -> List[int]:
    try:
        rows = [int(e) for e in entries]
    except ValueError as err:
        raise ValueError(f"CIFAR-100 index lists must hold integer row indices: {err}") from None
    if rows and not 0 <= min(rows) <= max(rows) < num_rows:
        raise ValueError(f"CIFAR-100 index-list rows must be in [0, {num_rows}), got {min(rows)} .. {max(rows)}")
    return rows


@register_benchmark("fscil_cifar100", default_model="resnet12")
def fscil_cifar100(root: PathLike = "~/.cache/mambacl/cifar100", index_dir: Optional[PathLike] = None, seed: int = 0,
                   train_transform: Optional[Callable] = None, eval_transform: Optional[Callable] = None,
                   spec: Union[FSCILSpec, Dict[str, int]] = FSCIL_SPECS["cifar100"],
                   max_per_class: Optional[int] = None):
    """FSCIL CIFAR-100: 60 base classes + 8 sessions of 5-way 5-shot (CEC index lists or a seeded sampler).

    The CEC lists are row indices into the python train array. Test experience t covers all seen classes.

    Args:
        root: folder containing ``cifar-100-python/`` (torchvision layout; nothing is downloaded).
        index_dir: CEC ``cifar100`` index-list folder; None for the seeded sampler.
        seed: sampler seed when ``index_dir`` is None.
        train_transform, eval_transform: defaults are the configs' (see :func:`fscil_transforms`).
        spec: session shapes, or a mapping of FSCILSpec fields (override for small synthetic data).
        max_per_class: keep at most this many images per class in every session and in the test set (the
            first ones; toy-size runs), see :func:`fscil_benchmark`.
    """
    spec = _as_spec(spec)
    root = Path(root).expanduser()
    require_dir(root / "cifar-100-python", "CIFAR-100 python folder",
                f"extract {CIFAR100Files.url} into {root} (nothing is downloaded)")
    train_set = CIFAR100Files(str(root), train=True, download=False)
    test_set = CIFAR100Files(str(root), train=False, download=False)
    if index_dir is None:
        sessions = sample_sessions(train_set.targets, spec, seed)
    else:
        sessions = [_row_indices(s, len(train_set)) for s in read_index_list(index_dir, spec.num_sessions)]
    tr, te = fscil_transforms("cifar100")
    return fscil_benchmark(train_set, test_set, sessions, spec, train_transform or tr, eval_transform or te,
                           max_per_class)


def _path_benchmark(root: Path, train_files: List[Tuple[str, int]], test_files: List[Tuple[str, int]],
                    index_dir: Optional[PathLike], seed: int, transforms: Tuple[Callable, Callable],
                    max_per_class: Optional[int], spec: FSCILSpec):
    train_set, test_set = ImageFiles(root, train_files), ImageFiles(root, test_files)
    if index_dir is None:
        sessions = sample_sessions(train_set.targets, spec, seed)
    else:
        position = {path: i for i, (path, _) in enumerate(train_files)}
        try:
            sessions = [[position[e] for e in s] for s in read_index_list(index_dir, spec.num_sessions)]
        except KeyError as err:
            raise FileNotFoundError(f"index-list image {err.args[0]} is not among the training images") from None
    return fscil_benchmark(train_set, test_set, sessions, spec, *transforms, max_per_class)


@register_benchmark("fscil_mini_imagenet", default_model="resnet12")
def fscil_mini_imagenet(root: PathLike = "~/.cache/mambacl/mini_imagenet", index_dir: Optional[PathLike] = None,
                        seed: int = 0, train_transform: Optional[Callable] = None,
                        eval_transform: Optional[Callable] = None,
                        spec: Union[FSCILSpec, Dict[str, int]] = FSCIL_SPECS["mini_imagenet"],
                        max_per_class: Optional[int] = None):
    """FSCIL miniImageNet: 60 base classes + 8 sessions of 5-way 5-shot (classes in sorted-wnid order).

    Args:
        root: folder holding ``MINI-ImageNet/train/<wnid>/*.jpg`` and ``MINI-ImageNet/test/<wnid>/*.jpg``
            (the CEC list paths are relative to it).
        index_dir, seed, train_transform, eval_transform, spec, max_per_class: as in :func:`fscil_cifar100`
            (84 px).
    """
    root = Path(root).expanduser()
    base = require_dir(root / "MINI-ImageNet", "miniImageNet folder")
    wnids = sorted(p.name for p in require_dir(base / "train", "miniImageNet train folder").iterdir() if p.is_dir())

    def files(split: str) -> List[Tuple[str, int]]:
        folder = require_dir(base / split, f"miniImageNet {split} folder")
        return [(str(p.relative_to(root)), wnids.index(p.parent.name))
                for w in wnids for p in sorted((folder / w).glob("*.jpg"))]

    tr, te = fscil_transforms("mini_imagenet")
    return _path_benchmark(Path(root), files("train"), files("test"), index_dir, seed,
                           (train_transform or tr, eval_transform or te), max_per_class, _as_spec(spec))


@register_benchmark("fscil_cub200", default_model="resnet18")
def fscil_cub200(root: PathLike = "~/.cache/mambacl/cub200", index_dir: Optional[PathLike] = None, seed: int = 0,
                 train_transform: Optional[Callable] = None, eval_transform: Optional[Callable] = None,
                 spec: Union[FSCILSpec, Dict[str, int]] = FSCIL_SPECS["cub200"], max_per_class: Optional[int] = None):
    """FSCIL CUB-200: 100 base classes + 10 sessions of 10-way 5-shot (label = folder prefix NNN - 1).

    Args:
        root: folder holding ``CUB_200_2011/`` with ``images/``, ``images.txt`` and ``train_test_split.txt``.
        index_dir, seed, train_transform, eval_transform, spec, max_per_class: as in :func:`fscil_cifar100`
            (224 px).
    """
    root = Path(root).expanduser()
    base = require_dir(root / "CUB_200_2011", "CUB_200_2011 folder")
    for name in ("images.txt", "train_test_split.txt"):
        if not (base / name).is_file():
            raise FileNotFoundError(f"CUB-200 file {base / name} is missing")
    paths = dict(line.split() for line in (base / "images.txt").read_text().splitlines() if line.strip())
    split = dict(line.split() for line in (base / "train_test_split.txt").read_text().splitlines() if line.strip())
    files = {"1": [], "0": []}
    for image_id, rel in paths.items():
        entry = f"CUB_200_2011/images/{rel}"
        files[split[image_id]].append((entry, label_from_list_entry("cub200", entry)))
    tr, te = fscil_transforms("cub200")
    return _path_benchmark(Path(root), files["1"], files["0"], index_dir, seed,
                           (train_transform or tr, eval_transform or te), max_per_class, _as_spec(spec))
