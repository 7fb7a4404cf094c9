"""Rebuild the packaged ``test_vim.glyphs`` checkpoint: ``test_vim`` pretrained on procedural stroke glyphs.

The model has the shape of the embedded default run (8 px, patch 2, 1 channel, dim 32, depth 2) and learns
to classify the glyph classes of :mod:`mambacl.benchmarks.glyphs` (fresh images every step, never the
digits); the linear head is dropped and the backbone saved as safetensors, whose bytes depend only on the
tensors and the metadata. Training runs on one CPU thread with deterministic algorithms and every random
draw seeded, so a rebuild on the same software stack reproduces the file's sha256 (other CPUs or library
versions may round differently).

    python tools/pretrain_test_vim.py --out /tmp/test_vim_glyphs.safetensors   # compare the printed sha256
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mambacl.backbones import VisionMamba, ssm_param_groups  # noqa: E402
from mambacl.backbones.pretrained import packaged_path, sha256_file  # noqa: E402
from mambacl.benchmarks.glyphs import GlyphClasses  # noqa: E402

TAG = "test_vim.glyphs"
MODEL_ARGS = dict(img_size=8, patch_size=2, in_chans=1)  # the split_digits default; dim 32, depth 2 from test_vim


@dataclass(frozen=True)
class PretrainSettings:
    """Everything the checkpoint depends on (stored in its metadata)."""

    n_classes: int = 1000
    class_seed: int = 0
    steps: int = 1000
    batch_size: int = 128
    lr: float = 5e-3
    weight_decay: float = 0.05
    warmup_fraction: float = 0.05
    seed: int = 0
    val_images: int = 2000


@contextmanager
def deterministic_cpu() -> Iterator[None]:
    """One torch thread and deterministic algorithms inside, the caller's settings and RNG state restored."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)


def initial_model(settings: PretrainSettings) -> VisionMamba:
    """``test_vim`` at the default run's shape with a glyph-class head, initialised from ``settings.seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        return timm.create_model("test_vim", num_classes=settings.n_classes, scan_impl="chunk", **MODEL_ARGS)


@torch.no_grad()
def accuracy(model: VisionMamba, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    return (model(images).argmax(1) == labels).float().mean().item()


def pretrain(settings: PretrainSettings, log_every: int = 0) -> tuple[VisionMamba, float]:
    """Train on glyph batches ``glyphs.sample(batch, seed=[seed, 0, step])`` with AdamW and a one-cycle schedule.

    Args:
        settings: the recipe.
        log_every: print the running loss every this many steps (0: silent).
    Returns:
        the trained backbone with its head removed (``num_classes=0``), and the glyph-class accuracy on
        ``val_images`` held-out images (``seed=[seed, 1]``, never trained on).
    """
    glyphs = GlyphClasses.generate(settings.n_classes, settings.class_seed)
    val_images, val_labels = glyphs.sample(settings.val_images, seed=[settings.seed, 1])
    with deterministic_cpu():
        model = initial_model(settings)
        optimizer = torch.optim.AdamW(ssm_param_groups(model, settings.weight_decay), lr=settings.lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=settings.steps,
                                                       pct_start=settings.warmup_fraction)
        model.train()
        for step in range(settings.steps):
            images, labels = glyphs.sample(settings.batch_size, seed=[settings.seed, 0, step])
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            if log_every and (step + 1) % log_every == 0:
                print(f"step {step + 1}/{settings.steps}  loss {loss.item():.3f}", flush=True)
        val_accuracy = accuracy(model, val_images, val_labels)
    model.reset_classifier(0)
    return model, val_accuracy


def save_backbone(model: VisionMamba, path: Path, settings: PretrainSettings, val_accuracy: float) -> str:
    """Write the head-less state dict (native layout) with the recipe as safetensors metadata.

    The metadata is one JSON string under the key 'mambacl': safetensors writes metadata keys in hash-map
    order, which changes from run to run when there are several.

    Returns:
        the file's sha256.
    """
    state = {name: tensor.detach().contiguous() for name, tensor in sorted(model.state_dict().items())}
    recipe = {"model": "test_vim", "model_args": MODEL_ARGS, "source": "mambacl.benchmarks.glyphs",
              "settings": asdict(settings), "glyph_val_accuracy": round(val_accuracy, 4)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"mambacl": json.dumps(recipe, sort_keys=True)})
    return sha256_file(path)


def main(argv: Optional[List[str]] = None) -> None:
    defaults = PretrainSettings()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="safetensors file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    for name, value in asdict(defaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--log-every", type=int, default=100)
    args = parser.parse_args(argv)
    if args.out.exists() and not args.overwrite:
        parser.error(f"--out {args.out} exists; pass --overwrite to replace it")
    settings = PretrainSettings(**{name: getattr(args, name) for name in asdict(defaults)})

    start = time.perf_counter()
    model, val_accuracy = pretrain(settings, log_every=args.log_every)
    seconds = time.perf_counter() - start
    digest = save_backbone(model, args.out, settings, val_accuracy)
    packaged = packaged_path(TAG)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes) in {seconds:.0f} s; held-out glyph accuracy "
          f"{val_accuracy:.4f}\nsha256 {digest}")
    if packaged.is_file() and args.out.resolve() != packaged.resolve():
        print(("identical to" if digest == sha256_file(packaged) else "differs from") + f" the packaged {packaged}")


if __name__ == "__main__":
    main()
