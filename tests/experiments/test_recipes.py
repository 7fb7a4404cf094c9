"""Every shipped recipe runs end to end at toy scale through ``mambacl run --recipe``: generated data in the
benchmark's real on-disk layout, Ctrl-C after the first experience, ``--resume`` to the end, and the same
results as an uninterrupted run; ``mambacl list`` shows the recipes; missing requirements and unknown names
are refused with one error line."""
import dataclasses
import json
import pickle
import sys
from importlib import resources
from pathlib import Path
from typing import Callable, Dict, List, Set, Tuple

import pytest
import torch
import yaml

import mambacl.experiments.runner as runner
from mambacl.benchmarks.fscil import FSCILSpec, write_synthetic_cifar100
from mambacl.experiments import RunConfig
from mambacl.experiments.checkpoint import load_latest_checkpoint
from mambacl.experiments.cli import main

sys.path.insert(0, str(Path(__file__).parents[1]))
from data_layouts import (write_cec_lists, write_cub200, write_domainnet, write_imagenet_r,  # noqa: E402
                          write_mini_imagenet)

RECIPES = ("mambacl-cifar100-10", "mambacl-imagenet-r-10", "mambacl-imagenet-r-20", "mambacl-domainnet-10",
           "mamba-fscil-cifar100", "mamba-fscil-mini-imagenet", "mamba-fscil-cub200")

# Toy overrides: every recipe keeps its model, shrunk by --model-arg and trained from scratch for one epoch on
# one image per class. Mamba-CL keeps 192 px and patch 16, AutoAugment, batch 200 / eval 100, data_repeat 5,
# milestones and the strategy's settings; De-focus Mamba shrinks to test_defocus_mamba's width and depth; two
# experiences instead of 10 or 20.
MAMBACL_TOY = ["--pretrained", "none", "--model-arg", "embed_dim=32", "--model-arg", "depth=2",
               "--model-arg", "dt_rank=4", "--model-arg", "group_size=16", "--epochs", "1",
               "--benchmark-arg", "max_per_class=1", "--benchmark-arg", "n_experiences=2"]
# Mamba-FSCIL keeps the protocol (neck width, losses, learning rates, copies), the image size, batch 512,
# data_repeat and the base-session mixing; 8 classes in 3 sessions (4 base + 2 x 2-way; the published 100-200
# classes in 9-11 sessions take minutes here, every session evaluating every class seen through the neck),
# 2 steps per incremental session and a small SSM in the neck.
FSCIL_SPEC = FSCILSpec(num_classes=8, num_base=4, n_way=2, n_shot=2)
FSCIL_TOY = ["--pretrained", "none", "--epochs", "1", "--benchmark-arg", "max_per_class=1",
             "--benchmark-arg", f"spec={json.dumps(dataclasses.asdict(FSCIL_SPEC))}",
             "--strategy-arg", f"num_classes={FSCIL_SPEC.num_classes}",
             "--strategy-arg", f"num_base={FSCIL_SPEC.num_base}",
             "--strategy-arg", "inc_steps=2", "--strategy-arg", "d_state=4", "--strategy-arg", "dt_rank=2"]
RESNET12_TOY = ["--model-arg", "widths=[4,4,8,8]"]  # test_resnet12's widths
RESNET18_TOY = ["--model-arg", "channels=[8,8,16,16]", "--model-arg", "stem_width=8"]


def _root(path: Path) -> List[str]:
    return ["--benchmark-arg", f"root={path}"]


def _cifar100(tmp: Path) -> Tuple[List[str], int]:
    write_synthetic_cifar100(tmp / "cifar", num_classes=100, train_per_class=2, test_per_class=1)
    return [*MAMBACL_TOY, *_root(tmp / "cifar")], 2


def _imagenet_r(tmp: Path) -> Tuple[List[str], int]:
    train_split, test_split = write_imagenet_r(tmp, num_classes=4, train_per_class=2, test_per_class=1)
    return [*MAMBACL_TOY, *_root(tmp / "imagenet-r"), "--benchmark-arg", f"train_split={train_split}",
            "--benchmark-arg", f"test_split={test_split}"], 2


def _domainnet(tmp: Path) -> Tuple[List[str], int]:
    write_domainnet(tmp / "domainnet")  # the packaged split lists' first train and val image of all 200 classes
    return [*MAMBACL_TOY, *_root(tmp / "domainnet")], 2


