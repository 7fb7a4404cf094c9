"""The mambacl command end to end: default comparison, run outputs, resume equality, generated data folders, errors."""
import csv
import dataclasses
import json

import numpy as np
import pytest
import yaml

import mambacl.experiments.cli as cli
from mambacl.benchmarks.fscil import write_synthetic_cifar100
from mambacl.experiments.cli import main

TINY = ["--epochs", "1", "--quiet", "--benchmark-arg", "n_experiences=2", "--benchmark-arg", "max_per_class=6"]


def _check_protocol(results):
    """Final metrics against an independent computation from the accuracy matrix and the test-set sizes."""
    matrix, rows = results["accuracy_matrix"], results["experiences"]
    last = len(rows) - 1
    final = results["final"]
    assert final["acc_task_mean"] == pytest.approx(np.mean(matrix[last][:last + 1]))
    assert final["avg_incremental_acc"] == pytest.approx(np.mean([r["acc_stream"] for r in rows]))
    forgetting = np.mean([matrix[j][j] - matrix[last][j] for j in range(last)]) if last else 0.0
    assert final["forgetting"] == pytest.approx(forgetting) and final["bwt"] == pytest.approx(-forgetting)
    assert all(v is None for row_i, row in enumerate(matrix) for v in row[row_i + 1:])
    # a sample right under the argmax over all classes is right under the argmax over its experience's classes
    for row in rows:
        assert row["within_task_acc"] >= row["acc_stream"] - 1e-9
        assert all(w >= a - 1e-9 for w, a in zip(row["within_task_acc_per_exp"], row["acc_per_exp"]))
        assert 0.0 <= row["ncm_acc"] <= 1.0 and len(row["ncm_acc_per_exp"]) == len(row["acc_per_exp"])
    assert final["within_task_acc"] == rows[-1]["within_task_acc"] and final["ncm_acc"] == rows[-1]["ncm_acc"]


def test_no_arguments_runs_the_default_comparison(tmp_path, monkeypatch, capsys):
    calls = []
    real_compare = cli.compare

    def small_compare(config, strategies, seeds, strategy_args=None, **folder):
        calls.append((config.benchmark, tuple(strategies), tuple(seeds)))
        config = dataclasses.replace(config, epochs=1, progress=False, out=str(tmp_path / "default"),
                                     benchmark_args={"n_experiences": 2, "max_per_class": 6})
        return real_compare(config, strategies, seeds, strategy_args, **folder)
    monkeypatch.setattr(cli, "compare", small_compare)
    assert main([]) == 0
    assert calls == [("split_digits", ("mambacl", "naive"), (0,))]
    table = capsys.readouterr().out
    assert "| mambacl |" in table and "| naive |" in table
    assert "within-task acc" in table and "feature NCM acc" in table and "±" not in table  # one seed: values only
    comparison = json.loads((tmp_path / "default" / "compare.json").read_text())
    for name in ("mambacl", "naive"):
        results = json.loads((tmp_path / "default" / name / "seed0" / "results.json").read_text())
        assert comparison["runs"][name][0]["acc_sample_weighted"] == results["final"]["acc_sample_weighted"]
        _check_protocol(results)


def test_run_writes_results_csv_plots_and_tensorboard(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--strategy", "naive", "--out", str(out), "--tensorboard", "--seed", "3", *TINY]) == 0
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[naive] step")]
    assert len(lines) == 2
    results = json.loads((out / "results.json").read_text())
    assert results["seed"] == 3 and results["class_order"] == list(range(10)) and results["finished"] == 2
    assert set(results["versions"]) >= {"torch", "avalanche", "timm", "mambacl"}
    assert [r["classes"] for r in results["experiences"]] == [[0, 1, 2, 3, 4], list(range(10))]
    # split digits test sets: 6 per class -> equal sizes, so sample-weighted accuracy = mean of experiences
    assert results["experiences"][1]["acc_stream"] == pytest.approx(np.mean(results["accuracy_matrix"][1]))
    _check_protocol(results)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["acc_stream"]) for r in rows] == pytest.approx([r["acc_stream"] for r in results["experiences"]])
    for png in ("accuracy_matrix.png", "accuracy.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((out / "tensorboard").rglob("events.out.tfevents*"))


@pytest.mark.parametrize("strategy", ["mambacl", "ewc", "lwf", "replay"])
def test_resume_gives_the_same_results_as_an_uninterrupted_run(tmp_path, strategy):
    from mambacl.experiments import RunConfig, run_benchmark
    config = RunConfig(strategy=strategy, epochs=1, progress=False,
                       benchmark_args={"n_experiences": 2, "max_per_class": 4})
    full = run_benchmark(dataclasses.replace(config, out=str(tmp_path / "full")))
    part = dataclasses.replace(config, out=str(tmp_path / "part"))
    interrupted = run_benchmark(part, stop_after=1)
    assert interrupted["finished"] == 1 and (tmp_path / "part" / "checkpoints" / "exp001.pt").is_file()
    assert main(["run", "--resume", str(tmp_path / "part"), "--quiet"]) == 0
    resumed = json.loads((tmp_path / "part" / "results.json").read_text())
    assert resumed["finished"] == 2 and len(resumed["experiences"]) == 2
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    for key, value in full["final"].items():
        assert resumed["final"][key] == pytest.approx(value, abs=1e-9), key
    assert not list((tmp_path / "part").glob("*.tmp"))


def test_compare_on_a_generated_cifar100_folder(tmp_path, capsys):
    write_synthetic_cifar100(tmp_path / "cifar", num_classes=100, train_per_class=1, test_per_class=1)
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({
        "benchmark": "split_cifar100", "model": "test_vim", "epochs": 1, "progress": False,
        "benchmark_args": {"root": str(tmp_path / "cifar"), "n_experiences": 2, "img_size": 32,
                           "class_order": "pycil", "download": False}}))
    out = tmp_path / "cmp"
    assert main(["compare", "--config", str(config), "--strategies", "naive,lwf", "--seeds", "0",
                 "--strategy-arg", "lwf.alpha=0.5", "--out", str(out)]) == 0
    results = json.loads((out / "lwf" / "seed0" / "results.json").read_text())
    assert results["config"]["strategy_args"] == {"alpha": 0.5}
    assert results["class_order"][:3] == [68, 56, 78] and results["n_experiences"] == 2
    assert "| lwf |" in (out / "compare.md").read_text()
    _check_protocol(results)


