"""The ``mambacl`` command: ``run``, ``compare`` and ``list``; with no arguments, the embedded default.

``mambacl`` alone runs the embedded default: split digits, Mamba-CL vs naive fine-tuning, one seed, and
prints the comparison table. Options map onto :class:`mambacl.experiments.RunConfig`; a ``--config`` file
sets the same keys and explicit options override it.

A folder that holds a run is never replaced silently: ``--resume`` continues it (a run resumes with the
config its checkpoint records; options that would change it are refused, ``device``/console/worker options
may change), ``--overwrite`` replaces it. Expected failures (bad options, missing data, a refused folder, a
NaN loss) end in one ``mambacl: error: ...`` line and exit status 2; ``--debug`` shows their traceback.
Ctrl-C says how far the run got and how to continue it.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import timm

from mambacl.benchmarks import get_benchmark, list_benchmarks
from mambacl.experiments.checkpoint import checkpoint_config, latest_manifest
from mambacl.experiments.config import HARMLESS_KEYS, RunConfig, differing_keys, load_yaml
from mambacl.experiments.recipe import apply_recipe, get_recipe, list_recipes
from mambacl.experiments.runner import RunInterrupted
from mambacl.experiments import compare, compare_table, run_benchmark
from mambacl.experiments.compare import read_plan
from mambacl.strategies.plugins import NonFiniteLossError
from mambacl.strategies.registry import get_strategy, list_strategies, strategy_hparams

__all__ = ["main", "build_parser"]

DEFAULT_STRATEGIES = ("mambacl", "naive")
DEFAULT_OUT = "mambacl_runs/default"
DEFAULT_PRETRAINED = "test_vim.glyphs"  # the packaged backbone every strategy of the default starts from
_TOP = "top_"  # dest prefix of the bare command's options
# option dest -> RunConfig field, for the options shared by run and compare
_SHARED = ("benchmark", "model", "pretrained", "epochs", "lr", "weight_decay", "batch_size", "eval_batch_size",
           "device", "out", "tensorboard", "autocast", "num_workers", "max_device_batch")
# failures a user can fix from the message alone; anything else is a bug and keeps its traceback
_EXPECTED = (ValueError, TypeError, OSError, NonFiniteLossError)
# TypeErrors that Python itself raises for wrong code, not mambacl's checks of the user's input
_CODE_ERROR = re.compile(r"unexpected keyword argument|required positional argument|positional arguments? but|"
                         r"object is not (subscriptable|callable|iterable)|unsupported operand|object has no attribute")


def _key_values(items: Optional[List[str]], option: str) -> Dict[str, Any]:
    """Parse ``key=value`` items; values are read as YAML 1.2 scalars (numbers such as 1e-4, booleans, lists)."""
    parsed = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{option} expects key=value, got {item!r}")
        parsed[key] = load_yaml(value)
    return parsed


def _add_folder_options(p: argparse.ArgumentParser, what: str, prefix: str = "") -> None:
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--resume", nargs="?", const=True, metavar="DIR", dest=f"{prefix}resume",
                       help=f"continue the {what} in DIR (or in --out) after its last finished experience")
    modes.add_argument("--overwrite", action="store_true", dest=f"{prefix}overwrite",
                       help=f"replace a {what} already in the output folder")


def _add_shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", help="a shipped recipe (see `mambacl list`); --config and options override its keys")
    p.add_argument("--config", help="YAML or JSON file with RunConfig keys (options given here override it)")
    p.add_argument("--benchmark", help=f"benchmark name ({', '.join(list_benchmarks())})")
    p.add_argument("--benchmark-arg", action="append", metavar="KEY=VALUE", help="benchmark argument (repeatable)")
    p.add_argument("--model", help="timm model name (default: the benchmark's)")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="timm.create_model kwarg (repeatable)")
    p.add_argument("--pretrained", metavar="FILE", help="backbone checkpoint: a local file or a packaged name such as "
                   "test_vim.glyphs ('none': from scratch)")
    p.add_argument("--epochs", type=int, help="training epochs per experience")
    p.add_argument("--lr", type=float, help="learning rate")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--device", help="torch device: cpu, cuda, cuda:N or mps")
    p.add_argument("--out", metavar="DIR", help="output folder")
    p.add_argument("--autocast", choices=["bf16", "fp16"], help="mixed-precision forward on GPUs")
    p.add_argument("--num-workers", type=int, help="DataLoader workers per process")
    p.add_argument("--max-device-batch", type=int, metavar="N",
                   help="largest batch per process; larger batches accumulate gradients (same result)")
    p.add_argument("--tensorboard", action="store_true", default=None, help="also write TensorBoard logs")
    _add_console(p)


def _add_console(p: argparse.ArgumentParser, prefix: str = "") -> None:
    console = p.add_mutually_exclusive_group()
    console.add_argument("--quiet", action="store_true", dest=f"{prefix}quiet",
                         help="no progress bars, only one line per experience")
    console.add_argument("--verbose", action="store_true", dest=f"{prefix}verbose",
                         help="Avalanche's interactive logger (every metric)")
    p.add_argument("--debug", action="store_true", dest=f"{prefix}debug", help="show the traceback of expected errors too")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``mambacl`` command."""
    parser = argparse.ArgumentParser(prog="mambacl", description="Continual learning with Vision Mamba backbones. "
                                     "Without a command: Mamba-CL vs naive on split digits.")
    # options of the bare command; a subcommand has its own (given after it)
    _add_folder_options(parser, "default comparison", prefix=_TOP)
    parser.add_argument("--pretrained", metavar="FILE", dest=f"{_TOP}pretrained", help="starting backbone of the "
                        f"default comparison (default the packaged {DEFAULT_PRETRAINED}; 'none': from scratch)")
    _add_console(parser, prefix=_TOP)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="train one strategy on one benchmark")
    _add_shared(run)
    run.add_argument("--strategy", help=f"strategy name ({', '.join(list_strategies())})")
    run.add_argument("--strategy-arg", action="append", metavar="KEY=VALUE", help="strategy hyper-parameter")
    run.add_argument("--seed", type=int)
    _add_folder_options(run, "run")
    cmp = sub.add_parser("compare", help="run several strategies with the same seeds and write one table")
    _add_shared(cmp)
    cmp.add_argument("--strategies", help=f"comma-separated strategy names (default {','.join(DEFAULT_STRATEGIES)}); "
                     "NAME@VARIANT runs NAME again with its own --strategy-arg")
    cmp.add_argument("--seeds", help="comma-separated seeds (default: the config's seed, 0)")
    cmp.add_argument("--strategy-arg", action="append", metavar="NAME.KEY=VALUE",
                     help="hyper-parameter of one strategy, e.g. ewc.ewc_lambda=10 or mambacl@proto.head=prototype")
    _add_folder_options(cmp, "comparison")
    sub.add_parser("list", help="show benchmarks, strategies (with hyper-parameters) and models")
    return parser


