"""Bad input to the run layer (RunConfig, config files, the run folder, the run loop and the mambacl command):
each case gets the exact exception type (or exit status 2 with one error line) naming what is wrong."""
import json

import pytest

from mambacl.experiments import RunConfig, compare, run_benchmark
from mambacl.experiments.cli import main
from mambacl.experiments.config import load_yaml
from mambacl.experiments.run_folder import prepare_run_folder


@pytest.mark.parametrize("key, value, error, match", [
    ("lr", "1e-4", ValueError, r"'lr' must be a finite number > 0, got '1e-4' \(str\)"),
    ("lr", 0.0, ValueError, r"'lr' must be a finite number > 0"),
    ("lr", float("inf"), ValueError, r"'lr' must be a finite number"),
    ("lr", True, ValueError, r"'lr' must be a finite number"),
    ("weight_decay", -1e-5, ValueError, r"'weight_decay' must be a finite number >= 0"),
    ("epochs", 0, ValueError, r"'epochs' must be a positive int"),
    ("epochs", 2.0, ValueError, r"'epochs' must be a positive int, got 2.0 \(float\)"),
    ("batch_size", "32", ValueError, r"'batch_size' must be a positive int"),
    ("eval_batch_size", -3, ValueError, r"'eval_batch_size' must be a positive int"),
    ("seed", -1, ValueError, r"'seed' must be an int in \[0, 2\*\*32\)"),
    ("seed", 1.5, ValueError, r"'seed' must be an int in \[0, 2\*\*32\)"),
    ("seed", 2 ** 32, ValueError, r"'seed' must be an int in \[0, 2\*\*32\)"),
    ("device", "gpu", ValueError, r"'device' must be 'cpu', 'cuda', 'cuda:N' or 'mps', got 'gpu'"),
    ("device", "cuda:x", ValueError, r"'device' must be"),
    ("progress", "yes", TypeError, r"'progress' must be true or false"),
    ("tensorboard", 1, TypeError, r"'tensorboard' must be true or false"),
    ("verbose", None, TypeError, r"'verbose' must be true or false"),
    ("autocast", "fp8", ValueError, r"'autocast' must be null or one of \('bf16', 'fp16'\)"),
    ("benchmark", "", TypeError, r"'benchmark' must be a non-empty string"),
    ("strategy", 3, TypeError, r"'strategy' must be a non-empty string"),
    ("model", 7, TypeError, r"'model' must be a non-empty string"),
    ("benchmark_args", ["n_experiences", 2], TypeError, r"'benchmark_args' must be a mapping"),
    ("strategy_args", {1: 2}, TypeError, r"'strategy_args' must be a mapping of names"),
    ("num_workers", -1, ValueError, r"'num_workers' must be an int >= 0"),
], ids=lambda v: str(v)[:20])
def test_every_config_key_is_type_checked(key, value, error, match):
    with pytest.raises(error, match=match):
        RunConfig(**{key: value})


@pytest.mark.parametrize("key, value, expected", [
    ("lr", 1, 1.0), ("weight_decay", 0, 0.0), ("seed", 0, 0), ("device", "cuda:1", "cuda:1"), ("autocast", None, None),
], ids=["int-lr", "int-wd", "seed-0", "cuda-n", "no-autocast"])
def test_valid_edge_values_are_kept(key, value, expected):
    assert getattr(RunConfig(**{key: value}), key) == expected