def test_run_on_a_generated_imagenet_r_tree_with_a_coda_split(tmp_path):
    from PIL import Image
    wnids = ["n01443537", "n01484850", "n01494475", "n01496331"]
    splits = {"train": [], "test": []}
    for label, wnid in enumerate(wnids):
        for i in range(5):
            rel = f"{wnid}/art_{i}.jpg"
            (tmp_path / "imagenet-r" / wnid).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.full((8, 8, 3), 60 * label, np.uint8)).save(tmp_path / "imagenet-r" / rel, "PNG")
            splits["train" if i < 3 else "test"].append((rel, 3 - label))  # labels not in sorted-wnid order
    for name, entries in splits.items():
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(
            {"data": [f"data/imagenet-r/{r}" for r, _ in entries], "targets": [t for _, t in entries]}))
    out = tmp_path / "run"
    args = ["run", "--benchmark", "imagenet_r", "--strategy", "mambacl", "--model", "test_vim", "--epochs", "1",
            "--quiet", "--out", str(out), "--benchmark-arg", f"root={tmp_path / 'imagenet-r'}",
            "--benchmark-arg", f"train_split={tmp_path / 'train.yaml'}",
            "--benchmark-arg", f"test_split={tmp_path / 'test.yaml'}",
            "--benchmark-arg", "n_experiences=2", "--benchmark-arg", "img_size=32"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["class_order"] == [0, 1, 2, 3] and len(results["experiences"]) == 2
    _check_protocol(results)


def test_errors_name_the_problem(tmp_path, capsys):
    def error(argv):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        return capsys.readouterr().err
    assert "unknown strategy 'mamba'" in error(["run", "--strategy", "mamba", "--out", str(tmp_path)])
    message = error(["run", "--benchmark", "cifar", "--out", str(tmp_path)])
    assert "unknown benchmark 'cifar'" in message and all(n in message for n in ("imagenet_r", "split_digits"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"benchmark": "split_digits", "epoch": 2}))
    assert "unknown config key 'epoch' (did you mean 'epochs'?)" in error(["run", "--config", str(bad)])
    missing = error(["run", "--benchmark", "split_cifar100", "--benchmark-arg", f"root={tmp_path / 'none'}",
                     "--benchmark-arg", "download=false", "--out", str(tmp_path / "o")])
    assert str(tmp_path / "none" / "cifar-100-python") in missing
    assert "does not exist" in error(["run", "--resume", str(tmp_path / "nothing")])
    assert "key=value" in error(["run", "--strategy-arg", "eta", "--out", str(tmp_path)])


def test_list_shows_benchmarks_strategies_and_models(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for name in ("split_digits", "split_cifar100", "imagenet_r", "domainnet", "mambacl", "adam-nscl", "joint", "simplecil",
                 "ranpac", "ewc_lambda=100.0", "vim_tiny_patch16_224", "test_vim", "defocus_mamba_large_patch16_192",
                 "mambacl-cifar100-10@1", "mamba-fscil-cub200@1"):
        assert name in text, name


def test_compare_table_shows_the_spread_only_over_several_seeds():
    from mambacl.experiments import compare_table
    from mambacl.experiments.results import FINAL_METRICS
    stats = {m: (0.5, 0.25) for m in (*FINAL_METRICS, "time_s")}
    two = compare_table({"seeds": [0, 1], "summary": {"naive": stats}})
    one = compare_table({"seeds": [0], "summary": {"naive": {m: (0.5, 0.0) for m in stats}}})
    assert two.splitlines()[2].count("0.5000 ± 0.2500") == len(FINAL_METRICS)
    assert one.splitlines()[2] == "| naive | " + " | ".join(["0.5000"] * len(FINAL_METRICS)) + " | 0.5 |"


def test_compare_runs_variants_of_one_strategy_side_by_side(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--strategies", "lwf,lwf@strong", "--strategy-arg", "lwf@strong.alpha=4",
                 "--out", str(out), *TINY]) == 0
    plain = json.loads((out / "lwf" / "seed0" / "results.json").read_text())["config"]
    strong = json.loads((out / "lwf@strong" / "seed0" / "results.json").read_text())["config"]
    assert plain["strategy"] == strong["strategy"] == "lwf"
    assert plain["strategy_args"] == {} and strong["strategy_args"] == {"alpha": 4}
    assert "| lwf@strong |" in capsys.readouterr().out
