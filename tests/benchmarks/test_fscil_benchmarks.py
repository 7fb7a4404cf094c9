"""FSCIL scenarios: the real CEC index lists, the seeded sampler, and Avalanche streams on generated CIFAR data."""
import dataclasses
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from mambacl.benchmarks.fscil import (
    FSCIL_SPECS,
    FSCILSpec,
    cec_sessions,
    fscil_cifar100,
    fscil_transforms,
    fscil_cub200,
    fscil_mini_imagenet,
    label_from_list_entry,
    read_index_list,
    sample_sessions,
    write_synthetic_cifar100,
)

sys.path.insert(0, str(Path(__file__).parents[1]))
from data_layouts import write_cec_lists, write_cub200, write_mini_imagenet  # noqa: E402

LISTS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fscil"
needs_lists = pytest.mark.skipif(not LISTS.is_dir(), reason=f"CEC index lists not found at {LISTS}")


@needs_lists
def test_cifar100_lists_shapes_and_disjoint():
    sessions = cec_sessions("cifar100", LISTS / "cifar100")
    assert [len(s) for s in sessions] == [30000] + [25] * 8
    rows = [int(e) for s in sessions for e in s]
    assert len(set(rows)) == 30200 and 0 <= min(rows) and max(rows) < 50000
    # fscil.md: CEC session_2 starts with the five 'plain' shots that Mamba-FSCIL hard-codes.
    assert [int(e) for e in sessions[1][:5]] == [29774, 33344, 4815, 6772, 48317]


@needs_lists
def test_mini_imagenet_lists_class_sets():
    sessions = cec_sessions("mini_imagenet", LISTS / "mini_imagenet")
    assert [len(s) for s in sessions] == [30000] + [25] * 8
    wnids = sorted({Path(e).parent.name for s in sessions for e in s})
    assert len(wnids) == 100
    spec = FSCIL_SPECS["mini_imagenet"]
    for t, entries in enumerate(sessions):
        labels = [label_from_list_entry("mini_imagenet", e, wnids) for e in entries]
        assert sorted(set(labels)) == spec.session_classes(t)
        if t:
            assert labels == sorted(labels)  # 5 consecutive lines per class
            assert np.bincount(labels, minlength=100)[spec.session_classes(t)].tolist() == [5] * 5
    assert len({e for s in sessions for e in s}) == 30200


@needs_lists
def test_cub200_lists_class_sets():
    sessions = cec_sessions("cub200", LISTS / "cub200")
    assert [len(s) for s in sessions] == [3000] + [50] * 10
    seen = set()
    for t, entries in enumerate(sessions):
        labels = [label_from_list_entry("cub200", e) for e in entries]
        expected = list(range(100)) if t == 0 else list(range(100 + 10 * (t - 1), 110 + 10 * (t - 1)))
        assert sorted(set(labels)) == expected
        counts = np.bincount(labels, minlength=200)[expected]
        assert (counts == (30 if t == 0 else 5)).all()
        assert seen.isdisjoint(entries)
        seen.update(entries)


def test_spec_session_classes_and_errors():
    spec = FSCIL_SPECS["cub200"]
    assert spec.num_sessions == 11
    assert spec.session_classes(0) == list(range(100))
    assert spec.session_classes(10) == list(range(190, 200))
    with pytest.raises(ValueError, match="session"):
        spec.session_classes(11)
    with pytest.raises(ValueError, match="multiple of n_way"):
        FSCILSpec(10, 4, 4, 1)


