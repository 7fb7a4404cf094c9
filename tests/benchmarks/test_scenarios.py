"""Class-incremental scenarios: class orders, split digits, Split CIFAR-100 and ImageNet-R on generated folders."""
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.datasets import load_digits

from mambacl.benchmarks import class_order, create_benchmark, imagenet_r, read_coda_split, split_cifar100, split_digits
from mambacl.benchmarks.fscil import write_synthetic_cifar100
from mambacl.experiments.results import accuracy_matrix, summarize

SHARED = Path(__file__).parents[2] / ".." / "shared"
CODA = SHARED / "data" / "imagenet_r"


def test_class_orders_match_their_definitions():
    np.random.seed(1993)
    pycil = np.random.permutation(100).tolist()
    assert class_order("pycil", range(100)) == pycil
    assert pycil[:10] == [68, 56, 78, 8, 23, 84, 90, 65, 74, 76]  # PyCIL's documented order
    np.random.seed(7)
    assert class_order(7, range(10)) == np.random.permutation(10).tolist()
    state = np.random.get_state()[1].copy()
    class_order(3, range(10))
    assert (np.random.get_state()[1] == state).all(), "a seeded order must not touch numpy's global RNG"
    assert class_order("natural", [5, 2, 9]) == [2, 5, 9]
    assert class_order([9, 2, 5], [2, 5, 9]) == [9, 2, 5]
    assert class_order(1, [10, 20, 30]) == [[10, 20, 30][i] for i in np.random.RandomState(1).permutation(3)]
    for bad in ("sorted", [0, 1], True):
        with pytest.raises(ValueError, match="class_order"):
            class_order(bad, range(3))


def test_split_digits_is_a_fixed_stratified_class_incremental_split():
    bench = split_digits()
    digits = load_digits()
    assert [list(e.classes_in_this_experience) for e in bench.train_stream] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    train = torch.cat([torch.stack([x for x, *_ in e.dataset]) for e in bench.train_stream]).flatten(1)
    test = torch.cat([torch.stack([x for x, *_ in e.dataset]) for e in bench.test_stream]).flatten(1)
    assert len(train) + len(test) == len(digits.target) and len(test) == 450
    # every image is one of sklearn's, scaled to [0, 1]; train and test are disjoint (no duplicate rows)
    all_images = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    assert torch.unique(torch.cat([train, test, all_images]), dim=0).shape[0] == torch.unique(all_images, dim=0).shape[0]
    labels = np.array([int(y) for e in bench.test_stream for _, y, *_ in e.dataset])
    np.testing.assert_allclose(np.bincount(labels) / len(labels), np.bincount(digits.target) / 1797, atol=0.01)
    again = split_digits()
    assert torch.equal(again.train_stream[2].dataset[5][0], bench.train_stream[2].dataset[5][0])
    small = split_digits(n_experiences=2, class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0], max_per_class=3)
    x, y, _ = small.train_stream[0].dataset[0]
    assert small.class_order[0] == 9 and len(small.train_stream[0].dataset) == 15
    assert any(torch.equal(x.flatten(), img) for img in all_images[digits.target == small.class_order[int(y)]])
    with pytest.raises(ValueError, match="n_experiences must be a positive divisor"):
        split_digits(n_experiences=3)


def test_split_cifar100_reads_a_torchvision_pickle_folder(tmp_path):
    folder = write_synthetic_cifar100(tmp_path, num_classes=100, train_per_class=2, test_per_class=1)
    bench = split_cifar100(tmp_path, n_experiences=10, class_order="pycil", img_size=32, download=False)
    order = class_order("pycil", range(100))
    assert bench.class_order == order and len(bench.train_stream) == 10
    assert [len(e.dataset) for e in bench.train_stream] == [20] * 10
    with open(folder / "test", "rb") as f:
        raw = pickle.load(f)
    exp = bench.test_stream[3].dataset.eval()
    x, y, _ = exp[0]
    original = order[int(y)]
    assert 30 <= int(y) < 40
    candidates = [np.asarray(raw["data"][i]).reshape(3, 32, 32) for i, t in enumerate(raw["fine_labels"]) if t == original]
    mean, std = torch.tensor([0.5071, 0.4865, 0.4409]), torch.tensor([0.2673, 0.2564, 0.2762])
    pixels = (x * std[:, None, None] + mean[:, None, None]) * 255
    assert any(torch.allclose(pixels, torch.tensor(c, dtype=torch.float32), atol=0.01) for c in candidates)
    big = split_cifar100(tmp_path, n_experiences=5, img_size=48, download=False)
    assert big.train_stream[0].dataset[0][0].shape == (3, 48, 48)


def test_missing_cifar_folder_names_the_folder_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        create_benchmark("split_cifar100", root=tmp_path / "nowhere", download=False)
    assert str(tmp_path / "nowhere" / "cifar-100-python") in str(err.value) and "download=True" in str(err.value)
    with pytest.raises(ValueError, match="has no argument"):
        create_benchmark("split_cifar100", rooot=tmp_path)


