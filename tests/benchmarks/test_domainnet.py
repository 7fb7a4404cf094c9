"""DomainNet (Mamba-CL's 200-class subset): the packaged split lists and the builder on a generated folder."""
import gzip
import hashlib
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from mambacl.benchmarks import create_benchmark, domainnet

sys.path.insert(0, str(Path(__file__).parents[1]))
from data_layouts import write_domainnet  # noqa: E402

SPLITS = Path(__file__).resolve().parents[2] / "mambacl" / "benchmarks" / "splits" / "domainnet"
SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "domainnet"


def _lines(name: str):
    return gzip.decompress((SPLITS / name).read_bytes()).decode().splitlines()


@pytest.mark.parametrize("name,blob,n_lines", [
    ("sdomain_train.txt.gz", "cf3834f91ee2ce69874f752123c1029df12a41c8", 47532),
    ("sdomain_val.txt.gz", "ede12d310e45e91aa274b71c0c4520eabc0e369e", 20450),
], ids=["train", "val"])
def test_packaged_lists_are_the_authors_files(name, blob, n_lines):
    data = gzip.decompress((SPLITS / name).read_bytes())
    # git's blob hash of the uncompressed file equals that of zugexiaodui/mamba-cl tools/ at commit 0ebac10
    assert hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() == blob
    lines = data.decode().splitlines()
    assert len(lines) == n_lines and all(len(line.split(" ")) == 2 for line in lines)
    assert {int(line.split(" ")[1]) for line in lines} == set(range(200))
    assert {line.split("/")[0] for line in lines} == {"clipart", "infograph", "painting", "quickdraw", "real", "sketch"}
    if SHARED.is_dir():
        assert data == (SHARED / name[:-3]).read_bytes()


def test_packaged_lists_domains_and_disjointness():
    train, val = _lines("sdomain_train.txt.gz"), _lines("sdomain_val.txt.gz")
    # shared/data/README.md: train per domain
    assert Counter(line.split("/")[0] for line in train) == {"real": 15172, "quickdraw": 14000, "painting": 7404,
                                                            "sketch": 6354, "clipart": 2305, "infograph": 2297}
    assert not {line.split(" ")[0] for line in train} & {line.split(" ")[0] for line in val}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """A DomainNet folder in the distributed layout with the first listed train and val image of every class."""
    root = tmp_path_factory.mktemp("domainnet")
    train, val = write_domainnet(root)
    return root, train, val


def test_domainnet_builder_on_the_real_layout(tree):
    root, train, val = tree
    bench = create_benchmark("domainnet", root=root, max_per_class=1, img_size=8)
    assert len(bench.train_stream) == 10
    assert all(len(e.classes_in_this_experience) == 20 for e in bench.train_stream)
    assert bench.class_order == list(range(200))
    assert [len(e.dataset) for e in bench.train_stream] == [20] * 10
    assert [len(e.dataset) for e in bench.test_stream] == [20] * 10
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None], torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    for stream in (bench.train_stream, bench.test_stream):
        dataset = stream[7].dataset.eval()
        for i in range(len(dataset)):
            x, y, _ = dataset[i]
            pixel = (x * std + mean) * 255
            assert x.shape == (3, 8, 8) and abs(float(pixel.mean()) - bench.class_order[int(y)]) < 2.5


def test_domainnet_mambacl_order_is_the_authors_manager(tree):
    root, _, _ = tree
    for seed in (2024, 2025):
        bench = domainnet(root, max_per_class=1, img_size=8, class_order=f"mambacl:{seed}")
        # zugexiaodui/mamba-cl utils/continual_manager.py on their class list (folders 000..199 = the list labels)
        task_classes = np.array(list(range(200)), dtype=np.int64)
        np.random.Generator(np.random.PCG64(seed)).shuffle(task_classes)
        task_classes = task_classes.reshape(10, -1).tolist()
        for exp, expected in zip(bench.train_stream, task_classes):
            assert sorted(bench.class_order[c] for c in exp.classes_in_this_experience) == sorted(expected)


def test_domainnet_split_overrides_and_missing_images(tree, tmp_path):
    root, train, val = tree
    labels = [3, 4, 5, 6]
    (tmp_path / "train.txt").write_text("".join(f"{train[c]} {c}\n" for c in labels))
    with gzip.open(tmp_path / "val.txt.gz", "wt") as f:
        f.write("".join(f"{val[c]} {c}\n" for c in labels))
    bench = domainnet(root, train_split=tmp_path / "train.txt", test_split=tmp_path / "val.txt.gz",
                      n_experiences=2, img_size=8)
    assert bench.class_order == labels and [len(e.dataset) for e in bench.train_stream] == [2, 2]
    (root / train[5]).rename(root / (train[5] + ".moved"))
    try:
        with pytest.raises(FileNotFoundError, match=r"1 of the 8 images .* missing under root=") as err:
            domainnet(root, train_split=tmp_path / "train.txt", test_split=tmp_path / "val.txt.gz", n_experiences=2)
        assert str(root / train[5]) in str(err.value)
    finally:
        (root / (train[5] + ".moved")).rename(root / train[5])
