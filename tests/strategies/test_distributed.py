"""torch.distributed helpers on 2 CPU processes (gloo) against single-process references computed here.

Each multi-process check launches 2 Python processes with torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT on 127.0.0.1), bounded by a timeout; each rank saves what it computed
and the tests compare the ranks with each other and with the same computation done in one process.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.training.plugins import EvaluationPlugin
from torch import nn
from torch.utils.data import TensorDataset
from torchvision import transforms as T

from mambacl.benchmarks.fscil import FSCILSpec, fscil_cifar100, write_synthetic_cifar100
from mambacl.strategies import MambaCL, NullSpaceEngine, NullSpacePlugin
from mambacl.strategies.distributed import (EvalShardSampler, RoundRobinBatchSampler,
                                            ShardedBatchSampler, all_reduce_statistics_, all_reduce_sum_,
                                            broadcast_object, check_batch_divisible, check_replicas_in_sync,
                                            check_same_config, distributed_loader, eval_shard_sizes, gather_eval,
                                            init_distributed, rank, world_size, wrap_ddp)
from mambacl.strategies.fscil.strategy import MambaFSCIL
from mambacl.strategies.plugins import DistributedPlugin

sys.path.insert(0, str(Path(__file__).parent))
from mambacl_helpers import split_digits, tiny_vim  # noqa: E402  (split digits and a tiny Vision Mamba)

TESTS = Path(__file__).parent
TIMEOUT_S = 240
D, RANK_X, N, COLLECT_BATCH, TRAIN_BATCH = 8, 5, 22, 4, 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(worker: str, out: Path, world: int = 2, timeout: float = TIMEOUT_S,
           module: str = "test_distributed") -> list:
    """Run ``worker(out)`` of test ``module`` (in this folder) on ``world`` processes; return each rank's results."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS.parents[1]), os.environ.get("PYTHONPATH")]))}
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); import {module} as t; t.{worker}(sys.argv[1])"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(out)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    return [torch.load(Path(out) / f"rank{r}.pt", weights_only=False) for r in range(world)]


# -- shared computations: run by each rank on its shard, and here on everything -------------------------------
def features() -> torch.Tensor:
    """[N, D] rows spanning a RANK_X-dimensional subspace, so the numerical kernel has D - RANK_X directions."""
    g = torch.Generator().manual_seed(7)
    return (torch.randn(N, RANK_X, generator=g, dtype=torch.float64)
            @ torch.randn(RANK_X, D, generator=g, dtype=torch.float64))


def collect(engine: NullSpaceEngine, sampler) -> None:
    x = features()
    for idx in sampler:
        engine.add("0", x[idx])


def initial_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(D, 3)).double()


