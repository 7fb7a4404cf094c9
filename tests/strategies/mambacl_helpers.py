"""Shared fixtures for the Mamba-CL strategy tests: split digits and a tiny Vision Mamba classifier."""
from typing import Sequence

import torch
from avalanche.benchmarks import nc_benchmark
from sklearn.datasets import load_digits
from torch.utils.data import TensorDataset

from mambacl.backbones import VisionMamba
from mambacl.strategies import ContinualClassifier


def digits_dataset(index: torch.Tensor) -> TensorDataset:
    """sklearn digits (8x8, 1 channel, scaled to [0, 1]) restricted to ``index``, with ``targets``."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1)[index] / 16.0
    y = torch.tensor(digits.target)[index]
    ds = TensorDataset(x, y)
    ds.targets = y.tolist()
    return ds


def split_digits(n_train: int = 1400, per_class: Sequence[int] = (), **transforms):
    """Class-incremental split digits: 5 experiences of 2 classes (fixed order 0..9), train/test split by seed 0.

    ``per_class`` optionally caps the training samples per experience (e.g. a rank-deficient experience 1);
    ``transforms`` (train_transform, eval_transform) go to ``nc_benchmark``.
    """
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(0))
    train, test = perm[:n_train], perm[n_train:]
    if per_class:
        target = torch.tensor(load_digits().target)
        keep = [train[(target[train] // 2) == e][:n] for e, n in enumerate(per_class)]
        train = torch.cat(keep)
        test = train
    n_exp = len(per_class) or 5
    return nc_benchmark(digits_dataset(train), digits_dataset(test), n_experiences=n_exp, task_labels=False,
                        fixed_class_order=list(range(2 * n_exp)), **transforms)


def tiny_vim(patch_size: int = 2, embed_dim: int = 32, head: str = "experience", **kwargs) -> ContinualClassifier:
    """A 2-block bidirectional Vision Mamba for 8x8 digits with a continual head."""
    backbone = VisionMamba(img_size=8, patch_size=patch_size, in_chans=1, depth=2, embed_dim=embed_dim,
                           num_classes=0, **kwargs)
    return ContinualClassifier(backbone, head=head)