def _given(args: argparse.Namespace, **overrides: Any) -> Dict[str, Any]:
    """The RunConfig keys this command line sets: the --config file, then the explicit options."""
    data = RunConfig.read_file(args.config) if args.config else {}
    for name in _SHARED:
        if getattr(args, name) is not None:
            data[name] = getattr(args, name)
    if data.get("pretrained") == "none":
        data["pretrained"] = None
    for option, key in (("benchmark_arg", "benchmark_args"), ("model_arg", "model_args")):
        items = _key_values(getattr(args, option), "--" + option.replace("_", "-"))
        if items:
            data[key] = {**data.get(key, {}), **items}
    if args.quiet:
        data["progress"] = False
    if args.verbose:
        data["verbose"] = True
    data.update({k: v for k, v in overrides.items() if v is not None})
    return apply_recipe(args.recipe, data) if args.recipe else data


def _resume_config(folder: str, given: Dict[str, Any]) -> RunConfig:
    """The config recorded by the run in ``folder``, with the harmless keys of ``given`` applied; other keys of
    ``given`` must equal the recorded ones."""
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"cannot resume: the run folder {folder} does not exist")
    manifest = latest_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"cannot resume: {folder} holds no checkpoint of a finished experience")
    saved = checkpoint_config(manifest).to_dict()
    differing = differing_keys(saved, {**given, "out": folder})
    if differing:
        detail = ", ".join(f"{k} (run: {a!r}, given: {b!r})" for k, (a, b) in sorted(differing.items()))
        raise ValueError(f"--resume continues the run in {folder} as it was configured; these options would change "
                         f"it: {detail}. Drop them, or start a new run with another --out (or --overwrite)")
    return RunConfig.from_dict({**saved, **{k: v for k, v in given.items() if k in HARMLESS_KEYS}, "out": folder})