def _fscil_cifar100(tmp: Path) -> Tuple[List[str], int]:
    folder = write_synthetic_cifar100(tmp / "cifar", FSCIL_SPEC.num_classes, train_per_class=3, test_per_class=1)
    with open(folder / "train", "rb") as f:
        labels = pickle.load(f)["fine_labels"]
    write_cec_lists(tmp / "index", [(str(row), label) for row, label in enumerate(labels)], FSCIL_SPEC)
    return [*FSCIL_TOY, *RESNET12_TOY, *_root(tmp / "cifar"), "--benchmark-arg", f"index_dir={tmp / 'index'}"], \
        FSCIL_SPEC.num_sessions


def _fscil_mini_imagenet(tmp: Path) -> Tuple[List[str], int]:
    train = write_mini_imagenet(tmp / "mini", num_classes=FSCIL_SPEC.num_classes, train_per_class=3, test_per_class=1)
    write_cec_lists(tmp / "index", train, FSCIL_SPEC)
    return [*FSCIL_TOY, *RESNET12_TOY, *_root(tmp / "mini"), "--benchmark-arg", f"index_dir={tmp / 'index'}"], \
        FSCIL_SPEC.num_sessions


def _fscil_cub200(tmp: Path) -> Tuple[List[str], int]:
    train = write_cub200(tmp / "cub", train_per_class=[3] * FSCIL_SPEC.num_classes, test_per_class=1)
    write_cec_lists(tmp / "index", train, FSCIL_SPEC)
    return [*FSCIL_TOY, *RESNET18_TOY, *_root(tmp / "cub"), "--benchmark-arg", f"index_dir={tmp / 'index'}"], \
        FSCIL_SPEC.num_sessions


TOYS: Dict[str, Callable[[Path], Tuple[List[str], int]]] = {
    "mambacl-cifar100-10": _cifar100, "mambacl-imagenet-r-10": _imagenet_r, "mambacl-imagenet-r-20": _imagenet_r,
    "mambacl-domainnet-10": _domainnet, "mamba-fscil-cifar100": _fscil_cifar100,
    "mamba-fscil-mini-imagenet": _fscil_mini_imagenet, "mamba-fscil-cub200": _fscil_cub200,
}


def _recipe_file(name: str) -> Dict:
    """The shipped recipe file, read with plain PyYAML (not the package's loader)."""
    return yaml.safe_load(resources.files("mambacl.experiments").joinpath("recipes", f"{name}.yaml").read_text())


def _overridden(argv: List[str]) -> Set[str]:
    """The config keys an option list sets: ``--epochs`` -> epochs, ``--benchmark-arg k=v`` -> benchmark_args.k."""
    keys = set()
    for option, value in zip(argv, argv[1:]):
        if option.endswith("-arg"):
            keys.add(f"{option[2:-len('-arg')]}_args.{value.partition('=')[0]}")
        elif option.startswith("--"):
            keys.add(option[2:].replace("-", "_"))
    return keys


