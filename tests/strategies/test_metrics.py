"""Within-task and feature-NCM accuracy metrics against hand computations on a trained tiny model."""
import pickle

import pytest
import torch
import torch.nn.functional as F
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from mambacl_helpers import split_digits, tiny_vim
from torch.utils.data import DataLoader

from mambacl.strategies import feature_ncm_accuracy_metrics, within_task_accuracy_metrics
from mambacl.strategies.metrics import restricted_predictions

STREAM = "eval_phase/test_stream/Task000"


@torch.no_grad()
def _features_and_logits(model, dataset):
    model.eval()
    x, y = zip(*[(mb[0], mb[1]) for mb in DataLoader(dataset.eval(), batch_size=512)])
    x, y = torch.cat(x), torch.cat(y)
    feats = model.features(x)
    return feats.double(), model.head(feats), y


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    bench = split_digits(n_train=300)
    model = tiny_vim()
    ncm = feature_ncm_accuracy_metrics()
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True, stream=True), *within_task_accuracy_metrics(),
                                 *ncm, loggers=[])
    strategy = Naive(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=2e-3), train_mb_size=32,
                     train_epochs=2, eval_mb_size=50, evaluator=evaluator)
    for exp in bench.train_stream[:3]:
        strategy.train(exp)
    metrics = strategy.eval(bench.test_stream[:3])
    return bench, model, metrics, ncm[0].ncm, strategy


def test_within_task_accuracy_equals_hand_restricted_argmax(trained):
    bench, model, metrics, _, _ = trained
    correct, total = 0, 0
    for j, exp in enumerate(bench.test_stream[:3]):
        _, logits, y = _features_and_logits(model, exp.dataset)
        classes = sorted(exp.classes_in_this_experience)
        local = logits[:, classes].argmax(1)
        hits = int((torch.tensor(classes)[local] == y).sum())
        assert metrics[f"Top1_WithinTaskAcc_Exp/{STREAM}/Exp{j:03d}"] == pytest.approx(hits / len(y), abs=1e-12)
        correct, total = correct + hits, total + len(y)
    assert metrics[f"Top1_WithinTaskAcc_Stream/{STREAM}"] == pytest.approx(correct / total, abs=1e-12)
    # a correct unrestricted argmax is also the restricted one, so within-task accuracy bounds class-incremental
    for key in [k for k in metrics if k.startswith("Top1_Acc_")]:
        assert metrics[key.replace("Top1_Acc_", "Top1_WithinTaskAcc_")] >= metrics[key]


def test_feature_ncm_accuracy_equals_hand_cosine_ncm(trained):
    bench, model, metrics, _, _ = trained
    train = [_features_and_logits(model, e.dataset) for e in bench.train_stream[:3]]
    feats, labels = torch.cat([f for f, _, _ in train]), torch.cat([y for _, _, y in train])
    classes = labels.unique()
    means = torch.stack([feats[labels == c].mean(0) for c in classes])
    correct, total = 0, 0
    for j, exp in enumerate(bench.test_stream[:3]):
        f, _, y = _features_and_logits(model, exp.dataset)
        pred = classes[(F.normalize(f, dim=1) @ F.normalize(means, dim=1).T).argmax(1)]
        hits = int((pred == y).sum())
        assert metrics[f"Top1_FeatureNCMAcc_Exp/{STREAM}/Exp{j:03d}"] == pytest.approx(hits / len(y), abs=1e-12)
        correct, total = correct + hits, total + len(y)
    assert metrics[f"Top1_FeatureNCMAcc_Stream/{STREAM}"] == pytest.approx(correct / total, abs=1e-12)


def test_feature_ncm_state_drops_datasets_when_pickled_and_asks_for_them(trained):
    bench, _, metrics, ncm, strategy = trained
    restored = pickle.loads(pickle.dumps(ncm))
    assert restored.recorded == [0, 1, 2] and not restored.datasets
    with pytest.raises(RuntimeError, match="set_train_datasets"):
        restored.refresh(strategy)
    restored.set_train_datasets({i: bench.train_stream[i].dataset for i in range(3)})
    restored.refresh(strategy)
    torch.testing.assert_close(restored.means, ncm.means, rtol=0, atol=0)


def test_restricted_predictions_ignores_missing_columns():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 2.0]])
    assert restricted_predictions(logits, [2, 0]).tolist() == [2, 0]
    assert restricted_predictions(logits, [7, 8]).tolist() == [-1, -1]  # no column: counted wrong