def _list() -> None:
    print("Benchmarks:")
    for name in list_benchmarks():
        print(f"  {name:<22} {get_benchmark(name).summary}")
    print("\nStrategies (hyper-parameters for --strategy-arg):")
    for name in list_strategies():
        params = ", ".join(f"{p.name}={p.default!r}" for p in strategy_hparams(name).values())
        print(f"  {name:<22} {get_strategy(name).summary}" + (f"\n  {'':<22} [{params}]" if params else ""))
    print("\nRecipes (mambacl run --recipe NAME; options override their keys):")
    for name in list_recipes():
        recipe = get_recipe(name)
        print(f"  {recipe.tag:<30} {recipe.summary}\n  {'':<30} needs: {', '.join(recipe.requires) or 'nothing'}")
    print("\nModels (Vision Mamba and De-focus Mamba; any timm model name also works):")
    for name in timm.list_models(["vim_*", "longhorn_vim_*", "defocus_mamba_*", "test_vim", "test_longhorn_vim",
                                  "test_defocus_mamba"]):
        print(f"  {name}")


def _per_strategy_args(items: Optional[List[str]]) -> Dict[str, Dict[str, Any]]:
    nested: Dict[str, Dict[str, Any]] = {}
    for key, value in _key_values(items, "--strategy-arg").items():
        name, sep, hparam = key.rpartition(".")
        if not sep:
            raise ValueError(f"compare's --strategy-arg expects NAME.KEY=VALUE, got {key!r}")
        nested.setdefault(name, {})[hparam] = value
    return nested


def _folder_flags(args: argparse.Namespace, out: Optional[str], prefix: str = "") -> tuple:
    """(out, resume, overwrite) from --out and --resume [DIR]; both folders given must agree."""
    resume = getattr(args, f"{prefix}resume")
    if isinstance(resume, str):
        if out is not None and out != resume:
            raise ValueError(f"--resume {resume} and --out {out} name different folders; give one of them")
        out = resume
    return out, bool(resume), getattr(args, f"{prefix}overwrite")


def _run(args: argparse.Namespace) -> None:
    given = _given(args, strategy=args.strategy, seed=args.seed,
                   strategy_args=_key_values(args.strategy_arg, "--strategy-arg") or None)
    out, resume, overwrite = _folder_flags(args, given.get("out"))
    if resume:
        if out is None:
            raise ValueError("--resume needs the run folder: --resume DIR, or --out DIR --resume")
        config = _resume_config(out, given)
    else:
        config = RunConfig.from_dict({**given, **({"out": out} if out else {})})
    results = run_benchmark(config, resume=resume, overwrite=overwrite)
    final = results["final"]
    if final["acc_sample_weighted"] is None:
        print(f"nothing to train: the run in {config.out} has no experience")
        return
    print(f"final: class-incremental acc {final['acc_sample_weighted']:.4f}, within-task acc "
          f"{final['within_task_acc']:.4f}, feature NCM acc {final['ncm_acc']:.4f}, avg incremental acc "
          f"{final['avg_incremental_acc']:.4f}, forgetting {final['forgetting']:.4f}, BWT {final['bwt']:.4f} -> "
          f"{config.out}")