def projected_step(plugin: NullSpacePlugin, batch_index: torch.Tensor) -> nn.Module:
    """One Adam step of a float64 Linear on the given samples, projected by the plugin (``dW @ P``)."""
    model = initial_model()
    plugin.configure(model)
    ddp = wrap_ddp(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    x = features()
    y = torch.arange(N) % 3
    loss = nn.functional.cross_entropy(ddp(x[batch_index]), y[batch_index])
    loss.backward()
    plugin.before_update(None)
    opt.step()
    plugin.after_update(None)
    return model


def make_plugin() -> NullSpacePlugin:
    return NullSpacePlugin(protect="layers", selection="kernel", projector="strict", trainable=None, progress=False)


def train_indices():
    """This rank's part of the first global batch of epoch 0 under distributed_loader."""
    loader = distributed_loader(TensorDataset(torch.arange(N)), TRAIN_BATCH, seed=5, epoch=0)
    return next(iter(loader))[0]


def worker_collectives(out: str) -> None:
    assert init_distributed() and world_size() == 2
    r = rank()
    res = {}
    for name, call in (("config", lambda: check_same_config({"lr": 0.1 * (1 + r), "seed": 1, "depth": 2 + r})),
                       ("batch", lambda: check_batch_divisible(3))):
        try:
            call()
        except ValueError as err:
            res[name] = str(err)
    check_same_config({"lr": 0.1, "seed": 1})
    torch.manual_seed(0)
    replica = nn.Linear(3, 2)
    res["in_sync"] = check_replicas_in_sync(replica)
    with torch.no_grad():
        replica.bias[1] += 0.25 * r
    try:
        check_replicas_in_sync(replica)
    except RuntimeError as err:
        res["diverged"] = str(err)
    exact = torch.tensor([1.0, 2.0 ** -40 * (r + 1)], dtype=torch.float64)
    counts = torch.tensor([r + 1, 10], dtype=torch.int64)
    all_reduce_sum_([exact, counts])
    res.update(exact=exact, counts=counts, broadcast=broadcast_object({"from": r}))
    # statistics one rank never saw: created as zeros, shapes agreed
    sums = {"a": torch.full((2, 2), float(r + 1), dtype=torch.float64)} if r == 0 else \
        {"a": torch.ones(2, 2, dtype=torch.float64), "b": torch.eye(3, dtype=torch.float64)}
    rows = {k: 10 * (r + 1) for k in sums}
    all_reduce_statistics_(sums, rows)
    res.update(sums=sums, rows=rows)
    # evaluation: 9 samples, global batch 4 -> chunks [2, 2], [2, 2], [1, 0] (rank 1 runs a placeholder)
    data = torch.arange(9, dtype=torch.float32) * 10
    sampler = EvalShardSampler(9, 4)
    res["eval_batches"] = list(sampler)
    res["gathered"] = [gather_eval(data[idx] + 0.5, sizes) for idx, sizes in zip(sampler, sampler.sizes)]
    # null space: covariance batches dealt round-robin, sums all-reduced, projector, one projected DDP step
    engine = NullSpaceEngine(selection="kernel", projector="strict")
    collect(engine, RoundRobinBatchSampler(N, COLLECT_BATCH))
    res["local_rows"] = dict(engine.rows)
    all_reduce_statistics_(engine.covariances, engine.rows)
    engine.update_projectors()
    plugin = make_plugin()
    plugin.engine = engine
    res["train_indices"] = train_indices()
    model = projected_step(plugin, res["train_indices"])
    res.update(engine=engine.state_dict(), weight=model[0].weight.detach().clone())
    res["strategy"] = mambacl_run()
    torch.save(res, Path(out) / f"rank{r}.pt")


class SampleCounter(SupervisedPlugin):
    """Counts the samples this process forwarded in training and evaluation."""

    def __init__(self) -> None:
        super().__init__()
        self.train = self.eval = 0

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self.train += len(strategy.mb_x)

    def after_eval_iteration(self, strategy, **kwargs) -> None:
        self.eval += len(strategy.mb_x)


def mambacl_run() -> dict:
    """MambaCL + DistributedPlugin over 2 split-digits experiences (global batch 16, 2 epochs), evaluated on the
    seen test data after each; returns the final parameters, metrics and null-space row counts."""
    bench = split_digits(per_class=[40, 40])
    torch.manual_seed(0)
    model = tiny_vim(patch_size=4)
    forwarded = []  # samples through the model: training, evaluation and the null-space covariance pass
    model.register_forward_pre_hook(lambda module, args: forwarded.append(len(args[0])))
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True),
                                 loss_metrics(stream=True), loggers=[])
    strategy = MambaCL(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=2e-3), train_mb_size=16,
                       train_epochs=2, eval_mb_size=30, evaluator=evaluator, progress=False,
                       plugins=[DistributedPlugin(seed=11), counter := SampleCounter()])
    for i, exp in enumerate(bench.train_stream):
        strategy.train(exp)
        metrics = strategy.eval(bench.test_stream[:i + 1])
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "metrics": {k: v for k, v in metrics.items() if k.startswith(("Top1", "Loss"))},
            "rows": dict(strategy.nullspace.engine.rows), "samples": (counter.train, counter.eval, sum(forwarded))}


@pytest.fixture(scope="module")
def collectives(tmp_path_factory):
    return launch("worker_collectives", tmp_path_factory.mktemp("collectives"))


# -- Mamba-FSCIL ----------------------------------------------------------------------------------------------
FSCIL_SPEC = FSCILSpec(num_classes=8, num_base=4, n_way=2, n_shot=2)


