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
from torchvision import transforms as T

from mambacl.benchmarks import (class_order, create_benchmark, imagenet_r, mambacl_transforms, read_coda_split,
                                split_cifar100, split_digits)
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
    rows = [{"acc_per_exp": [0.9], "acc_stream": 0.9, "acc_task_mean": 0.9, "forgetting": 0.0, "bwt": 0.0,
             "within_task_acc": 0.9, "ncm_acc": 0.7},
            {"acc_per_exp": [0.5, 0.8], "acc_stream": 0.6, "acc_task_mean": 0.65, "forgetting": 0.4, "bwt": -0.4,
             "within_task_acc": 0.85, "ncm_acc": 0.75}]
    assert accuracy_matrix(rows, 3) == [[0.9, None, None], [0.5, 0.8, None]]
    final = summarize(rows)
    assert final["avg_incremental_acc"] == pytest.approx(0.75) and final["acc_sample_weighted"] == 0.6
    assert final["forgetting"] == 0.4 and final["acc_task_mean"] == 0.65
    assert final["within_task_acc"] == 0.85 and final["ncm_acc"] == 0.75


def _authors_task_classes(class_list, num_tasks, seed):
    """zugexiaodui/mamba-cl utils/continual_manager.py ClassIncrementalManager (shuffle_level 'class')."""
    rng = np.random.Generator(np.random.PCG64(seed))
    task_class_list = np.array(class_list, dtype=np.int64)
    rng.shuffle(task_class_list)
    return np.reshape(task_class_list, [num_tasks, -1]).tolist()


@pytest.mark.parametrize("seed", [2024, 2025, 2026])
def test_mambacl_class_order_is_the_authors_manager(seed, tmp_path):
    expected = _authors_task_classes(list(range(100)), 10, seed)
    assert class_order(f"mambacl:{seed}", range(100)) == [c for task in expected for c in task]
    state = np.random.get_state()[1].copy()
    class_order(f"mambacl:{seed}", range(10))
    assert (np.random.get_state()[1] == state).all()
    # their labels relabelled: our class mambacl_labels[i] is their class i
    relabel = [(7 * i) % 100 for i in range(100)]
    assert class_order(f"mambacl:{seed}", range(100), relabel) == [relabel[c] for task in expected for c in task]
    # Split CIFAR-100: their CIFAR label is the fine label (tools/cifar100_*.txt folders), so experiences match
    write_synthetic_cifar100(tmp_path, num_classes=100, train_per_class=1, test_per_class=1)
    bench = split_cifar100(tmp_path, class_order=f"mambacl:{seed}", img_size=32)
    for exp, task in zip(bench.train_stream, expected):
        assert sorted(bench.class_order[c] for c in exp.classes_in_this_experience) == sorted(task)


@pytest.mark.skipif(not CODA.is_dir(), reason=f"CODA-Prompt split files not found in {CODA} (shared data absent)")
def test_imagenet_r_mambacl_order_uses_their_sorted_wnid_labels(tmp_path):
    """Their ImageNetRPath labels classes by sorted wnid, CODA's yaml does not: the order must follow the wnids."""
    train, test = read_coda_split(CODA / "imagenet-r_train.yaml"), read_coda_split(CODA / "imagenet-r_test.yaml")
    first = {}
    for is_test, entries in enumerate((train, test)):
        for rel, label in entries:
            first.setdefault((label, is_test), rel)
    root = tmp_path / "imagenet-r"
    _imagenet_r_tree(root, [(rel, label) for (label, _), rel in first.items()])
    bench = imagenet_r(root, CODA / "imagenet-r_train.yaml", CODA / "imagenet-r_test.yaml", max_per_class=1,
                       class_order="mambacl:2024", img_size=8)
    assert [len(e.dataset) for e in bench.train_stream] == [20] * 10
    wnids = sorted({rel.split("/")[0] for rel, _ in train})
    coda_label = {rel.split("/")[0]: label for rel, label in train}
    for exp, task in zip(bench.train_stream, _authors_task_classes(list(range(200)), 10, 2024)):
        assert sorted(bench.class_order[c] for c in exp.classes_in_this_experience) == \
            sorted(coda_label[wnids[i]] for i in task)


