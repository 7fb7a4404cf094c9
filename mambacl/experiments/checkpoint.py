"""Run checkpoints: one verified file per finished experience, the previous one kept, weights-only loading.

``<out>/checkpoints/exp003.pt`` holds the state after 3 finished experiences (see ``strategy_state``) and
``exp003.json``, its manifest, the run's full resolved config, its fingerprint, the file's size and sha256.
The ``.pt`` is written to a temporary file, synced and renamed; the manifest is written after it, so a
checkpoint without a manifest is an interrupted write and is ignored. The newest ``KEEP`` checkpoints are
kept: when the newest is truncated or corrupted, resuming falls back to the one before. A checkpoint is
matched against the run's config fingerprint before any tensor is read, and read with
``torch.load(weights_only=True)``: it holds tensors and plain data only (see ``strategy_state``).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from mambacl.experiments.config import RunConfig
from mambacl.experiments.run_folder import atomic_write_text

__all__ = ["CHECKPOINTS", "KEEP", "CheckpointError", "save_checkpoint", "list_checkpoints", "latest_manifest",
           "load_latest_checkpoint", "checkpoint_config"]

CHECKPOINTS = "checkpoints"
KEEP = 2
FORMAT = 2


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: corrupted, truncated, or written by another run."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stem(done: int) -> str:
    return f"exp{done:03d}"


def save_checkpoint(out: Union[str, Path], state: Dict[str, Any], record: Dict[str, Any], config: RunConfig,
                    versions: Dict[str, str]) -> Path:
    """Write the checkpoint after ``record['done']`` finished experiences and prune the older ones.

    Args:
        out: run folder.
        state: the strategy's state (``strategy_state.strategy_state``).
        record: the run's results so far (plain data; ``record['done']`` finished experiences).
        config: the run's resolved config (stored with its fingerprint in the manifest).
        versions: package versions, for the manifest.
    Returns:
        the ``.pt`` path.
    """
    folder = Path(out) / CHECKPOINTS
    folder.mkdir(parents=True, exist_ok=True)
    done = int(record["done"])
    path = folder / f"{_stem(done)}.pt"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save({"format": FORMAT, "record": record, **state}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    manifest = {"format": FORMAT, "done": done, "file": path.name, "bytes": path.stat().st_size,
                "sha256": _sha256(path), "fingerprint": config.fingerprint(), "config": config.to_dict(),
                "versions": versions}
    atomic_write_text(path.with_suffix(".json"), json.dumps(manifest, indent=2))
    for old in list_checkpoints(out)[KEEP:]:
        for suffix in (".json", ".pt"):
            (folder / f"{_stem(old['done'])}{suffix}").unlink(missing_ok=True)
    for orphan in folder.glob("exp*.pt"):  # the .pt of a write interrupted before its manifest
        if not orphan.with_suffix(".json").is_file():
            orphan.unlink()
    return path


def list_checkpoints(out: Union[str, Path]) -> List[Dict[str, Any]]:
    """Manifests of the complete checkpoints in ``out``, newest first (unreadable manifests are skipped)."""
    manifests = []
    for path in sorted((Path(out) / CHECKPOINTS).glob("exp*.json")):
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(manifest, dict) and manifest.get("format") == FORMAT and (path.with_suffix(".pt")).is_file():
            manifests.append(manifest)
    return sorted(manifests, key=lambda m: m["done"], reverse=True)


def checkpoint_config(manifest: Dict[str, Any]) -> RunConfig:
    """The resolved config a checkpoint manifest records."""
    return RunConfig.from_dict(manifest["config"])


def _verified_load(folder: Path, manifest: Dict[str, Any]) -> Dict[str, Any]:
    path = folder / manifest["file"]
    size = path.stat().st_size
    if size != manifest["bytes"]:
        raise CheckpointError(f"{path} is truncated or overwritten: {size} bytes, its manifest says "
                              f"{manifest['bytes']}")
    if _sha256(path) != manifest["sha256"]:
        raise CheckpointError(f"{path} is corrupted: its sha256 differs from its manifest")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as err:
        raise CheckpointError(f"{path} could not be read: {err}") from err


def load_latest_checkpoint(out: Union[str, Path], config: RunConfig) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """The newest usable checkpoint of the run ``config`` in ``out``, falling back to older ones.

    Every manifest must carry ``config``'s fingerprint (checked before any tensor is read): a checkpoint of
    another config, strategy or model raises a CheckpointError naming the differing keys. A truncated or
    corrupted newest checkpoint gives a warning and the previous one is used.

    Returns:
        (manifest, state) of the checkpoint used.
    """
    folder = Path(out) / CHECKPOINTS
    manifests = list_checkpoints(out)
    if not manifests:
        legacy = " (a checkpoint.pt of an older mambacl cannot be verified)" if (Path(out) / "checkpoint.pt").is_file() \
            else ""
        raise FileNotFoundError(f"no checkpoint to resume from in {folder}{legacy}; start the run again with "
                                "--overwrite")
    for manifest in manifests:
        if manifest["fingerprint"] != config.fingerprint():
            differing = checkpoint_config(manifest).differing_keys(config)
            raise CheckpointError(f"{folder / manifest['file']} was written by another run: its config differs in "
                                  f"{sorted(differing)} ({_describe(differing)}); it is not loaded")
    failures: List[str] = []
    for manifest in manifests:
        try:
            state = _verified_load(folder, manifest)
        except CheckpointError as err:
            failures.append(str(err))
            continue
        if failures:
            warnings.warn(f"{'; '.join(failures)}; resuming from the checkpoint after {manifest['done']} "
                          "experience(s) instead")
        return manifest, state
    raise CheckpointError("no usable checkpoint: " + "; ".join(failures) + "; start the run again with --overwrite")


def _describe(differing: Dict[str, tuple], limit: int = 4) -> str:
    return ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in list(sorted(differing.items()))[:limit])


def latest_manifest(out: Union[str, Path]) -> Optional[Dict[str, Any]]:
    """The newest checkpoint manifest in ``out``, or None."""
    manifests = list_checkpoints(out)
    return manifests[0] if manifests else None