def fscil_run(root: str) -> dict:
    """MambaFSCIL + DistributedPlugin (tiny Vim backbone, no BatchNorm, no mixup) over the base session and two
    2-way 2-shot sessions on generated CIFAR-format data in ``root``; returns what each phase produced."""
    bench = fscil_cifar100(root, spec=FSCIL_SPEC, train_transform=T.ToTensor(), eval_transform=T.ToTensor())
    torch.manual_seed(0)
    counter = SampleCounter()
    strategy = MambaFSCIL(backbone="test_vim", img_size=32, num_classes=8, num_base=4, d_state=4, dt_rank=2,
                          overrides=dict(inc_steps=3, base_warmup=0, base_lr=0.05, inc_lr=0.1, copy=2,
                                         mixup_prob=0.0),
                          inc_mb_size=6, train_mb_size=8, train_epochs=2, eval_mb_size=10,
                          evaluator=EvaluationPlugin(accuracy_metrics(experience=True), loggers=[]),
                          plugins=[DistributedPlugin(seed=4), counter])
    result = {}
    for session, (train_exp, test_exp) in enumerate(zip(bench.train_stream, bench.test_stream)):
        # data loaders draw from the global generator a different number of times in 1 and 2 processes: reseed
        # so that the new incremental branch starts from the same weights in both
        torch.manual_seed(10 + session)
        strategy.train(train_exp)
        strategy.session_accuracy(test_exp)
        result[f"params{session}"] = {k: v.detach().clone() for k, v in strategy.model.state_dict().items()}
        result[f"trained{session}"] = counter.train
    result.update(prototypes=dict(strategy._prototypes), summary=strategy.summary())
    # the base prototypes recomputed directly: the backbone is frozen after the base session
    backbone = strategy.model.backbone.eval()
    with torch.no_grad():
        images = bench.train_stream[0].dataset.eval()
        maps = torch.stack([backbone(images[i][0][None])[0] for i in range(len(images))])
        labels = torch.tensor([int(images[i][1]) for i in range(len(images))])
    result["direct_means"] = {c: maps[labels == c].mean(0) for c in range(FSCIL_SPEC.num_base)}
    return result


def worker_fscil(out: str) -> None:
    assert init_distributed() and world_size() == 2
    torch.save(fscil_run(str(Path(out) / "data")), Path(out) / f"rank{rank()}.pt")


@pytest.fixture(scope="module")
def fscil_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fscil")
    write_synthetic_cifar100(out / "data", num_classes=8, train_per_class=8, test_per_class=4)
    return out, launch("worker_fscil", out)


def test_config_and_batch_checks_fail_on_every_rank_naming_the_keys(collectives):
    for res in collectives:
        assert "['depth', 'lr']" in res["config"] and "rank 1 has 0.2" in res["config"]
        assert "seed" not in res["config"].split(":")[0]
        assert "not divisible by the world size 2" in res["batch"]
        assert res["in_sync"] == 0.0 and "max |difference| 2.500e-01" in res["diverged"]
    assert "bias" in collectives[1]["diverged"] and "bias" not in collectives[0]["diverged"]


def test_all_reduce_keeps_float64_and_int64(collectives):
    for res in collectives:
        assert res["exact"].dtype == torch.float64
        assert res["exact"].tolist() == [2.0, 3 * 2.0 ** -40]  # 2**-40 is lost in float32 next to 2
        assert res["counts"].tolist() == [3, 20]
        assert res["broadcast"] == {"from": 0}


def test_statistics_missing_on_a_rank_are_created_and_summed(collectives):
    for res in collectives:
        torch.testing.assert_close(res["sums"]["a"], torch.full((2, 2), 2.0, dtype=torch.float64))
        torch.testing.assert_close(res["sums"]["b"], torch.eye(3, dtype=torch.float64))
        assert res["rows"] == {"a": 30, "b": 20}


def test_eval_chunks_are_gathered_in_single_process_order(collectives):
    assert collectives[0]["eval_batches"] == [[0, 1], [4, 5], [8]]
    assert collectives[1]["eval_batches"] == [[2, 3], [6, 7], [8]]  # last one: placeholder, dropped
    expected = torch.arange(9, dtype=torch.float32) * 10 + 0.5
    for res in collectives:
        assert [len(b) for b in res["gathered"]] == [4, 4, 1]
        torch.testing.assert_close(torch.cat(res["gathered"]), expected)