def _compare(args: argparse.Namespace, strategies: Optional[List[str]], seeds: Optional[List[int]],
             strategy_args: Optional[Dict[str, Dict[str, Any]]], given: Dict[str, Any], prefix: str = "") -> None:
    """Run a comparison; with --resume, what is not given comes from the plan it was started with."""
    out, resume, overwrite = _folder_flags(args, given.get("out"), prefix)
    plan = read_plan(out) if resume and out else None
    if plan is not None:
        config = RunConfig.from_dict({**plan["config"], **given, "out": out})
        strategies, seeds = strategies or plan["strategies"], seeds or plan["seeds"]
        strategy_args = strategy_args or plan["strategy_args"]
    else:
        config = RunConfig.from_dict({**given, **({"out": out} if out else {})})
        strategies, seeds = strategies or list(DEFAULT_STRATEGIES), seeds or [config.seed]
    comparison = compare(config, strategies, seeds, strategy_args, resume=resume, overwrite=overwrite)
    print(f"\n{config.benchmark}, seeds {list(seeds)} (results in {config.out}):\n" + compare_table(comparison))


def _parse_list(text: str, option: str, cast: type) -> List[Any]:
    try:
        items = [cast(s.strip()) for s in text.split(",") if s.strip()]
    except ValueError as err:
        raise ValueError(f"{option} expects a comma-separated list of {cast.__name__}s, got {text!r}") from err
    if not items:
        raise ValueError(f"{option} needs at least one value, got {text!r}")
    return items


def _continue_hint(args: argparse.Namespace, stop: RunInterrupted) -> str:
    if args.command == "run":
        return f"mambacl run --resume {stop.out}"
    return "the same command with --resume" if args.command == "compare" else "mambacl --resume"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``mambacl`` command. Returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        top = [f"--{k[len(_TOP):]}" for k, v in vars(args).items() if k.startswith(_TOP) and v not in (None, False)]
        if args.command is None:
            pretrained = args.top_pretrained
            pretrained = None if pretrained == "none" else pretrained or DEFAULT_PRETRAINED
            print(f"split digits, {' vs '.join(DEFAULT_STRATEGIES)}; every strategy starts from " + (
                f"the packaged {pretrained} backbone (test_vim pretrained on procedural glyphs, disjoint from the "
                "digits; --pretrained none starts from scratch)" if pretrained == DEFAULT_PRETRAINED else
                f"{pretrained}" if pretrained else "a random initialisation (--pretrained none)"), flush=True)
            given = {"out": DEFAULT_OUT, "progress": not args.top_quiet, "verbose": args.top_verbose,
                     "pretrained": pretrained}
            _compare(args, list(DEFAULT_STRATEGIES), [0], None, given, prefix=_TOP)
        elif top:
            raise ValueError(f"{', '.join(top)} given before '{args.command}' belong to the bare command; give them "
                             f"after it: mambacl {args.command} {' '.join(top)} ...")
        elif args.command == "list":
            _list()
        elif args.command == "run":
            _run(args)
        else:
            _compare(args, None if args.strategies is None else _parse_list(args.strategies, "--strategies", str),
                     None if args.seeds is None else _parse_list(args.seeds, "--seeds", int),
                     _per_strategy_args(args.strategy_arg), _given(args))
    except RunInterrupted as stop:
        of = f" of {stop.total}" if stop.total is not None else ""
        print(f"\nmambacl: interrupted; {stop.done}{of} experiences of the run in {stop.out} are finished and saved. "
              f"Continue with: {_continue_hint(args, stop)}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\nmambacl: interrupted before any experience finished", file=sys.stderr)
        return 130
    except _EXPECTED as err:
        if getattr(args, "debug", False) or args.top_debug \
                or (isinstance(err, TypeError) and _CODE_ERROR.search(str(err))):
            raise
        parser.exit(2, f"mambacl: error: {err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