def _interrupt_second_experience(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C as the run starts its second experience (the first one is finished and checkpointed)."""
    build = runner.create_strategy

    def create_strategy(*args, **kwargs):
        strategy = build(*args, **kwargs)
        train, calls = strategy.train, []

        def train_until_interrupted(*train_args, **train_kwargs):
            calls.append(None)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return train(*train_args, **train_kwargs)
        strategy.train = train_until_interrupted
        return strategy
    monkeypatch.setattr(runner, "create_strategy", create_strategy)


def _results(out: Path) -> Dict:
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
# from scratch at width 32, the null-space plugin rightly warns that the frozen parts are random and the knee
# keeps almost every direction; the recipes' real runs load the pretrained De-focus Mamba-L
@pytest.mark.filterwarnings("ignore::mambacl.strategies.plugins.nullspace.NullSpaceWarning")
@pytest.mark.parametrize("name", RECIPES, ids=RECIPES)
def test_recipe_runs_checkpoints_and_resumes_at_toy_scale(name, tmp_path, monkeypatch, capsys):
    toy, n_experiences = TOYS[name](tmp_path)
    command = ["run", "--recipe", name, *toy, "--quiet"]

    assert main([*command, "--out", str(tmp_path / "full")]) == 0
    with monkeypatch.context() as patch:
        _interrupt_second_experience(patch)
        assert main([*command, "--out", str(tmp_path / "part")]) == 130
    err = capsys.readouterr().err
    assert f"1 of {n_experiences} experiences" in err and f"mambacl run --resume {tmp_path / 'part'}" in err
    assert _results(tmp_path / "part")["finished"] == 1
    assert {p.name for p in (tmp_path / "part" / "checkpoints").iterdir()} == {"exp001.pt", "exp001.json"}
    assert main(["run", "--resume", str(tmp_path / "part"), "--quiet"]) == 0

    full, resumed = _results(tmp_path / "full"), _results(tmp_path / "part")
    for results in (full, resumed):
        assert results["finished"] == results["n_experiences"] == n_experiences
        assert results["config"]["recipe"] == f"{name}@1" and results["config"]["pretrained"] is None
    last = f"exp{n_experiences:03d}"
    assert {f"{last}.pt", f"{last}.json"} <= {p.name for p in (tmp_path / "part" / "checkpoints").iterdir()}

    # the recipe's keys that the toy options leave alone are the run's
    recipe, config, overridden = _recipe_file(name)["config"], full["config"], _overridden(toy)
    for key, value in recipe.items():
        if key.endswith("_args"):
            for arg, arg_value in value.items():
                if f"{key}.{arg}" not in overridden:
                    assert config[key][arg] == arg_value, f"{key}.{arg}"
        elif key not in overridden:
            assert config[key] == value, key
    assert config["epochs"] == 1 and config["benchmark_args"]["max_per_class"] == 1

    # resumed after Ctrl-C == uninterrupted: the same config, per-experience metrics and final weights
    assert {**resumed["config"], "out": None} == {**full["config"], "out": None}
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
    for row, again in zip(full["experiences"], resumed["experiences"]):
        for key in ("classes", "acc_per_exp", "within_task_acc_per_exp", "ncm_acc_per_exp", "forgetting", "bwt"):
            assert again[key] == pytest.approx(row[key], abs=1e-6), key
    _, final = load_latest_checkpoint(tmp_path / "full", RunConfig.from_dict(full["config"]))
    _, after = load_latest_checkpoint(tmp_path / "part", RunConfig.from_dict(resumed["config"]))
    assert sorted(after["model"]) == sorted(final["model"])
    for key, value in final["model"].items():
        torch.testing.assert_close(after["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_list_shows_every_recipe_and_what_it_needs(capsys):
    shipped = resources.files("mambacl.experiments").joinpath("recipes").iterdir()
    assert sorted(f.name for f in shipped) == sorted(f"{name}.yaml" for name in RECIPES)  # each has a toy run above
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in RECIPES:
        recipe = _recipe_file(name)
        at = [i for i, line in enumerate(lines) if line.split()[:1] == [f"{name}@1"]]
        assert len(at) == 1, name
        assert recipe["summary"] in lines[at[0]]
        assert lines[at[0] + 1].strip() == "needs: " + ", ".join(recipe["requires"])


def _error(argv: List[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mambacl: error: ")
    return err


@pytest.mark.parametrize("name,given,named", [
    ("mambacl-cifar100-10", [], ["--pretrained ", "--benchmark-arg root="]),
    ("mambacl-cifar100-10", ["--benchmark-arg", "root=data"], ["--pretrained "]),
    ("mamba-fscil-cub200", ["--pretrained", "none", "--benchmark-arg", "root=data"], ["--benchmark-arg index_dir="]),
    ("mambacl-imagenet-r-20", ["--pretrained", "none", "--benchmark-arg", "root=data"],
     ["--benchmark-arg train_split=", "--benchmark-arg test_split="]),
], ids=["nothing", "no-pretrained", "no-index-dir", "no-splits"])
def test_missing_requirement_is_one_error_naming_the_option(name, given, named, tmp_path, capsys):
    out = tmp_path / "run"
    err = _error(["run", "--recipe", name, *given, "--out", str(out)], capsys)
    assert f"recipe {name} needs" in err
    options = [f"--benchmark-arg {key.split('.')[1]}=" if "." in key else f"--{key} "
               for key in _recipe_file(name)["requires"]]
    assert [option for option in options if option in err] == named  # the missing ones only
    assert ("--pretrained none to start from scratch" in err) == ("--pretrained " in named)
    assert not out.exists()


def test_unknown_recipe_lists_the_recipes(tmp_path, capsys):
    err = _error(["run", "--recipe", "mambacl-cifar100", "--out", str(tmp_path / "run")], capsys)
    assert "unknown recipe 'mambacl-cifar100' (did you mean 'mambacl-cifar100-10'?)" in err
    assert all(name in err for name in RECIPES)
    assert not (tmp_path / "run").exists()