def test_nullspace_statistics_projector_and_projected_step_match_one_process(collectives):
    ref_engine = NullSpaceEngine(selection="kernel", projector="strict")
    collect(ref_engine, RoundRobinBatchSampler(N, COLLECT_BATCH, rank=0, world=1))
    ref_engine.update_projectors()
    plugin = make_plugin()
    plugin.engine = ref_engine
    first_batch = next(iter(distributed_loader(TensorDataset(torch.arange(N)), TRAIN_BATCH, seed=5, epoch=0)))[0]
    assert sorted(torch.cat([r["train_indices"] for r in collectives]).tolist()) == sorted(first_batch.tolist())
    ref_weight = projected_step(plugin, first_batch)[0].weight.detach()
    # 6 batches of 4 rows (the last one 2) dealt 3/3; each rank saw a strict subset of the data
    assert [r["local_rows"]["0"] for r in collectives] == [12, 10]
    assert ref_engine.null_dims["0"] == D - RANK_X
    for res in collectives:
        state = res["engine"]
        assert state["rows"]["0"] == N and state["null_dims"]["0"] == D - RANK_X
        torch.testing.assert_close(state["covariances"]["0"], ref_engine.covariances["0"], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(state["projectors"]["0"], ref_engine.projectors["0"], rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(res["weight"], ref_weight, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(collectives[0]["weight"], collectives[1]["weight"], rtol=0, atol=0)
    step = ref_weight - initial_model()[0].weight.detach()
    assert step.abs().max() > 1e-3  # the step is real ...
    torch.testing.assert_close(features() @ step.T, torch.zeros(N, 3, dtype=torch.float64), rtol=0, atol=1e-10)


# -- single-process behaviour and bad input ---------------------------------------------------------------------
def test_single_process_helpers_are_identities():
    assert world_size() == 1 and rank() == 0
    t = torch.arange(3.0)
    all_reduce_sum_([t])
    assert t.tolist() == [0.0, 1.0, 2.0]
    model = nn.Linear(2, 2)
    assert wrap_ddp(model) is model
    check_same_config({"a": 1})
    assert gather_eval(torch.arange(5), [3]).tolist() == [0, 1, 2]


def test_distributed_loader_is_a_seeded_per_epoch_permutation():
    data = TensorDataset(torch.arange(10))
    epoch0 = torch.cat([b[0] for b in distributed_loader(data, 4, seed=1, epoch=0)])
    epoch1 = torch.cat([b[0] for b in distributed_loader(data, 4, seed=1, epoch=1)])
    g = torch.Generator()
    g.manual_seed(1)
    assert epoch0.tolist() == torch.randperm(10, generator=g).tolist()
    assert sorted(epoch1.tolist()) == list(range(10)) and epoch1.tolist() != epoch0.tolist()
    assert [len(b[0]) for b in distributed_loader(data, 4, seed=1, epoch=0)] == [4, 4, 2]


def test_samplers_partition_the_batches():
    assert eval_shard_sizes(11, 4, 3) == [[2, 1, 1], [2, 1, 1], [1, 1, 1]]
    parts = [list(EvalShardSampler(11, 4, rank=r, world=3)) for r in range(3)]
    assert [b for step in zip(*parts) for b in step] == [[0, 1], [2], [3], [4, 5], [6], [7], [8], [9], [10]]
    robin = [list(RoundRobinBatchSampler(10, 3, rank=r, world=2)) for r in range(2)]
    assert robin == [[[0, 1, 2], [6, 7, 8]], [[3, 4, 5], [9]]]
    assert [len(RoundRobinBatchSampler(10, 3, rank=r, world=2)) for r in range(2)] == [2, 2]
    global_batches = [[5, 1, 7, 2], [0, 3]]
    shares = [list(ShardedBatchSampler(global_batches, rank=r, world=2)) for r in range(2)]
    assert shares == [[[5, 7], [0]], [[1, 2], [3]]]
    with pytest.raises(ValueError, match="global batch 0 has 3 samples, not divisible by the world size 2"):
        list(ShardedBatchSampler([[1, 2, 3]], rank=0, world=2))


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="not divisible by the world size 4"):
        check_batch_divisible(6, 4)
    with pytest.raises(ValueError, match="batch size must be a positive int"):
        check_batch_divisible(0, 1)
    with pytest.raises(TypeError, match="mapping"):
        check_same_config([("a", 1)])
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        all_reduce_sum_([torch.zeros(1), 3.0])
    with pytest.raises(ValueError, match="rank"):
        EvalShardSampler(5, 2, rank=2, world=2)
    with pytest.raises(ValueError, match="one entry per rank"):
        gather_eval(torch.zeros(3), [1, 2])
    with pytest.raises(ValueError, match="same keys"):
        all_reduce_statistics_({"a": torch.zeros(1)}, {})
    with pytest.raises(ValueError, match="epoch"):
        distributed_loader(TensorDataset(torch.arange(3)), 1, seed=0, epoch=-1)
    with pytest.raises(ValueError, match="autocast"):
        DistributedPlugin(autocast="fp8")


def test_init_distributed_outside_torchrun_and_bad_backend(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert init_distributed() is False
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="backend must be one of"):
        init_distributed(backend="mpi2")


def test_mambacl_with_distributed_plugin_matches_one_process(collectives):
    ref = mambacl_run()
    a, b = (res["strategy"] for res in collectives)
    assert set(a["params"]) == set(ref["params"])
    for name, p in ref["params"].items():
        torch.testing.assert_close(a["params"][name], b["params"][name], rtol=0, atol=0, msg=name)
        # same global batches; fp32 gradients averaged over 2 shards differ from one batch only by rounding
        torch.testing.assert_close(a["params"][name], p, rtol=1e-4, atol=1e-5, msg=name)
    assert a["rows"] == b["rows"] == ref["rows"]
    # each rank trained on half of every global batch, evaluated half of every test batch and ran the covariance
    # pass on every other batch of 30 (rank 0: 30 of each experience's 40 samples, rank 1: 10)
    assert ref["samples"] == (2 * 2 * 40, 40 + 80, 160 + 120 + 80)
    assert a["samples"] == (2 * 40, 60, 80 + 60 + 60) and b["samples"] == (2 * 40, 60, 80 + 60 + 20)
    assert len(ref["metrics"]) == 4  # stream accuracy and loss, accuracy of the 2 experiences
    for key, value in ref["metrics"].items():
        assert a["metrics"][key] == b["metrics"][key] == pytest.approx(value, abs=1e-5), key


def test_autocast_runs_the_forward_in_bf16_and_returns_float32():
    bench = split_digits(per_class=[16])
    model = tiny_vim(patch_size=4)
    seen = []
    model.backbone.patch_embed.proj.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    outputs = []

    class Outputs(SupervisedPlugin):
        def after_forward(self, strategy, **kwargs):
            outputs.append(strategy.mb_output.dtype)

    strategy = MambaCL(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3), train_mb_size=8,
                       evaluator=EvaluationPlugin(loggers=[]), progress=False,
                       plugins=[DistributedPlugin(autocast="bf16"), Outputs()])
    strategy.train(bench.train_stream[0])
    assert seen[:2] == [torch.bfloat16] * 2 and seen[-1] == torch.float32  # training steps; covariance pass in fp32
    assert outputs == [torch.float32] * 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_fscil_with_distributed_plugin_matches_one_process(fscil_ranks):
    out, (a, b) = fscil_ranks
    ref = fscil_run(str(out / "data"))
    for session in range(3):
        for name, p in ref[f"params{session}"].items():
            torch.testing.assert_close(a[f"params{session}"][name], b[f"params{session}"][name], rtol=0, atol=0)
            # same global batches in both phases; SGD on gradients averaged over 2 shards (fp32 rounding only)
            torch.testing.assert_close(a[f"params{session}"][name], p, rtol=1e-4, atol=1e-5, msg=name)
    # base prototypes: per-class float64 sums over round-robin shards, all-reduced
    assert sorted(ref["prototypes"]) == sorted(a["prototypes"]) == list(range(8))  # 4 base + 2 x 2 novel classes
    for c, mean in ref["direct_means"].items():
        torch.testing.assert_close(ref["prototypes"][c], mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a["prototypes"][c], b["prototypes"][c], rtol=0, atol=0)
        torch.testing.assert_close(a["prototypes"][c], mean, rtol=1e-4, atol=1e-5)
    assert a["summary"] == b["summary"]
    assert a["summary"]["sessions"] == pytest.approx(ref["summary"]["sessions"], abs=1e-6)
    # each rank trained on half of every batch: 2 epochs of 32 base images, then 3 steps of 6 cached maps twice
    trained = [[res[f"trained{session}"] for session in range(3)] for res in (ref, a, b)]
    assert trained == [[64, 82, 100], [32, 41, 50], [32, 41, 50]]
