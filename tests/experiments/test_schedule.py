"""The run's schedule keys: lr_milestones / lr_gamma restart at every experience (a fresh optimizer per task, as
in Mamba-CL), data_repeat runs each epoch over repeated data, max_device_batch keeps the results, and all of it
survives an interruption."""
import dataclasses

import pytest
from avalanche.core import SupervisedPlugin
from avalanche.training import Naive

from mambacl.experiments import RunConfig, run_benchmark
from mambacl.strategies.registry import register_strategy

SEEN = []


class _Probe(SupervisedPlugin):
    """Records (experience, epoch, lr, iterations) at the end of every training epoch."""

    def __init__(self) -> None:
        super().__init__()
        self.iterations = 0

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self.iterations += 1

    def after_training_epoch(self, strategy, **kwargs) -> None:
        SEEN.append((strategy.experience.current_experience, strategy.clock.train_exp_epochs,
                     strategy.optimizer.param_groups[0]["lr"], self.iterations))
        self.iterations = 0


@register_strategy("test-lr-probe")
def _probe_strategy(setup):
    """Naive with a probe of the learning rate and the iterations per epoch (test only)."""
    model = setup.classifier("incremental")
    kwargs = setup.template_kwargs()
    return Naive(model=model, optimizer=setup.optimizer(model), **{**kwargs, "plugins": [*kwargs["plugins"], _Probe()]})


@pytest.fixture
def config(tmp_path):
    SEEN.clear()
    return RunConfig(strategy="test-lr-probe", epochs=3, lr=0.01, batch_size=8, lr_milestones=[1, 2], lr_gamma=0.5,
                     data_repeat=2, progress=False, out=str(tmp_path / "run"),
                     benchmark_args={"n_experiences": 2, "max_per_class": 4})


def test_milestones_restart_every_experience_and_data_repeats(config):
    run_benchmark(config)
    # 5 classes x 4 images x 2 copies = 40 samples per epoch at batch 8: 5 steps
    assert [(e, ep, round(lr, 6), it) for e, ep, lr, it in SEEN] == [
        (0, 0, 0.01, 5), (0, 1, 0.005, 5), (0, 2, 0.0025, 5), (1, 0, 0.01, 5), (1, 1, 0.005, 5), (1, 2, 0.0025, 5)]


def test_an_interrupted_schedule_resumes_to_the_same_run(config, tmp_path):
    full = run_benchmark(config)
    part = dataclasses.replace(config, out=str(tmp_path / "part"))
    run_benchmark(part, stop_after=1)
    SEEN.clear()
    resumed = run_benchmark(part, resume=True)
    assert [round(lr, 6) for _, _, lr, _ in SEEN] == [0.01, 0.005, 0.0025]
    assert resumed["accuracy_matrix"] == full["accuracy_matrix"]


def test_micro_batches_give_the_same_run(config, tmp_path):
    full = run_benchmark(config)
    micro = run_benchmark(dataclasses.replace(config, max_device_batch=3, out=str(tmp_path / "micro")))
    assert [it for *_, it in SEEN[6:]] == [20] * 6  # batch 8 in micro-batches of 2 (the fewest dividing split)
    for a, b in zip(micro["experiences"], full["experiences"]):
        assert a["acc_per_exp"] == pytest.approx(b["acc_per_exp"], abs=0.051)  # fp32 rounding may flip one image