def _imagenet_r_tree(root: Path, entries):
    for i, (rel, label) in enumerate(entries):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((6, 6, 3), (label * 37 + i) % 256, dtype=np.uint8)).save(path, format="PNG")


def _coda_yaml(path: Path, entries):
    path.write_text(yaml.safe_dump({"data": [f"data/imagenet-r/{rel}" for rel, _ in entries],
                                    "targets": [label for _, label in entries]}))


@pytest.mark.skipif(not CODA.is_dir(), reason=f"CODA-Prompt split files not found in {CODA} (shared data absent)")
def test_real_coda_prompt_splits_parse_and_drive_a_matching_tree(tmp_path):
    train, test = read_coda_split(CODA / "imagenet-r_train.yaml"), read_coda_split(CODA / "imagenet-r_test.yaml")
    assert (len(train), len(test)) == (24000, 6000)
    assert not {p for p, _ in train} & {p for p, _ in test}
    wnid_label = {p.split("/")[0]: t for p, t in train}
    assert len(wnid_label) == 200 and sorted(wnid_label.values()) == list(range(200))
    assert all(wnid_label[p.split("/")[0]] == t for p, t in test)
    assert [wnid_label[w] for w in sorted(wnid_label)] != list(range(200))  # not in sorted-wnid order
    # a tiny tree for 4 classes of the real split, with the real file names and labels
    labels = sorted(wnid_label.values())[:4]
    sub_train = [e for c in labels for e in [x for x in train if x[1] == c][:3]]
    sub_test = [e for c in labels for e in [x for x in test if x[1] == c][:2]]
    root = tmp_path / "imagenet-r"
    _imagenet_r_tree(root, sub_train + sub_test)
    _coda_yaml(tmp_path / "train.yaml", sub_train)
    _coda_yaml(tmp_path / "test.yaml", sub_test)
    bench = imagenet_r(root, tmp_path / "train.yaml", tmp_path / "test.yaml", n_experiences=2, img_size=16)
    assert bench.class_order == labels
    assert [len(e.dataset) for e in bench.train_stream] == [6, 6]
    assert [len(e.dataset) for e in bench.test_stream] == [4, 4]
    x, y, _ = bench.test_stream[1].dataset[0]
    assert x.shape == (3, 16, 16) and int(y) in (2, 3)


def test_imagenet_r_seeded_split_is_written_once_and_tarball_is_extracted(tmp_path):
    wnids = ["n01443537", "n01484850", "n01494475", "n01496331"]
    entries = [(f"{w}/art_{i}.jpg", c) for c, w in enumerate(wnids) for i in range(10)]
    src = tmp_path / "src" / "imagenet-r"
    _imagenet_r_tree(src, entries)
    with tarfile.open(tmp_path / "imagenet-r.tar", "w") as tar:
        tar.add(src, arcname="imagenet-r")
    root = tmp_path / "data" / "imagenet-r"
    with pytest.raises(FileNotFoundError, match="imagenet-r.tar"):
        imagenet_r(root, n_experiences=2)
    bench = imagenet_r(root, n_experiences=2, img_size=16, tarball=tmp_path / "imagenet-r.tar", split_seed=3)
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == wnids
    split_train = root / "mambacl_split_seed3_train.yaml"
    train, test = read_coda_split(split_train), read_coda_split(root / "mambacl_split_seed3_test.yaml")
    assert len(train) == 32 and len(test) == 8 and not {p for p, _ in train} & {p for p, _ in test}
    assert sorted(train + test) == sorted(entries)  # labels follow sorted wnids
    files = sorted(entries)
    assert test == [files[i] for i in sorted(np.random.RandomState(3).permutation(40)[32:])]
    stamp = split_train.stat().st_mtime_ns
    again = imagenet_r(root, n_experiences=2, img_size=16, split_seed=3)
    assert split_train.stat().st_mtime_ns == stamp and len(again.train_stream[0].dataset) == len(bench.train_stream[0].dataset)
    (root / wnids[0] / "art_0.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        imagenet_r(root, n_experiences=2, split_seed=3)
    with pytest.raises(ValueError, match="together"):
        imagenet_r(root, train_split=split_train)


def test_accuracy_matrix_and_summary_by_hand():
    rows = [{"acc_per_exp": [0.9], "acc_stream": 0.9, "acc_task_mean": 0.9, "forgetting": 0.0, "bwt": 0.0},
            {"acc_per_exp": [0.5, 0.8], "acc_stream": 0.6, "acc_task_mean": 0.65, "forgetting": 0.4, "bwt": -0.4}]
    assert accuracy_matrix(rows, 3) == [[0.9, None, None], [0.5, 0.8, None]]
    final = summarize(rows)
    assert final["avg_incremental_acc"] == pytest.approx(0.75) and final["acc_sample_weighted"] == 0.6
    assert final["forgetting"] == 0.4 and final["acc_task_mean"] == 0.65
