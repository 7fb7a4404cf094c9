"""Run folders are never clobbered: a folder that holds a run is continued (``resume``) or replaced
(``overwrite``) only when asked, is checked to be writable before any training, and loses its stale temporary
files from interrupted writes.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, List, Optional, Union

from mambacl.strategies.distributed import broadcast_object, is_main_process

__all__ = ["RUN_FILES", "MODES", "RunFolderError", "atomic_write_text", "on_main_process", "run_contents",
           "prepare_run_folder"]

MODES = ("new", "resume", "overwrite")
# what a run (or a comparison) writes into its folder; --overwrite removes exactly these
RUN_FILES = ("results.json", "results.csv", "accuracy_matrix.png", "accuracy.png", "checkpoints", "tensorboard",
             "checkpoint.pt", "compare.json", "compare.md", "compare_plan.json")
# files only mambacl writes: a folder is taken for a run (and may be overwritten) only when it holds one of them
_MARKERS = ("results.json", "checkpoints/exp*.json", "checkpoint.pt", "compare.json", "compare_plan.json")


class RunFolderError(FileExistsError):
    """The output folder holds a run and neither resume nor overwrite was asked for."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a synced temporary file and a rename (never a half-written file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def run_contents(out: Union[str, Path]) -> List[str]:
    """The run files present in ``out`` (empty when it holds no run)."""
    out = Path(out)
    return [name for name in RUN_FILES if (out / name).exists()]


def prepare_run_folder(out: Union[str, Path], mode: str, what: str = "run", runs: Optional[List[Path]] = None) -> None:
    """Make ``out`` ready for a run in ``mode`` ('new', 'resume' or 'overwrite').

    'new' refuses a folder that holds a run (``RunFolderError`` naming --resume and --overwrite); 'overwrite'
    removes the run's files (``RUN_FILES``, in ``out`` and in the sub-run folders ``runs``) and nothing else.
    Then the folder is created, checked to be writable and cleared of ``*.tmp`` files from interrupted writes.

    Args:
        out: the run folder.
        mode: see above.
        what: 'run' or 'comparison', for the message.
        runs: sub-run folders of a comparison (checked and overwritten like ``out``).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    out = Path(out)
    folders = [out, *(runs or [])]
    if mode == "new":
        for folder in folders:
            found = run_contents(folder)
            if found:
                raise RunFolderError(f"--out {out} already holds a {what} ({', '.join(found)} in {folder}); pass "
                                     f"--resume to continue it or --overwrite to replace it")
    if mode == "overwrite":
        for folder in folders:
            if run_contents(folder) and not any(any(folder.glob(marker)) for marker in _MARKERS):
                raise RunFolderError(f"--overwrite: {folder} holds {', '.join(run_contents(folder))} but no mambacl run "
                                     "(no results.json, checkpoint manifest or comparison): nothing is deleted")
            for name in run_contents(folder):
                target = folder / name
                shutil.rmtree(target) if target.is_dir() else target.unlink()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".mambacl_write_check"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"--out {out} is not writable: {err.strerror or err}") from err
    for folder in folders:
        for stale in [*folder.glob("*.tmp"), *folder.glob("checkpoints/*.tmp")]:
            stale.unlink()


def on_main_process(action: Callable[[], None]) -> None:
    """Run ``action`` on rank 0 only and raise its error (if any) on every rank, so no rank waits for a failed one."""
    error: Optional[BaseException] = None
    if is_main_process():
        try:
            action()
        except (OSError, ValueError, TypeError) as err:
            error = err
    error = broadcast_object(error)
    if error is not None:
        raise error