def test_unknown_config_keys_and_files(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key 'epoch' \(did you mean 'epochs'\?\)"):
        RunConfig.from_dict({"epoch": 3})
    with pytest.raises(TypeError, match="a run config must be a mapping, got list"):
        RunConfig.from_dict([1, 2])
    with pytest.raises(FileNotFoundError, match="config file .*missing.yaml does not exist"):
        RunConfig.from_file(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr: [1, 2\n")
    with pytest.raises(ValueError, match="config file .*broken.yaml is not valid YAML"):
        RunConfig.from_file(broken)
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("{'lr': 1}")
    with pytest.raises(ValueError, match="config file .*broken.json is not valid JSON"):
        RunConfig.from_file(bad_json)
    listed = tmp_path / "list.yaml"
    listed.write_text("- lr\n- 1\n")
    with pytest.raises(TypeError, match="a run config must be a mapping, got list"):
        RunConfig.from_file(listed)


def test_yaml_reads_exponent_numbers_as_floats_and_keeps_other_scalars():
    assert load_yaml("a: 1e-4\nb: -2E+3\nc: 10\nd: 1e\ne: .5\nf: 'x'\ng: 2.5e-1") == \
        {"a": 1e-4, "b": -2000.0, "c": 10, "d": "1e", "e": 0.5, "f": "x", "g": 0.25}


def test_run_folder_modes(tmp_path):
    with pytest.raises(ValueError, match="mode must be one of"):
        prepare_run_folder(tmp_path, "replace")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="--out .*file exists and is not a folder"):
        prepare_run_folder(tmp_path / "file", "new")


def test_run_and_compare_arguments(tmp_path):
    config = RunConfig(out=str(tmp_path / "run"), progress=False)
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        run_benchmark(config, resume=True, overwrite=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        run_benchmark(config, resume=True)
    with pytest.raises(ValueError, match="compare needs at least one strategy and one seed"):
        compare(config, [], [0])
    with pytest.raises(ValueError, match="unknown strategy 'nave'"):
        compare(config, ["nave"], [0])
    with pytest.raises(ValueError, match=r"--strategy-arg names strategies \['ewc'\] that are not compared"):
        compare(config, ["naive"], [0], {"ewc": {"ewc_lambda": 1.0}})
    assert not (tmp_path / "run").exists()


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("argv, match", [
    (["run", "--strategy-arg", "eta"], "--strategy-arg expects key=value, got 'eta'"),
    (["run", "--benchmark-arg", "=3"], "--benchmark-arg expects key=value, got '=3'"),
    (["run", "--model-arg", "depth"], "--model-arg expects key=value"),
    (["compare", "--seeds", "0,a"], "--seeds expects a comma-separated list of ints, got '0,a'"),
    (["compare", "--seeds", ","], "--seeds needs at least one value"),
    (["compare", "--strategies", ""], "--strategies needs at least one value"),
    (["compare", "--strategy-arg", "eta=0.9"], "compare's --strategy-arg expects NAME.KEY=VALUE, got 'eta'"),
    (["run", "--resume", "a", "--out", "b"], "--resume a and --out b name different folders"),
    (["run", "--resume"], "--resume needs the run folder"),
    (["run", "--lr", "-1"], "'lr' must be a finite number > 0"),
    (["run", "--seed", "-2"], "'seed' must be an int in [0, 2**32)"),
    (["--resume", "x", "run"], "--resume given before 'run' belong to the bare command"),
    (["run", "--device", "tpu"], "'device' must be 'cpu', 'cuda', 'cuda:N' or 'mps', got 'tpu'"),
    (["run", "--strategy", "mamba"], "unknown strategy 'mamba'"),
    (["run", "--benchmark", "cifar"], "unknown benchmark 'cifar'"),
    (["run", "--benchmark-arg", "n_experiences=3"], "n_experiences must be a positive divisor"),
    (["run", "--benchmark-arg", "colour=1"], "has no argument(s) ['colour']"),
    (["run", "--strategy", "ewc", "--strategy-arg", "lambda=1"], "has no hyper-parameter(s) ['lambda']"),
    (["run", "--model", "no_such_model"], "unknown model 'no_such_model'"),
    (["run", "--pretrained", "missing.pth"], "pretrained file missing.pth does not exist"),
    (["run", "--config", "missing.yaml"], "config file missing.yaml does not exist"),
], ids=lambda v: " ".join(v)[:40] if isinstance(v, list) else None)
def test_command_errors_are_one_line_with_exit_status_2(argv, match, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _cli_error([*argv, *(["--out", str(tmp_path / "o")] if "--out" not in argv and argv[0] == "run"
                               and "--resume" not in argv else [])], capsys)
    assert err.startswith("mambacl: error: ") and match in err and err.count("\n") == 1, err


def test_resume_and_overwrite_together_are_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--resume", "x", "--overwrite"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="unknown strategy 'mamba'"):
        main(["run", "--strategy", "mamba", "--out", str(tmp_path / "o"), "--debug"])


def test_resume_of_a_folder_without_a_run(tmp_path, capsys):
    assert "the run folder" in _cli_error(["run", "--resume", str(tmp_path / "none")], capsys)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "results.json").write_text(json.dumps({"config": {}}))
    assert "holds no checkpoint of a finished experience" in _cli_error(["run", "--resume", str(tmp_path / "empty")],
                                                                         capsys)
