"""Pieces of benchmarks/pretrained_probe.py: the digits split it probes is split_digits' split, the features."""
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

sys.path.insert(0, str(Path(__file__).parents[2] / "benchmarks"))
import pretrained_probe  # noqa: E402


def test_probed_images_are_the_stratified_split_of_split_digits():
    (x_train, y_train), (x_test, y_test) = pretrained_probe.digits_splits()
    digits = load_digits()
    train_idx, test_idx = train_test_split(np.arange(len(digits.target)), test_size=0.25, stratify=digits.target,
                                           random_state=0)
    for x, y, idx in ((x_train, y_train, train_idx), (x_test, y_test, test_idx)):
        order = np.lexsort(x.flatten(1).numpy().T)  # Avalanche may reorder; compare as sets of (image, label)
        ref = digits.images[idx].reshape(len(idx), -1) / 16.0
        ref_order = np.lexsort(ref.T)
        np.testing.assert_allclose(x.flatten(1).numpy()[order], ref[ref_order], rtol=0, atol=1e-7)
        assert np.array_equal(y[order], digits.target[idx][ref_order])


def test_features_are_the_head_input_and_the_token_mean():
    model = pretrained_probe.backbone(0)
    images = torch.rand(3, 1, 8, 8)
    feats = pretrained_probe.features(model, images)
    with torch.no_grad():
        tokens = model.forward_features(images)
        assert np.allclose(feats["cls"], model(images).numpy()) and feats["cls"].shape == (3, 32)
        assert np.allclose(feats["mean"], tokens.mean(1).numpy())
