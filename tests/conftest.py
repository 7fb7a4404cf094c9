"""Shared test set-up: Triton runs in its CPU interpreter, and torch.empty is NaN-poisoned."""
import os

# Must be set before triton (or any mambacl kernel module that imports it) is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_empty = torch.empty


def _nan_empty(*args, **kwargs):
    t = _empty(*args, **kwargs)
    if t.is_floating_point():
        t.fill_(float("nan"))
    return t


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Fill torch.empty with NaN so a kernel that leaves an element unwritten fails its test."""
    monkeypatch.setattr(torch, "empty", _nan_empty)
    yield


@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(42)
    yield
