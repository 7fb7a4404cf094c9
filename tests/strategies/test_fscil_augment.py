"""Mamba-FSCIL base-session mixup / cutmix against hand computations (mmcls BatchMixup/BatchCutMix semantics)."""
import random

import numpy as np
import pytest
import torch

from mambacl.strategies.fscil import PUBLISHED_BASE_MIXING, BatchMixing, mix_batch
from mambacl.strategies.fscil.augment import cutmix_box, cutmix_images, mixup_images


def test_mixup_images_hand_computed():
    x = torch.randn(5, 3, 4, 6, dtype=torch.float64)
    perm, lam = torch.tensor([2, 0, 4, 1, 3]), 0.3
    out = mixup_images(x, perm, lam)
    for i in range(5):
        expected = [[[lam * float(x[i, c, h, w]) + (1 - lam) * float(x[int(perm[i]), c, h, w])
                      for w in range(6)] for h in range(4)] for c in range(3)]
        assert torch.allclose(out[i], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("height,width,lam,center,box", [
    # ratio sqrt(1 - 0.75) = 0.5: a 16x16 box centred at (3, 30), clipped to rows 0..11, cols 22..32
    (32, 32, 0.75, (3, 30), (0, 11, 22, 32)),
    # odd cut: int(32 * sqrt(1 - 0.5486)) = 21 -> 10 on both sides (mmcls); timm's box would be 21 wide
    (32, 32, 0.5486, (16, 16), (6, 26, 6, 26)),
    (10, 20, 0.19, (9, 0), (5, 10, 0, 9)),  # int(10 * 0.9) = 9 -> half 4; int(20 * 0.9) = 18 -> half 9
    (8, 8, 1.0, (4, 4), (4, 4, 4, 4)),      # lam 1: empty box
], ids=["clipped-corner", "odd-cut", "rectangular", "empty"])
def test_cutmix_box_is_mmcls_rand_bbox(height, width, lam, center, box):
    got, corrected = cutmix_box(height, width, lam, center)
    assert got == box
    y0, y1, x0, x1 = box
    assert corrected == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (height * width), abs=1e-15)


def test_cutmix_images_hand_computed():
    x = torch.randn(4, 2, 6, 5)
    perm, box = torch.tensor([3, 2, 1, 0]), (1, 4, 2, 5)
    out = cutmix_images(x, perm, box)
    for i in range(4):
        for h in range(6):
            for w in range(5):
                source = int(perm[i]) if 1 <= h < 4 and 2 <= w < 5 else i
                assert torch.equal(out[i, :, h, w], x[source, :, h, w])
    assert not torch.equal(out, x)  # the input is left unchanged (a copy is mixed)


def _seeded(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _draw(mixing: BatchMixing, seed: int):
    """mix_batch on a fixed batch under ``seed``, then the generators re-seeded and advanced past the python
    choice and the torch permutation (mmfscil mixup.py / cutmix.py draw lam with numpy, perm with torch)."""
    x, y = torch.randn(6, 3, 8, 8), torch.arange(6)
    _seeded(seed)
    mixed = mix_batch(x, y, mixing)
    _seeded(seed)
    random.random()
    return x, y, mixed, torch.randperm(6)


def test_mix_batch_mixup_draws_follow_the_authors_code():
    x, y, mixed, perm = _draw(BatchMixing(mixup_alpha=0.8, mixup_prob=1.0), seed=3)
    lam = float(np.random.beta(0.8, 0.8))
    assert torch.equal(mixed.perm, perm) and mixed.lam == lam
    assert torch.equal(mixed.y_b, y[perm]) and torch.equal(mixed.x, lam * x + (1 - lam) * x[perm])


def test_mix_batch_cutmix_draws_follow_the_authors_code():
    x, y, cut, perm = _draw(BatchMixing(cutmix_alpha=1.0, cutmix_prob=1.0), seed=4)
    lam = float(np.random.beta(1.0, 1.0))  # then the box centre, then the box is pasted from x[perm]
    box, lam = cutmix_box(8, 8, lam, (int(np.random.randint(8)), int(np.random.randint(8))))
    assert box[1] > box[0] and box[3] > box[2]  # a non-empty box for this seed
    assert torch.equal(cut.perm, perm) and cut.lam == lam and torch.equal(cut.x, cutmix_images(x, perm, box))
    assert torch.equal(cut.y_b, y[perm])
    # the pixels taken from a different image cover exactly the corrected 1 - lam of it
    moved = (cut.x != x).any(dim=1)[perm != torch.arange(6)]
    assert moved.float().mean(dim=(1, 2)).tolist() == pytest.approx([1 - cut.lam] * len(moved), abs=1e-12)


def test_mix_batch_choice_frequencies_and_identity():
    x, y = torch.randn(4, 1, 32, 32), torch.arange(4)  # large enough for non-empty cutmix boxes
    _seeded(0)
    kinds = []
    for _ in range(4000):
        mixed = mix_batch(x, y, PUBLISHED_BASE_MIXING["cifar100"])
        if mixed.y_b is None:
            kinds.append("none")
        else:
            kinds.append("mix" if torch.equal(mixed.x, mixup_images(x, mixed.perm, mixed.lam)) else "cut")
    counts = {k: kinds.count(k) / len(kinds) for k in ("mix", "cut", "none")}
    # configs/cifar/...mambafscil.py:16-18: BatchMixupTwoLabel p .4, BatchCutMixTwoLabel p .4, Identity p .2
    assert counts == pytest.approx({"mix": 0.4, "cut": 0.4, "none": 0.2}, abs=0.03)
    unchanged = mix_batch(x, y, BatchMixing())
    assert unchanged.x is x and unchanged.y_b is None and unchanged.lam == 1.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(mixup_prob=0.5), "mixup_alpha"),
    (dict(cutmix_prob=1.5, cutmix_alpha=1.0), "cutmix_prob"),
    (dict(mixup_alpha=1.0, mixup_prob=0.7, cutmix_alpha=1.0, cutmix_prob=0.7), "mixup_prob"),
    (dict(mix_loss="mean"), "mix_loss"),
], ids=["alpha-missing", "prob-above-one", "probs-sum", "loss-name"])
def test_batch_mixing_rejects(kwargs, match):
    with pytest.raises(ValueError, match=f"^{match}"):
        BatchMixing(**kwargs)