def _photo(size=(37, 29), seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("dataset", ["cifar100", "imagenet_r", "domainnet"])
def test_mambacl_transforms_match_the_authors_pipelines(dataset):
    """zugexiaodui/mamba-cl utils/dataset_builder.py define_dataset, transform_type 'autoaug', 192 px."""
    cifar = dataset == "cifar100"
    interp = T.InterpolationMode.BICUBIC if cifar else T.InterpolationMode.BILINEAR  # train_eval.py interp 'auto'
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    policy = T.AutoAugmentPolicy.CIFAR10 if cifar else T.AutoAugmentPolicy.IMAGENET
    theirs_train = T.Compose([T.AutoAugment(policy, T.InterpolationMode.BILINEAR),
                              T.RandomResizedCrop((192, 192), interpolation=interp, antialias=True), T.ToTensor(),
                              T.Normalize(mean, std)])
    if cifar:
        theirs_eval = T.Compose([T.Resize((192, 192), antialias=True, interpolation=interp), T.ToTensor(),
                                 T.Normalize(mean, std)])
    else:
        theirs_eval = T.Compose([T.Resize((224, 224), antialias=True, interpolation=interp), T.CenterCrop(192),
                                 T.ToTensor(), T.Normalize(mean, std)])
    train, evaluate = mambacl_transforms(dataset, 192)
    image = _photo()
    assert torch.equal(evaluate(image), theirs_eval(image))
    assert [type(t) for t in train.transforms] == [T.AutoAugment, T.RandomResizedCrop, T.ToTensor, T.Normalize]
    auto, crop = train.transforms[:2]
    assert (auto.policy, auto.interpolation) == (policy, T.InterpolationMode.BILINEAR)
    assert (crop.size, crop.scale, crop.interpolation) == ((192, 192), (0.08, 1.0), interp)
    for seed in range(3):  # same random draws -> same augmented tensor
        torch.manual_seed(seed)
        ours = train(image)
        torch.manual_seed(seed)
        assert torch.equal(ours, theirs_train(image))


def test_builders_take_the_mambacl_transforms_and_max_per_class(tmp_path):
    folder = write_synthetic_cifar100(tmp_path, num_classes=100, train_per_class=3, test_per_class=2)
    bench = split_cifar100(tmp_path, augment="mambacl", img_size=16, max_per_class=2, n_experiences=2)
    assert [len(e.dataset) for e in bench.train_stream] == [100, 100]
    assert [len(e.dataset) for e in bench.test_stream] == [100, 100]
    x, y, _ = bench.test_stream[1].dataset.eval()[0]
    assert x.shape == (3, 16, 16)
    with open(folder / "test", "rb") as f:
        raw = pickle.load(f)
    # the kept test images are the first two of every class, in file order
    kept = [i for c in range(100) for i in [j for j, t in enumerate(raw["fine_labels"]) if t == c][:2]]
    eval_set = bench.test_stream[0].dataset.eval()
    image = Image.fromarray(raw["data"][kept[0]].reshape(3, 32, 32).transpose(1, 2, 0))
    first = mambacl_transforms("cifar100", 16)[1](image)
    assert any(torch.equal(eval_set[i][0], first) for i in range(len(eval_set)))
    everything = split_cifar100(tmp_path, img_size=32, max_per_class=10 ** 6)
    assert sum(len(e.dataset) for e in everything.train_stream) == 300


def test_split_cifar100_never_downloads_unless_asked(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100

    def no_network(self):
        raise AssertionError("split_cifar100 tried to download")
    monkeypatch.setattr(CIFAR100, "download", no_network)
    with pytest.raises(FileNotFoundError) as err:
        split_cifar100(tmp_path / "none")
    message = str(err.value)
    assert f"root={tmp_path / 'none'}" in message and "download=True" in message and "extract" in message
