"""Datasets and argument checks shared by the scenario builders: CIFAR-100 pickles, image-file lists, label-list
files (one ``<path> <label>`` line per image, plain or gzipped) and the per-class cap of toy-size runs."""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

from avalanche.benchmarks.utils import PathsDataset
from torch.utils.data import Dataset, Subset
from torchvision.datasets import CIFAR100

if TYPE_CHECKING:
    from importlib.resources.abc import Traversable

__all__ = ["CIFAR100Files", "ImageFiles", "LabelledSubset", "cap_per_class", "check_folder_labels", "check_int",
           "read_label_list", "require_dir", "require_files"]

PathLike = Union[str, Path]


class CIFAR100Files(CIFAR100):
    """torchvision CIFAR-100 reading the python pickles without their md5 checks (custom or regenerated copies)."""

    train_list = [["train", None]]
    test_list = [["test", None]]
    meta = {**CIFAR100.meta, "md5": None}


class ImageFiles(PathsDataset):
    """Avalanche's PathsDataset (PIL RGB images from ``root / path``) exposing ``targets``.

    Args:
        root: folder the paths are relative to.
        files: ``(relative path, label)`` pairs.
    """

    def __init__(self, root: Path, files: List[Tuple[str, int]]) -> None:
        super().__init__(root, files)
        self.targets = [label for _, label in files]


class LabelledSubset(Subset):
    """A torch Subset that keeps the ``targets`` of its rows (what Avalanche's benchmark generators read)."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]) -> None:
        super().__init__(dataset, list(indices))
        self.targets = [dataset.targets[i] for i in self.indices]


def check_int(value: object, name: str, minimum: int) -> int:
    """``value`` as an int, or a ValueError naming ``name`` when it is not an int >= ``minimum`` (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def cap_per_class(labels: Sequence[int], max_per_class: Optional[int]) -> List[int]:
    """Positions of the first ``max_per_class`` items of every class, in their original order (toy-size runs).

    Args:
        labels: the class of every item.
        max_per_class: None keeps everything; otherwise an int >= 1.
    Returns:
        the kept positions, increasing.
    """
    if max_per_class is None:
        return list(range(len(labels)))
    check_int(max_per_class, "max_per_class", 1)
    seen: Dict[int, int] = {}
    kept = []
    for i, label in enumerate(labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= max_per_class:
            kept.append(i)
    return kept


def require_dir(path: Path, what: str, hint: str = "") -> Path:
    """``path`` (a folder under a builder's ``root``) if it is a folder, else a FileNotFoundError naming ``what``,
    the ``root`` argument and the ``hint`` (how to get the data)."""
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found under root: {path} does not exist or is not a folder"
                                + (f"; {hint}" if hint else ""))
    return path


def require_files(root: Path, files: Sequence[Tuple[str, int]], argument: str = "root") -> None:
    """Raise a FileNotFoundError counting the ``files`` missing under ``root`` and showing the first one."""
    missing = [rel for rel, _ in files if not (root / rel).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of the {len(files)} images of the split lists are missing under "
                                f"{argument}={root} (e.g. {root / missing[0]})")


def read_label_list(path: Union[PathLike, "Traversable"], argument: str) -> List[Tuple[str, int]]:
    """Read a label-list file: one ``<relative path> <integer label>`` line per image (``.gz`` is gunzipped).

    Args:
        path: the file (a path or an ``importlib.resources`` file of the package).
        argument: the builder argument the file came from, named in errors.
    Returns:
        ``(relative path, label)`` pairs in file order.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: split file {path} does not exist")
    try:
        with path.open("rb") as raw:
            data = gzip.decompress(raw.read()) if path.name.endswith(".gz") else raw.read()
        text = data.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise ValueError(f"{argument}: split file {path} is not a readable (gzipped) UTF-8 text file: {err}") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not (fields[1].isascii() and fields[1].isdigit()):
            raise ValueError(f"{argument}: {path} line {number} must be '<relative path> <label>' with a "
                             f"non-negative integer label, got {line!r}")
        entries.append((fields[0], int(fields[1])))
    if not entries:
        raise ValueError(f"{argument}: split file {path} lists no images")
    check_folder_labels(entries, f"{argument}: split file {path}")
    return entries


def check_folder_labels(entries: Sequence[Tuple[str, int]], source: str) -> None:
    """Raise a ValueError (prefixed by ``source``) unless every class folder (an image's parent folder name)
    has one label and every label one class folder."""
    label_of, folder_of = {}, {}
    for rel, label in entries:
        folder = Path(rel).parent.name
        known_label, known_folder = label_of.setdefault(folder, label), folder_of.setdefault(label, folder)
        if known_label != label or known_folder != folder:
            raise ValueError(f"{source}: {rel} (label {label}) breaks the one-folder-one-label mapping: folder "
                             f"{folder} already has label {known_label}, label {label} already has folder "
                             f"{known_folder}")
