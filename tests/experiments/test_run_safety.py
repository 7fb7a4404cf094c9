"""A run never loses or mislabels results: refused overwrites, foreign and damaged checkpoints, kills between
the checkpoint and the results, NaN losses, Ctrl-C, changed options on resume, and a quiet console."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from avalanche.training import Naive

from mambacl.experiments import RunConfig, run_benchmark
from mambacl.experiments.checkpoint import CheckpointError, list_checkpoints, load_latest_checkpoint
from mambacl.experiments.cli import _key_values, main
from mambacl.experiments.run_folder import RunFolderError
from mambacl.strategies.plugins import NonFiniteLossError
from mambacl.strategies.registry import register_strategy

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"n_experiences": 2, "max_per_class": 4}
TINY = ["--epochs", "1", "--quiet", "--benchmark-arg", "n_experiences=2", "--benchmark-arg", "max_per_class=4"]


def cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def config(tmp_path: Path, name: str = "run", **kwargs) -> RunConfig:
    kwargs = {"strategy": "naive", "benchmark_args": dict(SMALL), **kwargs}
    return RunConfig(epochs=1, progress=False, out=str(tmp_path / name), **kwargs)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-experience naive run (and its results), shared by the read-only checks."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", "--strategy", "naive", "--out", str(out), *TINY]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_a_finished_run_is_never_replaced_without_being_asked(finished, tmp_path, capsys):
    out, results = finished
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    for argv in (["run", "--strategy", "naive", "--out", str(out), *TINY],
                 ["compare", "--strategies", "naive", "--out", str(out), *TINY]):
        message = cli_error(argv, capsys)
        assert f"--out {out} already holds a" in message and "--resume" in message and "--overwrite" in message
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # the same command again with --resume has nothing left to train: same results, same checkpoint
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert json.loads((out / "results.json").read_text())["final"] == results["final"]
    assert sorted(p.name for p in (out / "checkpoints").glob("*.pt")) == ["exp001.pt", "exp002.pt"]
    # --overwrite replaces it; the run is deterministic, so the results come back equal
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "notes.txt").write_text("mine")
    assert main(["run", "--strategy", "naive", "--out", str(copy), "--overwrite", *TINY]) == 0
    assert json.loads((copy / "results.json").read_text())["final"] == results["final"]
    assert (copy / "notes.txt").read_text() == "mine"  # only run files are replaced


def test_the_bare_command_refuses_to_replace_the_default_comparison(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mambacl_runs" / "default").mkdir(parents=True)
    (tmp_path / "mambacl_runs" / "default" / "compare.json").write_text("{}")
    message = cli_error([], capsys)
    assert "already holds a comparison" in message and "--resume" in message and "--overwrite" in message
    assert (tmp_path / "mambacl_runs" / "default" / "compare.json").read_text() == "{}"


def test_resume_refuses_options_that_would_change_the_run(finished, capsys):
    out, _ = finished
    message = cli_error(["run", "--resume", str(out), "--lr", "0.5", "--epochs", "3"], capsys)
    assert "epochs (run: 1, given: 3)" in message and "lr (run: 0.002, given: 0.5)" in message
    # device, console and worker options may change on resume
    assert main(["run", "--resume", str(out), "--device", "cpu", "--num-workers", "0", "--verbose"]) == 0
    assert "given" in cli_error(["run", "--resume", str(out), "--strategy", "ewc"], capsys)


def test_a_checkpoint_of_another_run_is_refused_before_its_tensors_are_read(tmp_path, monkeypatch, capsys):
    run_benchmark(config(tmp_path, "a", strategy="naive"), stop_after=1)
    run_benchmark(config(tmp_path, "b", strategy="ewc"), stop_after=1)
    shutil.rmtree(tmp_path / "b" / "checkpoints")
    shutil.copytree(tmp_path / "a" / "checkpoints", tmp_path / "b" / "checkpoints")

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load called on a foreign checkpoint")
    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(CheckpointError, match="written by another run.*strategy"):
        load_latest_checkpoint(tmp_path / "b", config(tmp_path, "b", strategy="ewc"))
    # through the command: the checkpoint's own config disagrees with the folder's results.json
    message = cli_error(["run", "--resume", str(tmp_path / "b")], capsys)
    assert "belongs to another run" in message and "strategy" in message


def test_a_truncated_checkpoint_falls_back_to_the_previous_one(tmp_path):
    base = config(tmp_path, "full", strategy="mambacl", benchmark_args={"n_experiences": 5, "max_per_class": 4})
    full = run_benchmark(base)
    part = dataclasses.replace(base, out=str(tmp_path / "part"))
    run_benchmark(part, stop_after=3)
    newest = tmp_path / "part" / "checkpoints" / "exp003.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(UserWarning, match="exp003.pt is truncated.*after 2 experience"):
        resumed = run_benchmark(part, resume=True)
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    assert [m["done"] for m in list_checkpoints(tmp_path / "part")] == [5, 4]


def test_no_usable_checkpoint_is_a_clear_error(tmp_path):
    run = config(tmp_path)
    run_benchmark(run, stop_after=1)
    path = tmp_path / "run" / "checkpoints" / "exp001.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"exp001.pt is corrupted.*start the run again with --overwrite"):
        run_benchmark(run, resume=True)


def test_results_behind_the_checkpoint_are_rewritten(tmp_path, monkeypatch):
    run = config(tmp_path)
    full = run_benchmark(run)
    out = tmp_path / "run"
    stale = {**full, "finished": 1, "experiences": full["experiences"][:1]}
    (out / "results.json").write_text(json.dumps(stale))  # as after a kill between checkpoint and results
    (out / "results.csv").unlink()
    (out / "results.json.tmp").write_text("half-written")

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(Naive, "train", no_training)
    again = run_benchmark(run, resume=True)
    assert again["finished"] == 2 and again["accuracy_matrix"] == full["accuracy_matrix"]
    assert json.loads((out / "results.json").read_text())["final"] == full["final"]
    assert (out / "results.csv").is_file() and not list(out.glob("*.tmp"))


def test_checkpoints_load_weights_only(finished):
    out, results = finished
    state = torch.load(out / "checkpoints" / "exp002.pt", weights_only=True)
    assert state["record"]["done"] == 2 and state["record"]["rows"] == results["experiences"]
    manifest = list_checkpoints(out)[0]
    assert manifest["fingerprint"] == RunConfig.from_dict(results["config"]).fingerprint() == results["fingerprint"]


@register_strategy("test-nan-at-exp1")
def _nan_at_second_experience(setup):
    """Naive whose loss turns NaN in experience 1 (test only)."""
    model = setup.classifier("incremental")
    criterion = torch.nn.CrossEntropyLoss()

    def loss(output, target):
        value = criterion(output, target)
        return value * float("nan") if strategy.experience.current_experience == 1 else value
    strategy = Naive(model=model, optimizer=setup.optimizer(model), **{**setup.template_kwargs(), "criterion": loss})
    return strategy


def test_a_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    message = cli_error(["run", "--strategy", "test-nan-at-exp1", "--out", str(out), *TINY], capsys)
    assert "the training loss is nan" in message and "experience 1, epoch 1, iteration 1" in message
    assert [m["done"] for m in list_checkpoints(out)] == [1]
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] == 1
    with pytest.raises(NonFiniteLossError):
        run_benchmark(RunConfig.from_dict(results["config"]), resume=True)


def _spawn(*args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen([sys.executable, "-m", "mambacl", *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["ctrl-c", "kill"])
def test_an_interrupted_process_resumes_to_the_uninterrupted_results(finished, tmp_path, how):
    out = tmp_path / "run"
    args = ["run", "--strategy", "naive", "--epochs", "1", "--benchmark-arg", "n_experiences=2",
            "--benchmark-arg", "max_per_class=4"]
    proc = _spawn(*args, "--out", str(out))
    _wait_for(out / "checkpoints" / "exp001.json", proc)
    proc.send_signal(signal.SIGINT if how == "ctrl-c" else signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=120)
    if how == "ctrl-c" and proc.returncode == 130:  # stopped during experience 2 (it may also have finished)
        assert "Traceback" not in stderr
        assert f"1 of 2 experiences of the run in {out} are finished" in stderr
        assert f"Continue with: mambacl run --resume {out}" in stderr
    resumed = _spawn("run", "--resume", str(out), "--quiet")
    assert resumed.wait(timeout=240) == 0, resumed.communicate()
    assert json.loads((out / "results.json").read_text())["final"] == finished[1]["final"]


def test_the_default_console_shows_no_metric_lines(tmp_path, capfd):
    assert main(["run", "--strategy", "naive", "--out", str(tmp_path / "a"), *TINY[:2], *TINY[3:]]) == 0
    out, err = capfd.readouterr()
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 3 and all(l.startswith("[naive] step") for l in lines[:2]) and lines[2].startswith("final:")
    assert "Top1_Acc" not in out + err and "Loss_Epoch" not in out + err
    assert main(["run", "--strategy", "naive", "--out", str(tmp_path / "b"), "--verbose", *TINY[:2], *TINY[3:]]) == 0
    assert "Top1_Acc_Stream" in capfd.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_unavailable_device_is_an_error_naming_the_available_ones(tmp_path, capsys):
    message = cli_error(["run", "--device", "cuda", "--out", str(tmp_path / "run"), *TINY], capsys)
    assert "device 'cuda' is not available here" in message and "available devices: cpu" in message
    assert not (tmp_path / "run").exists()


def test_yaml_numbers_in_exponent_form_are_floats(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("strategy: naive\nlr: 1e-4\nweight_decay: 5E-5\nepochs: 1\nprogress: false\n"
                    f"out: {tmp_path / 'run'}\nbenchmark_args: {{n_experiences: 2, max_per_class: 4}}\n")
    config_ = RunConfig.from_file(path)
    assert config_.lr == 1e-4 and isinstance(config_.lr, float) and config_.weight_decay == 5e-5
    assert main(["run", "--config", str(path), "--lr", "2e-4"]) == 0
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["config"]
    assert saved["lr"] == 2e-4 and saved["weight_decay"] == 5e-5
    assert _key_values(["eta=9.5e-1", "a=1E1", "name=1e", "n=3"], "--strategy-arg") == \
        {"eta": 0.95, "a": 10.0, "name": "1e", "n": 3}


def test_a_folder_that_is_a_file_or_under_a_file_is_refused(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert "is not a folder" in cli_error(["run", "--out", str(tmp_path / "file"), *TINY], capsys)
    assert "is not writable" in cli_error(["run", "--out", str(tmp_path / "file" / "run"), *TINY], capsys)


def test_a_run_folder_in_use_by_a_new_run_raises_from_the_api(finished):
    out, results = finished
    with pytest.raises(RunFolderError, match="--resume.*--overwrite"):
        run_benchmark(RunConfig.from_dict(results["config"]))
    with pytest.raises(ValueError, match="exclude each other"):
        run_benchmark(RunConfig.from_dict(results["config"]), resume=True, overwrite=True)
