"""Linear probe on the digits from frozen test_vim features: the packaged glyph checkpoint vs random init.

The images are the split_digits benchmark's own train/test split (1,347 / 450, all ten classes). Each
backbone stays frozen; a logistic regression is fitted on the train split's standardised features. Two
readings: the 5-fold cross-validated accuracy inside the train split (the figure used to choose the
pretraining recipe) and the test-split accuracy (reported, never used for choices); a third fits the
features unstandardised. Features:
'cls' is what the continual-learning heads see (the middle cls token after norm_f), 'mean' the average of
all tokens. Raw pixels give the probe's own reference.

    python benchmarks/pretrained_probe.py
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import timm
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from _common import markdown_table, write_outputs  # noqa: E402

from mambacl.backbones import VisionMamba  # noqa: E402
from mambacl.backbones.pretrained import pretrained_file, sha256_file  # noqa: E402
from mambacl.benchmarks import get_benchmark, split_digits  # noqa: E402

TAG = "test_vim.glyphs"
MODEL_ARGS = get_benchmark("split_digits").default_model_args  # img_size 8, patch_size 2, in_chans 1

Split = Tuple[torch.Tensor, np.ndarray]


def digits_splits() -> Tuple[Split, Split]:
    """(images [n, 1, 8, 8], labels) of split_digits' train and test split, in one experience."""
    bench = split_digits(n_experiences=1)

    def stack(dataset) -> Split:
        images, labels, *_ = next(iter(DataLoader(dataset, batch_size=len(dataset), shuffle=False)))
        return images, labels.numpy()
    return stack(bench.train_stream[0].dataset), stack(bench.test_stream[0].dataset)


@torch.no_grad()
def features(model: VisionMamba, images: torch.Tensor) -> Dict[str, np.ndarray]:
    """Frozen features ``[n, dim]``: 'cls' (the head's input) and 'mean' (all tokens averaged)."""
    model.eval()
    tokens = model.forward_features(images)
    return {"cls": model.forward_head(tokens, pre_logits=True).numpy(), "mean": tokens.mean(1).numpy()}


def probe(train: Tuple[np.ndarray, np.ndarray], test: Tuple[np.ndarray, np.ndarray], folds: int) -> Dict[str, float]:
    """Logistic-regression accuracies: 'cv' (``folds``-fold CV inside train) and 'test' on standardised
    features, 'test_raw' on the features as they are (the L2 penalty then meets each feature's own scale)."""
    scaled = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    cv = cross_val_score(scaled, *train, cv=StratifiedKFold(folds, shuffle=True, random_state=0)).mean()
    return {"cv": float(cv), "test": float(scaled.fit(*train).score(*test)),
            "test_raw": float(LogisticRegression(max_iter=5000).fit(*train).score(*test))}


def backbone(seed: int, checkpoint: Optional[Path] = None) -> VisionMamba:
    """Head-less test_vim initialised from ``seed``, then loaded from ``checkpoint`` when given."""
    torch.manual_seed(seed)
    return timm.create_model("test_vim", num_classes=0, pretrained_file=checkpoint, **MODEL_ARGS)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="random-init seeds")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds inside the train split")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="probe this file instead of the packaged checkpoint (trying recipes; not recorded)")
    parser.add_argument("--no-append", action="store_true", help="do not write the section in RESULTS.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    checkpoint = args.checkpoint or pretrained_file(TAG)
    (x_train, y_train), (x_test, y_test) = digits_splits()

    runs: List[Dict[str, object]] = [dict(init="raw pixels", seed="-", feature="64 px", **probe(
        (x_train.flatten(1).numpy(), y_train), (x_test.flatten(1).numpy(), y_test), args.folds))]
    for init, seeds in (("glyphs", ["-"]), ("random", args.seeds)):
        for seed in seeds:
            model = backbone(0, checkpoint) if init == "glyphs" else backbone(seed)
            train_feats, test_feats = features(model, x_train), features(model, x_test)
            for feature in ("cls", "mean"):
                runs.append(dict(init=init, seed=seed, feature=feature, **probe(
                    (train_feats[feature], y_train), (test_feats[feature], y_test), args.folds)))
    for feature in ("cls", "mean"):
        chosen = [r for r in runs if r["init"] == "random" and r["feature"] == feature]
        runs.append(dict(init=f"random (mean of {len(chosen)})", seed="-", feature=feature,
                         **{k: statistics.mean(r[k] for r in chosen) for k in ("cv", "test", "test_raw")}))
    rows = [[r["init"], r["seed"], r["feature"], *(f"{r[k]:.3f}" for k in ("cv", "test", "test_raw"))]
            for r in runs]
    table = markdown_table(["init", "seed", "feature", f"train-split {args.folds}-fold CV acc", "test acc",
                            "test acc, unstandardised"], rows)
    file_name, digest = checkpoint.name, sha256_file(checkpoint)
    notes = (f"Backbone `test_vim` at the split_digits shape (8 px, patch 2, 1 channel, dim 32, depth 2), frozen; "
             f"logistic regression on standardised features of the split_digits train split (1,347 images), "
             f"test split 450 images. `glyphs` is `{file_name}` (sha256 {digest[:12]}...), "
             f"pretrained on procedural stroke glyphs only; recipe choices used the train-split CV column, "
             f"never the test split. The last column fits the features as they are: the random features' small "
             f"scale then meets the default L2 penalty (C=1), which is where random init loses most.")
    write_outputs("pretrained_probe", {"runs": runs, "checkpoint": file_name, "sha256": digest}, table,
                  "Linear probe on the digits: glyph-pretrained vs random test_vim (benchmarks/pretrained_probe.py)",
                  notes, record=not (args.no_append or args.checkpoint))


if __name__ == "__main__":
    main()
