"""Bad input to the benchmark layer: each case raises the exact exception type with a message naming the argument;
valid edge cases give the reference result."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mambacl.benchmarks import class_order, create_benchmark, mambacl_transforms
from mambacl.benchmarks.fscil import FSCILSpec, write_synthetic_cifar100

SMALL_FSCIL = dict(num_classes=8, num_base=4, n_way=2, n_shot=2)


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_synthetic_cifar100(root, num_classes=100, train_per_class=2, test_per_class=1)
    return root


@pytest.fixture(scope="module")
def domain(tmp_path_factory):
    """A 4-class DomainNet-layout folder with its two list files (2 train + 1 test image per class)."""
    root = tmp_path_factory.mktemp("domainnet")
    train, test = [], []
    for c, name in enumerate(["apple", "bus", "cat", "dog"]):
        for k, (domain, ext) in enumerate([("real", "jpg"), ("quickdraw", "png"), ("sketch", "jpg")]):
            rel = f"{domain}/{name}/{domain}_{c:03d}_{k:06d}.{ext}"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((4, 4, 3), 10 * c, dtype=np.uint8)).save(root / rel)
            (test if k == 2 else train).append(f"{rel} {c}")
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "test.txt").write_text("\n".join(test) + "\n")
    return root


def _domain_args(root: Path, **kwargs):
    return dict(root=root, train_split=root / "train.txt", test_split=root / "test.txt", n_experiences=2,
                img_size=8, **kwargs)


def _bad_split(tmp_path: Path, domain: Path, text: str, name: str = "bad.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("name,kwargs,exc,match", [
    ("cifar", {}, ValueError, "unknown benchmark 'cifar'"),
    ("split_digits", {"n_experience": 5}, ValueError, r"no argument\(s\) \['n_experience'\]"),
    ("split_digits", {"n_experiences": 3}, ValueError, "n_experiences must be a positive divisor"),
    ("split_digits", {"n_experiences": 0}, ValueError, "n_experiences"),
    ("split_digits", {"n_experiences": True}, ValueError, "n_experiences"),
    ("split_digits", {"n_experiences": "5"}, ValueError, "n_experiences"),
    ("split_digits", {"class_order": "sorted"}, ValueError, "class_order"),
    ("split_digits", {"class_order": "mambacl:seed"}, ValueError, "class_order"),
    ("split_digits", {"class_order": "mambacl:"}, ValueError, "class_order"),
    ("split_digits", {"class_order": [0, 1, 2]}, ValueError, "class_order"),
    ("split_digits", {"class_order": True}, ValueError, "class_order"),
    ("split_digits", {"max_per_class": 0}, ValueError, "max_per_class"),
    ("split_digits", {"max_per_class": 1.5}, ValueError, "max_per_class"),
    ("split_digits", {"max_per_class": True}, ValueError, "max_per_class"),
], ids=["unknown-name", "unknown-argument", "n-experiences-not-divisor", "n-experiences-zero", "n-experiences-bool",
        "n-experiences-str", "class-order-name", "class-order-mambacl-no-seed", "class-order-mambacl-empty",
        "class-order-not-permutation", "class-order-bool", "max-per-class-zero", "max-per-class-float",
        "max-per-class-bool"])
def test_create_benchmark_rejects(name, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        create_benchmark(name, **kwargs)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(img_size=4), ValueError, "img_size"),
    (dict(img_size="224"), ValueError, "img_size"),
    (dict(img_size=16, augment="autoaug"), ValueError, "augment"),
    (dict(max_per_class=-1), ValueError, "max_per_class"),
    (dict(n_experiences=7), ValueError, "n_experiences"),
], ids=["img-size-small", "img-size-str", "augment-unknown", "max-per-class-negative", "n-experiences-7"])
def test_split_cifar100_rejects(cifar, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        create_benchmark("split_cifar100", root=cifar, **kwargs)


@pytest.mark.parametrize("builder,kwargs,match", [
    ("split_cifar100", {}, r"root=.*download=True"),
    ("fscil_cifar100", {}, "not found under root"),
    ("fscil_mini_imagenet", {}, "not found under root"),
    ("fscil_cub200", {}, "not found under root"),
    ("domainnet", {}, "root="),
    ("imagenet_r", {}, "root=.*tarball"),
], ids=["split-cifar100", "fscil-cifar100", "fscil-mini", "fscil-cub", "domainnet", "imagenet-r"])
def test_missing_roots_are_named_and_nothing_is_downloaded(tmp_path, builder, kwargs, match):
    with pytest.raises(FileNotFoundError, match=match):
        create_benchmark(builder, root=tmp_path / "absent", **kwargs)
    assert not (tmp_path / "absent").exists()


def test_domainnet_missing_split_files_are_named(domain, tmp_path):
    with pytest.raises(FileNotFoundError, match="train_split: split file .* does not exist"):
        create_benchmark("domainnet", **{**_domain_args(domain), "train_split": tmp_path / "none.txt"})
    with pytest.raises(FileNotFoundError, match="test_split: split file .* does not exist"):
        create_benchmark("domainnet", **{**_domain_args(domain), "test_split": tmp_path / "none.txt.gz"})


@pytest.mark.parametrize("text,match", [
    ("real/apple/a.jpg\n", "line 1 must be '<relative path> <label>'"),
    ("real/apple/a.jpg 0\nreal/bus/b.jpg one\n", "line 2"),
    ("real/apple/a.jpg -1\n", "line 1"),
    ("real/apple/a.jpg 0 extra\n", "line 1"),
    ("\n\n", "lists no images"),
    ("real/apple/a.jpg 0\nreal/apple/b.jpg 1\n", "one-folder-one-label"),
], ids=["no-label", "non-integer-label", "negative-label", "three-fields", "empty", "folder-two-labels"])
def test_domainnet_corrupted_split_files(domain, tmp_path, text, match):
    bad = _bad_split(tmp_path, domain, text)
    with pytest.raises(ValueError, match=f"test_split: .*{match}"):
        create_benchmark("domainnet", **{**_domain_args(domain), "test_split": bad})


def test_domainnet_corrupted_gzip_and_inconsistent_labels(domain, tmp_path):
    broken = tmp_path / "broken.txt.gz"
    broken.write_bytes(gzip.compress(b"real/apple/a.jpg 0\n")[:-12])
    with pytest.raises(ValueError, match="train_split: split file .* not a readable"):
        create_benchmark("domainnet", **{**_domain_args(domain), "train_split": broken})
    # the test list swaps the labels of apple (0) and bus (1): consistent alone, not with the train list
    swapped = (domain / "test.txt").read_text().replace(".jpg 0", ".jpg x").replace(".jpg 1", ".jpg 0")
    relabelled = _bad_split(tmp_path, domain, swapped.replace(".jpg x", ".jpg 1"))
    with pytest.raises(ValueError, match="train_split and test_split"):
        create_benchmark("domainnet", **{**_domain_args(domain), "test_split": relabelled})


def test_domainnet_missing_images_are_counted_with_an_example(domain, tmp_path):
    listed = (domain / "train.txt").read_text() + "real/zebra/real_999_000000.jpg 0\n"
    extra = _bad_split(tmp_path, domain, listed.replace("real/zebra", "real/apple"))
    with pytest.raises(FileNotFoundError, match=r"1 of the 13 images .* under root=.*real_999_000000\.jpg"):
        create_benchmark("domainnet", **{**_domain_args(domain), "train_split": extra})


def test_imagenet_r_split_arguments(tmp_path):
    root = tmp_path / "imagenet-r"
    (root / "n01443537").mkdir(parents=True)
    with pytest.raises(ValueError, match="train_split and test_split must be given together"):
        create_benchmark("imagenet_r", root=root, train_split=tmp_path / "a.yaml")
    with pytest.raises(ValueError, match="train_fraction"):
        create_benchmark("imagenet_r", root=root, train_fraction=1.5)
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [a\n")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"data": ["data/imagenet-r/n01443537/a.jpg"], "targets": [0]}))
    with pytest.raises(ValueError, match="train_split: split file .* not valid YAML"):
        create_benchmark("imagenet_r", root=root, train_split=bad, test_split=good)
    mismatch = tmp_path / "mismatch.yaml"
    mismatch.write_text(yaml.safe_dump({"data": ["data/imagenet-r/n01443537/a.jpg"], "targets": [0, 1]}))
    with pytest.raises(ValueError, match="test_split: .*1 paths but 2 targets"):
        create_benchmark("imagenet_r", root=root, train_split=good, test_split=mismatch)
    with pytest.raises(FileNotFoundError, match="test_split: split file"):
        create_benchmark("imagenet_r", root=root, train_split=good, test_split=tmp_path / "none.yaml")


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_per_class=0), "max_per_class"),
    (dict(spec=dict(num_classes=8, num_base=4, n_way=3, n_shot=2)), "multiple of n_way"),
    (dict(spec=dict(num_classes=8, num_base=4, n_way=2, n_shot=9)), "n_shot"),
], ids=["max-per-class-zero", "spec-n-way", "spec-n-shot"])
def test_fscil_cifar100_rejects(tmp_path, kwargs, match):
    write_synthetic_cifar100(tmp_path, num_classes=8, train_per_class=6, test_per_class=2)
    with pytest.raises(ValueError, match=match):
        create_benchmark("fscil_cifar100", root=tmp_path, **{"spec": SMALL_FSCIL, **kwargs})


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(dataset="cifar10"), ValueError, "dataset"),
    (dict(dataset="cifar100", img_size=0), ValueError, "img_size"),
    (dict(dataset="domainnet", img_size=19.5), ValueError, "img_size"),
], ids=["dataset", "img-size-zero", "img-size-float"])
def test_mambacl_transforms_rejects(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        mambacl_transforms(**kwargs)


def test_mambacl_labels_must_be_a_permutation():
    with pytest.raises(ValueError, match="mambacl_labels"):
        class_order("mambacl:2024", range(4), [0, 1, 2, 2])


# ------------------------------------------------------------------------------------------ valid edge cases
def test_edge_max_per_class_at_least_the_class_size_keeps_everything(cifar):
    full = create_benchmark("split_cifar100", root=cifar, img_size=32, n_experiences=5)
    capped = create_benchmark("split_cifar100", root=cifar, img_size=32, n_experiences=5, max_per_class=2)
    assert [len(e.dataset) for e in capped.train_stream] == [len(e.dataset) for e in full.train_stream] == [40] * 5


def test_edge_one_experience_holds_every_class(cifar):
    bench = create_benchmark("split_cifar100", root=cifar, img_size=32, n_experiences=1, class_order="mambacl:0")
    assert len(bench.train_stream) == 1 and sorted(bench.train_stream[0].classes_in_this_experience) == list(range(100))
    order = np.arange(100)
    np.random.Generator(np.random.PCG64(0)).shuffle(order)
    assert bench.class_order == order.tolist()


def test_edge_one_image_per_class_in_every_fscil_session(tmp_path):
    write_synthetic_cifar100(tmp_path, num_classes=8, train_per_class=6, test_per_class=2)
    bench = create_benchmark("fscil_cifar100", root=tmp_path, spec=SMALL_FSCIL, max_per_class=1)
    spec = FSCILSpec(**SMALL_FSCIL)
    assert [len(e.dataset) for e in bench.train_stream] == [4, 2, 2]
    assert [len(e.dataset) for e in bench.test_stream] == [4 + t * spec.n_way for t in range(spec.num_sessions)]


def test_edge_domainnet_whole_lists_and_mambacl_order(domain):
    bench = create_benchmark("domainnet", **_domain_args(domain, class_order="mambacl:2024"))
    order = np.arange(4)
    np.random.Generator(np.random.PCG64(2024)).shuffle(order)
    assert bench.class_order == order.tolist()
    assert [len(e.dataset) for e in bench.train_stream] == [4, 4]
    assert [len(e.dataset) for e in bench.test_stream] == [2, 2]
