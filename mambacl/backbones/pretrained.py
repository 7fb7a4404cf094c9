"""Checkpoints shipped inside the package (``mambacl/backbones/weights/``), with their sha256.

They load offline the timm way, ``timm.create_model("test_vim.glyphs", pretrained=True, ...)``, or by path,
``pretrained_file=pretrained_file("test_vim.glyphs")``. How each file was made and how to rebuild it:
``mambacl/backbones/weights/README.md``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, Tuple, Union

__all__ = ["PACKAGED_WEIGHTS", "WEIGHTS_DIR", "checked_file", "packaged_path", "pretrained_file", "sha256_file"]

WEIGHTS_DIR = Path(__file__).with_name("weights")
PACKAGED_WEIGHTS: Dict[str, Tuple[str, str]] = {  # timm name (arch.tag) -> (file in WEIGHTS_DIR, sha256)
    "test_vim.glyphs": ("test_vim_glyphs.safetensors",
                        "f3d8075930d53cfa1e9ebe67790eac6fc15e0626ffa952179def5cc6a70de749"),
}


def sha256_file(path: Union[str, Path]) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def packaged_path(name: str) -> Path:
    """Where the packaged checkpoint ``name`` (e.g. 'test_vim.glyphs') lies; not checked."""
    if name not in PACKAGED_WEIGHTS:
        raise ValueError(f"name must be one of the packaged checkpoints {sorted(PACKAGED_WEIGHTS)}, got {name!r}")
    return WEIGHTS_DIR / PACKAGED_WEIGHTS[name][0]


def pretrained_file(name: str) -> Path:
    """The packaged checkpoint ``name`` after checking that its bytes have the recorded sha256.

    Args:
        name: timm name with tag, a key of ``PACKAGED_WEIGHTS`` (e.g. 'test_vim.glyphs').
    Returns:
        its path, for ``timm.create_model(arch, pretrained_file=...)`` or ``mambacl run --pretrained``.
    Raises:
        FileNotFoundError if the file is missing from the installation; ValueError on a checksum mismatch.
    """
    path = packaged_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"packaged checkpoint {path} is missing; reinstall mambacl")
    digest = sha256_file(path)
    expected = PACKAGED_WEIGHTS[name][1]
    if digest != expected:
        raise ValueError(f"packaged checkpoint {path} has sha256 {digest}, expected {expected}; the file was "
                         f"modified (see {WEIGHTS_DIR / 'README.md'} to rebuild it)")
    return path


def checked_file(path: Union[str, Path]) -> Path:
    """``path``, through :func:`pretrained_file` (checksum) when it is one of the packaged checkpoints."""
    path = Path(path)
    for name in PACKAGED_WEIGHTS:
        if path.resolve() == packaged_path(name).resolve():
            return pretrained_file(name)
    return path