def test_sampler_shapes_seeded_and_disjoint():
    spec = FSCILSpec(num_classes=10, num_base=4, n_way=3, n_shot=2)
    targets = np.repeat(np.arange(10), 6)
    np.random.default_rng(1).shuffle(targets)
    sessions = sample_sessions(targets.tolist(), spec, seed=3)
    assert sessions == sample_sessions(targets.tolist(), spec, seed=3)
    assert sessions != sample_sessions(targets.tolist(), spec, seed=4)
    assert sorted(sessions[0]) == np.flatnonzero(targets < 4).tolist()
    for t in (1, 2):
        labels = targets[sessions[t]].tolist()
        assert labels == sorted(labels) and sorted(set(labels)) == spec.session_classes(t)
        assert len(labels) == 6
    flat = [i for s in sessions for i in s]
    assert len(flat) == len(set(flat))
    with pytest.raises(ValueError, match="n_shot"):
        sample_sessions([0, 1, 4], FSCILSpec(5, 4, 1, 2))


def test_missing_folders_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        fscil_cifar100(tmp_path)
    with pytest.raises(FileNotFoundError, match="miniImageNet"):
        fscil_mini_imagenet(tmp_path)
    with pytest.raises(FileNotFoundError, match="CUB_200_2011"):
        fscil_cub200(tmp_path)
    with pytest.raises(FileNotFoundError, match="session_1.txt"):
        read_index_list(tmp_path, 2)
    with pytest.raises(ValueError, match="dataset"):
        cec_sessions("imagenet", tmp_path)


SMALL = FSCILSpec(num_classes=8, num_base=4, n_way=2, n_shot=2)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_synthetic_cifar100(root, num_classes=8, train_per_class=6, test_per_class=3)
    return root


def _labels(dataset):
    return sorted(int(y) for y in dataset.targets)


def test_cifar_benchmark_streams_from_sampler(cifar_root):
    bench = fscil_cifar100(cifar_root, spec=SMALL, seed=0)
    train, test = list(bench.train_stream), list(bench.test_stream)
    assert len(train) == len(test) == 3
    assert _labels(train[0].dataset) == sorted(list(range(4)) * 6)
    for t in (1, 2):
        assert _labels(train[t].dataset) == sorted(SMALL.session_classes(t) * 2)
    for t, exp in enumerate(test):
        assert _labels(exp.dataset) == sorted(list(range(4 + 2 * t)) * 3)  # every class seen so far
    assert set(train[1].classes_in_this_experience) == {4, 5}
    x, y, *_ = train[0].dataset.eval()[0]
    assert isinstance(x, torch.Tensor) and x.shape == (3, 32, 32)


def test_cifar_benchmark_from_index_lists(cifar_root, tmp_path):
    with open(cifar_root / "cifar-100-python" / "train", "rb") as f:
        targets = np.asarray(pickle.load(f)["fine_labels"])
    sessions = [np.flatnonzero(targets < 4)] + [np.flatnonzero(np.isin(targets, c))[:2 * 2]
                                                for c in ([4, 5], [6, 7])]
    for t, rows in enumerate(sessions, start=1):
        (tmp_path / f"session_{t}.txt").write_text("\n".join(str(r) for r in rows) + "\n")
    bench = fscil_cifar100(cifar_root, index_dir=tmp_path, spec=SMALL)
    for exp, rows in zip(bench.train_stream, sessions):
        assert _labels(exp.dataset) == sorted(targets[rows].tolist())
        image = np.asarray(exp.dataset.eval()[0][0])
        assert image.shape == (3, 32, 32)
    (tmp_path / "session_2.txt").write_text("999\n")
    with pytest.raises(ValueError, match="rows must be in"):
        fscil_cifar100(cifar_root, index_dir=tmp_path, spec=SMALL)


def _first_image_per_class(dataset):
    firsts = {}
    for x, y, *_ in dataset.eval():
        firsts.setdefault(int(y), x)
    return firsts


