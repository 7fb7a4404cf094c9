"""The Mamba-CL authors' optimizer (Adam, L2 weight decay, heads at lr x50): param groups, heads added by model
adaptation landing in the head group, and steps against a hand-computed Adam-with-L2 update."""
import torch
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from mambacl_helpers import split_digits, tiny_vim

from mambacl.backbones import VisionMamba
from mambacl.strategies import HeadLRPlugin, mambacl_optimizer
from mambacl.strategies.registry import TrainSetup, create_strategy


def _groups(optimizer):
    return {g["name"]: g for g in optimizer.param_groups}


def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_registry_mambacl_has_the_authors_param_groups_and_l2_decay_after_two_experiences():
    bench = split_digits(n_train=150)
    backbone = VisionMamba(img_size=8, patch_size=4, in_chans=1, depth=1, embed_dim=16, num_classes=0)
    setup = TrainSetup(backbone=backbone, lr=0.01, weight_decay=0.1, train_mb_size=64,
                       evaluator=EvaluationPlugin(loggers=[]))
    strategy = create_strategy("mambacl", setup, head_lr_scale=7.0)
    optimizer, model = strategy.optimizer, strategy.model
    assert type(optimizer) is torch.optim.Adam and any(isinstance(p, HeadLRPlugin) for p in strategy.plugins)
    for exp in bench.train_stream[:2]:
        strategy.train(exp)
    assert optimizer is strategy.optimizer and len(optimizer.param_groups) == 2
    groups = _groups(optimizer)
    assert (groups["backbone"]["lr"], groups["head"]["lr"]) == (0.01, 0.07)
    assert all(g["weight_decay"] == 0.1 and not g["decoupled_weight_decay"] for g in groups.values())  # L2, not AdamW
    heads = {f"head.heads.{i}.{k}" for i in range(2) for k in ("weight", "bias")}
    assert _names(model, groups["head"]["params"]) == heads
    assert _names(model, groups["backbone"]["params"]) == {n for n, _ in model.named_parameters()} - heads
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))


def test_avalanche_alone_puts_the_first_experience_head_in_the_backbone_group():
    """Why HeadLRPlugin exists: update_optimizer files a parameter under its nearest named relative's group."""
    bench = split_digits(n_train=100)
    model = tiny_vim()
    optimizer = mambacl_optimizer(model)
    Naive(model=model, optimizer=optimizer, train_mb_size=64, evaluator=EvaluationPlugin(loggers=[])).train(
        bench.train_stream[0])
    assert "head.heads.0.weight" in _names(model, _groups(optimizer)["backbone"]["params"])
    assert not _groups(optimizer)["head"]["params"]


def _hand_adam_l2(p0, grads, lr, wd, betas=(0.9, 0.999), eps=1e-8):
    """Adam with L2 weight decay (g + wd * p before the moments), bias-corrected, in float64."""
    p, m, v = p0.double().clone(), torch.zeros_like(p0, dtype=torch.float64), torch.zeros_like(p0, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double() + wd * p
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        p = p - lr * (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
    return p


def test_mambacl_optimizer_steps_equal_hand_computed_adam_with_l2():
    bench = split_digits(n_train=100)
    model = tiny_vim()
    optimizer = mambacl_optimizer(model, lr=1e-3, weight_decay=0.05, head_lr_scale=50.0)
    Naive(model=model, optimizer=optimizer, train_mb_size=64, plugins=[HeadLRPlugin()],
          evaluator=EvaluationPlugin(loggers=[])).train(bench.train_stream[0])
    optimizer.state.clear()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in params.items()}
    gen = torch.Generator().manual_seed(0)
    grads = {n: [torch.randn(p.shape, generator=gen) for _ in range(2)] for n, p in params.items()}
    for step in range(2):
        for n, p in params.items():
            p.grad = grads[n][step].clone()
        optimizer.step()
    for name in ("head.heads.0.weight", "backbone.layers.0.mixer.fwd.x_proj_B.weight", "backbone.cls_token"):
        lr = 0.05 if name.startswith("head.") else 1e-3
        expected = _hand_adam_l2(start[name], grads[name], lr, 0.05)
        torch.testing.assert_close(params[name].double(), expected, rtol=1e-5, atol=1e-7)
