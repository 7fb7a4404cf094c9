"""The ``mambacl`` command: ``run``, ``compare`` and ``list``; with no arguments, the embedded default.

``mambacl`` alone runs the embedded default: split digits, Mamba-CL vs naive fine-tuning, one seed, and
prints the comparison table. Options map onto :class:`mambacl.experiments.RunConfig`; a ``--config``
file sets the same keys and explicit options override it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import timm
import yaml

from mambacl.benchmarks import get_benchmark, list_benchmarks
from mambacl.experiments import RunConfig, compare, compare_table, run_benchmark
from mambacl.strategies.registry import get_strategy, list_strategies, strategy_hparams

__all__ = ["main", "build_parser"]

DEFAULT_STRATEGIES = ("mambacl", "naive")
# option dest -> RunConfig field, for the options shared by run and compare
_SHARED = ("benchmark", "model", "pretrained", "epochs", "lr", "weight_decay", "batch_size", "eval_batch_size",
           "device", "out", "tensorboard", "autocast")


def _key_values(items: Optional[List[str]], option: str) -> Dict[str, Any]:
    """Parse ``key=value`` items; values are read as YAML scalars (numbers, booleans, lists)."""
    parsed = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} expects key=value, got {item!r}")
        parsed[key] = yaml.safe_load(value)
    return parsed


def _add_shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML or JSON file with RunConfig keys (options given here override it)")
    p.add_argument("--benchmark", help=f"benchmark name ({', '.join(list_benchmarks())})")
    p.add_argument("--benchmark-arg", action="append", metavar="KEY=VALUE", help="benchmark argument (repeatable)")
    p.add_argument("--model", help="timm model name (default: the benchmark's)")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="timm.create_model kwarg (repeatable)")
    p.add_argument("--pretrained", metavar="FILE", help="local backbone checkpoint")
    p.add_argument("--epochs", type=int, help="training epochs per experience")
    p.add_argument("--lr", type=float, help="learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--device", help="torch device, e.g. cpu or cuda")
    p.add_argument("--out", metavar="DIR", help="output folder")
    p.add_argument("--autocast", choices=["bf16", "fp16"], help="mixed-precision forward on GPUs")
    p.add_argument("--tensorboard", action="store_true", default=None, help="also write TensorBoard logs")
    p.add_argument("--quiet", action="store_true", help="no progress bars, only the per-experience summary lines")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mambacl`` command."""
    parser = argparse.ArgumentParser(prog="mambacl", description="Continual learning with Vision Mamba backbones. "
                                     "Without a command: Mamba-CL vs naive on split digits.")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="train one strategy on one benchmark")
    _add_shared(run)
    run.add_argument("--strategy", help=f"strategy name ({', '.join(list_strategies())})")
    run.add_argument("--strategy-arg", action="append", metavar="KEY=VALUE", help="strategy hyper-parameter")
    run.add_argument("--seed", type=int)
    run.add_argument("--resume", metavar="DIR", help="continue the run in DIR after its last finished experience")
    cmp = sub.add_parser("compare", help="run several strategies with the same seeds and write one table")
    _add_shared(cmp)
    cmp.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES), help="comma-separated strategy names")
    cmp.add_argument("--seeds", default="0", help="comma-separated seeds")
    cmp.add_argument("--strategy-arg", action="append", metavar="NAME.KEY=VALUE",
                     help="hyper-parameter of one strategy, e.g. ewc.ewc_lambda=10")
    sub.add_parser("list", help="show benchmarks, strategies (with hyper-parameters) and models")
    return parser


def _config(args: argparse.Namespace, **overrides: Any) -> RunConfig:
    data = RunConfig.from_file(args.config).to_dict() if args.config else {}
    for name in _SHARED:
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    for option, key in (("benchmark_arg", "benchmark_args"), ("model_arg", "model_args")):
        data[key] = {**data.get(key, {}), **_key_values(getattr(args, option), "--" + option.replace("_", "-"))}
    if args.quiet:
        data["progress"] = False
    data.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig.from_dict(data)


def _list() -> None:
    print("Benchmarks:")
    for name in list_benchmarks():
        print(f"  {name:<22} {get_benchmark(name).summary}")
    print("\nStrategies (hyper-parameters for --strategy-arg):")
    for name in list_strategies():
        params = ", ".join(f"{p.name}={p.default!r}" for p in strategy_hparams(name).values())
        print(f"  {name:<22} {get_strategy(name).summary}" + (f"\n  {'':<22} [{params}]" if params else ""))
    print("\nModels (Vision Mamba; any timm model name also works):")
    for name in timm.list_models(["vim_*", "longhorn_vim_*", "test_vim", "test_longhorn_vim"]):
        print(f"  {name}")


def _per_strategy_args(items: Optional[List[str]]) -> Dict[str, Dict[str, Any]]:
    nested: Dict[str, Dict[str, Any]] = {}
    for key, value in _key_values(items, "--strategy-arg").items():
        name, sep, hparam = key.partition(".")
        if not sep:
            raise ValueError(f"compare's --strategy-arg expects NAME.KEY=VALUE, got {key!r}")
        nested.setdefault(name, {})[hparam] = value
    return nested


def _run_default() -> Dict[str, Any]:
    config = RunConfig(out="mambacl_runs/default")
    comparison = compare(config, DEFAULT_STRATEGIES, [config.seed])
    print(f"\nsplit_digits, seed {config.seed} (results in {config.out}):\n" + compare_table(comparison))
    return comparison


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``mambacl`` command. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command is None:
            _run_default()
        elif args.command == "list":
            _list()
        elif args.command == "run":
            if args.resume:
                saved = json.loads((Path(args.resume) / "results.json").read_text())["config"] \
                    if (Path(args.resume) / "results.json").is_file() else None
                if saved is None:
                    raise FileNotFoundError(f"cannot resume: {Path(args.resume) / 'results.json'} does not exist")
                config = RunConfig.from_dict({**saved, "out": args.resume, "progress": not args.quiet})
            else:
                config = _config(args, strategy=args.strategy, seed=args.seed,
                                 strategy_args=_key_values(args.strategy_arg, "--strategy-arg") or None)
            results = run_benchmark(config, resume=bool(args.resume))
            final = results["final"]
            print(f"final: seen-class acc {final['acc_sample_weighted']:.4f}, task-mean acc "
                  f"{final['acc_task_mean']:.4f}, avg incremental acc {final['avg_incremental_acc']:.4f}, "
                  f"forgetting {final['forgetting']:.4f}, BWT {final['bwt']:.4f} -> {config.out}")
        else:
            config = _config(args)
            strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
            comparison = compare(config, strategies, seeds, _per_strategy_args(args.strategy_arg))
            print(f"\n{config.benchmark}, seeds {seeds} (results in {config.out}):\n" + compare_table(comparison))
    except (ValueError, FileNotFoundError) as err:
        parser.exit(2, f"mambacl: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