def test_fscil_max_per_class_keeps_the_first_images_of_every_class(cifar_root):
    full = fscil_cifar100(cifar_root, spec=SMALL, seed=0)
    small = fscil_cifar100(cifar_root, spec=SMALL, seed=0, max_per_class=1)
    streams = [(small.train_stream, full.train_stream), (small.test_stream, full.test_stream)]
    for kind, (capped, complete) in enumerate(streams):
        for t, (exp, exp_full) in enumerate(zip(capped, complete)):
            seen = list(range(4 + 2 * t))
            assert _labels(exp.dataset) == (seen if kind else seen[-2:] if t else seen)
            firsts = _first_image_per_class(exp_full.dataset)
            assert all(torch.equal(x, firsts[int(y)]) for x, y, *_ in exp.dataset.eval())


@pytest.mark.parametrize("dataset,size,scale,mode,jitter,resize,mean,std", [
    # configs/_base_/datasets/cifar_fscil.py: RRC 32 scale (0.6, 1) bicubic, flip, ColorJitter 0.4, Normalize;
    # test Resize (36, -1) bicubic + CenterCrop 32
    ("cifar100", 32, (0.6, 1.0), "bicubic", 0.4, 36, (129.304, 124.070, 112.434), (68.170, 65.392, 70.418)),
    # mini_imagenet_fscil.py: RRC 84 (mmcls default scale, bilinear); test Resize (int(84 * 1.15), -1) + crop 84
    ("mini_imagenet", 84, (0.08, 1.0), "bilinear", 0.4, 96, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
    # configs/cub/resnet18_etf_bs512_80e_cub_mambafscil.py overrides ColorJitter to 0.3
    ("cub200", 224, (0.08, 1.0), "bilinear", 0.3, 256, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)),
], ids=["cifar100", "mini_imagenet", "cub200"])
def test_fscil_default_transforms_are_the_configs(dataset, size, scale, mode, jitter, resize, mean, std):
    interp = T.InterpolationMode(mode)
    norm = T.Normalize([m / 255 for m in mean], [s / 255 for s in std])
    theirs_train = T.Compose([T.RandomResizedCrop(size, scale=scale, interpolation=interp), T.RandomHorizontalFlip(),
                              T.ColorJitter(jitter, jitter, jitter), T.ToTensor(), norm])
    # the test Resize interpolates bicubic on CIFAR, mmcls's default bilinear on mini and CUB
    theirs_test = T.Compose([T.Resize(resize, interpolation=interp), T.CenterCrop(size), T.ToTensor(), norm])
    train, test = fscil_transforms(dataset)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size + 7, size + 3, 3), dtype=np.uint8))
    assert torch.equal(test(image), theirs_test(image)) and test(image).shape == (3, size, size)
    for seed in range(3):
        torch.manual_seed(seed)
        ours = train(image)
        torch.manual_seed(seed)
        assert torch.equal(ours, theirs_train(image))
    with pytest.raises(ValueError, match="dataset"):
        fscil_transforms("cifar10")


def _as_tensor(img):
    return torch.as_tensor(np.array(img)).permute(2, 0, 1)


def test_cub200_from_generated_folder_and_lists(tmp_path):
    # base classes: 1 training + 1 test image; novel classes: 5 training (the shots) + 1 test
    train = write_cub200(tmp_path, train_per_class=[1] * 100 + [5] * 100, test_per_class=1)
    write_cec_lists(tmp_path, train, FSCIL_SPECS["cub200"])
    bench = fscil_cub200(tmp_path, index_dir=tmp_path, train_transform=_as_tensor, eval_transform=_as_tensor)
    train, test = list(bench.train_stream), list(bench.test_stream)
    assert [len(e.dataset) for e in train] == [100] + [50] * 10
    assert _labels(train[3].dataset) == sorted(list(range(120, 130)) * 5)
    assert len(test[0].dataset) == 100 and len(test[10].dataset) == 100 + 100
    x, y, *_ = train[3].dataset[0]
    assert abs(int(x[0, 0, 0]) - int(y)) <= 1  # the (JPEG-coded) pixel value written is the class id


