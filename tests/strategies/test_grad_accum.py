"""Gradient accumulation (DistributedPlugin's max_device_batch) reproduces the large batch: the same gradient at
every optimizer step, the same trajectory, one null-space projection per step; and data_repeat runs each epoch
over shuffled copies of the data. The model is float64 but for Vim's fp32 residual stream, so micro-batching
changes results by fp32 rounding (relative ~1e-7) only; a wrongly weighted micro-batch is off by ~10%."""
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from avalanche.core import SupervisedPlugin
from avalanche.training import EWC, Naive

from mambacl.strategies import MambaCL
from mambacl.strategies.distributed import distributed_loader, micro_batches
from mambacl.strategies.plugins import DistributedPlugin, NullSpacePlugin

sys.path.insert(0, str(Path(__file__).parent))
from mambacl_helpers import split_digits, tiny_vim  # noqa: E402

BATCH = 8


@pytest.fixture
def float64():
    """Heads that Avalanche adds during training are built in the default dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


class StepGradients(SupervisedPlugin):
    """Records every parameter's gradient right before each real optimizer step."""

    def __init__(self) -> None:
        super().__init__()
        self.steps, self.micro = [], 0

    def before_update(self, strategy, **kwargs) -> None:
        self.micro += 1
        if not getattr(strategy, "accumulating_gradients", False):
            self.steps.append({n: p.grad.clone() for n, p in strategy.model.named_parameters() if p.grad is not None})


def _train(kind: str, max_device_batch, experiences: int = 2):
    torch.manual_seed(0)
    to64 = dict(train_transform=lambda x: x.double(), eval_transform=lambda x: x.double())
    bench = split_digits(per_class=(14, 11), **to64) if experiences == 2 else split_digits(**to64)
    model = tiny_vim(patch_size=4, embed_dim=16, head="incremental" if kind != "mambacl" else "experience")
    recorder = StepGradients()
    plugins = [DistributedPlugin(seed=3, max_device_batch=max_device_batch), recorder]
    common = dict(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3),
                  criterion=torch.nn.CrossEntropyLoss(), train_mb_size=BATCH, train_epochs=2, eval_mb_size=64,
                  plugins=plugins, evaluator=None)
    strategy = {"naive": lambda: Naive(**common), "ewc": lambda: EWC(ewc_lambda=50.0, **common),
                "mambacl": lambda: MambaCL(selection="energy", projector="strict", progress=False, **common)}[kind]()
    for exp in bench.train_stream[:experiences]:
        strategy.train(exp)
    return strategy, recorder


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kind", ["naive", "ewc", "mambacl"])
def test_accumulated_steps_equal_the_large_batch(kind):
    full, full_grads = _train(kind, None)
    micro, micro_grads = _train(kind, 2)
    # 14 and 11 samples per experience at batch 8: steps of 8 + 6 and 8 + 3 samples, the last ones partial
    assert len(micro_grads.steps) == len(full_grads.steps) == 2 * (2 + 2)
    assert micro_grads.micro == 2 * (4 + 3) + 2 * (4 + 2) and full_grads.micro == len(full_grads.steps)
    for step, (a, b) in enumerate(zip(micro_grads.steps, full_grads.steps)):
        assert a.keys() == b.keys()
        for name in a:
            assert _relative(a[name], b[name]) < 1e-6, f"step {step}: {name}"
    for (name, p), q in zip(micro.model.named_parameters(), full.model.parameters()):
        assert _relative(p, q) < 1e-6, name


@pytest.mark.usefixtures("float64")
def test_the_null_space_projection_runs_once_per_optimizer_step(monkeypatch):
    projected = Counter()
    original = NullSpacePlugin.after_update

    def counting(self, strategy, **kwargs):
        if self._snapshots:  # before_update snapshots the parameters only for a step it will project
            projected[strategy.experience.current_experience] += 1
        return original(self, strategy, **kwargs)
    monkeypatch.setattr(NullSpacePlugin, "after_update", counting)
    _, recorder = _train("mambacl", 2)
    assert projected == {1: 4}  # experience 0 trains unprojected; experience 1 takes 2 epochs x 2 steps


@pytest.mark.parametrize("per_rank, limit, expected", [(200, None, 1), (200, 64, 4), (200, 30, 8), (200, 200, 1),
                                                      (7, 3, 7), (8, 1, 8)])
def test_micro_batches_is_the_fewest_dividing_split(per_rank, limit, expected):
    k = micro_batches(per_rank, limit)
    assert k == expected and per_rank % k == 0 and (limit is None or per_rank // k <= limit)


def test_data_repeat_runs_each_epoch_over_shuffled_copies():
    data = torch.utils.data.TensorDataset(torch.arange(10))
    loader = distributed_loader(data, 4, seed=0, epoch=0, repeat=3)
    seen = torch.cat([b[0] for b in loader]).tolist()
    assert len(loader) == 8 and Counter(seen) == {i: 3 for i in range(10)}
    assert seen != sorted(seen)  # shuffled across the copies


def test_accumulation_needs_the_template_loader():
    from mambacl.strategies.registry import TrainSetup, create_strategy
    setup = TrainSetup(backbone=tiny_vim(patch_size=4, embed_dim=16).backbone, train_mb_size=8,
                       plugins=[DistributedPlugin(max_device_batch=2)])
    strategy = create_strategy("replay", setup, mem_size=4)
    with pytest.raises(TypeError, match="max_device_batch and data_repeat need the template's training loader"):
        strategy.train(split_digits(n_train=40).train_stream[0])  # refused before anything trains


def test_accumulation_is_refused_where_the_loss_spans_the_batch():
    from mambacl.strategies.fscil.strategy import MambaFSCIL
    plugin = DistributedPlugin(max_device_batch=4)
    strategy = type("Fake", (), {"plugins": [plugin], "train_mb_size": 8,
                                 "batch_level_loss": MambaFSCIL.batch_level_loss})()
    with pytest.raises(ValueError, match="max_device_batch 4: .* use max_device_batch >= 8"):
        plugin.before_training(strategy)
    DistributedPlugin(max_device_batch=8).before_training(strategy)  # valid edge: one micro-batch per step