@pytest.mark.parametrize("builder,write", [
    (fscil_mini_imagenet, lambda root: write_mini_imagenet(root, num_classes=8, train_per_class=3, test_per_class=2)),
    (fscil_cub200, lambda root: write_cub200(root, train_per_class=[3] * 8, test_per_class=2)),
], ids=["mini_imagenet", "cub200"])
def test_path_builders_take_a_smaller_spec(builder, write, tmp_path):
    write_cec_lists(tmp_path / "index", write(tmp_path), SMALL)
    bench = builder(tmp_path, index_dir=tmp_path / "index", spec=dataclasses.asdict(SMALL),
                    train_transform=_as_tensor, eval_transform=_as_tensor)
    assert len(bench.train_stream) == len(bench.test_stream) == SMALL.num_sessions == 3
    for t, exp in enumerate(bench.train_stream):  # base: 4 classes x 3 images, then 2 classes x 2 shots
        assert _labels(exp.dataset) == (sorted(list(range(4)) * 3) if t == 0 else sorted(SMALL.session_classes(t) * 2))
        assert all(abs(int(x[0, 0, 0]) - int(y)) <= 1 for x, y, *_ in exp.dataset)
    for t, exp in enumerate(bench.test_stream):
        assert _labels(exp.dataset) == sorted(list(range(4 + 2 * t)) * 2)
    with pytest.raises(FileNotFoundError, match="session_4.txt"):  # the published spec needs every list
        builder(tmp_path, index_dir=tmp_path / "index")
    with pytest.raises(TypeError, match="spec"):
        builder(tmp_path, index_dir=tmp_path / "index", spec=[8, 4, 2, 2])
    with pytest.raises(TypeError, match="spec must map the FSCILSpec fields"):
        builder(tmp_path, index_dir=tmp_path / "index", spec={"classes": 8})


# cub200 also trains the base branch in incremental sessions (its optimizer holds more than the new branch)
@pytest.mark.parametrize("protocol", ["cifar100", "cub200"])
def test_registered_fscil_benchmarks_run_through_the_runner(cifar_root, tmp_path, protocol):
    from mambacl.benchmarks import list_benchmarks
    from mambacl.experiments import RunConfig, run_benchmark
    from mambacl.experiments.checkpoint import load_latest_checkpoint

    assert {"fscil_cifar100", "fscil_mini_imagenet", "fscil_cub200"} <= set(list_benchmarks())
    config = RunConfig(benchmark="fscil_cifar100", benchmark_args=dict(root=str(cifar_root), spec=vars(SMALL)),
                       strategy="mamba-fscil", model="test_resnet12", epochs=1, batch_size=8, progress=False,
                       strategy_args=dict(protocol=protocol, num_classes=8, num_base=4, d_state=4, dt_rank=2,
                                          inc_steps=2, inc_mb_size=4, base_lr=0.05),
                       out=str(tmp_path / "run"))
    results = run_benchmark(config)
    rows = results["experiences"]
    assert len(rows) == 3 and [r["classes"] for r in rows][-1] == list(range(8))
    # Test experience t holds every class seen so far, so its accuracy is the FSCIL session accuracy.
    assert all(0.0 <= r["acc_per_exp"][-1] <= 1.0 for r in rows)

    # interrupted after the first incremental session (the incremental branch and class means exist), resumed
    part = dataclasses.replace(config, out=str(tmp_path / "part"))
    assert run_benchmark(part, stop_after=2)["finished"] == 2
    resumed = run_benchmark(part, resume=True)
    for row, again in zip(rows, resumed["experiences"]):
        assert again["acc_per_exp"] == pytest.approx(row["acc_per_exp"], abs=1e-6)
    _, full = load_latest_checkpoint(tmp_path / "run", config)
    _, after = load_latest_checkpoint(tmp_path / "part", part)
    for name, value in full["model"].items():
        torch.testing.assert_close(after["model"][name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert sorted(after["strategy"]["prototypes"]) == list(range(8))
