"""No host synchronisation in a Vim training step (CUDA-free proxy).

On CUDA a device-to-host read (``.item()``, ``bool(tensor)``, ``.tolist()``) stalls the launch queue; on the CPU
the same reads show up in the profiler as ``aten::item`` / ``aten::is_nonzero`` / ``aten::_local_scalar_dense``.
With the scans' finiteness check off (its default on CUDA) a forward + backward must contain none of them; with
it on, exactly one read per scan call shows that the proxy sees such reads.
"""
import pytest
import timm
import torch
from torch.profiler import ProfilerActivity, profile

import mambacl.backbones  # noqa: F401  (registers the models)
from mambacl.backbones import VisionMamba
from mambacl.kernels.utils import FINITE_CHECK_ENV, finite_check_enabled

HOST_READS = ("aten::item", "aten::is_nonzero", "aten::_local_scalar_dense", "aten::nonzero")

MODELS = {
    "vim-chunk": lambda: timm.create_model("test_vim", num_classes=5, scan_impl="chunk"),
    "longhorn-vim-chunk": lambda: timm.create_model("test_longhorn_vim", num_classes=5, scan_impl="chunk"),
    "vim-triton": lambda: VisionMamba(img_size=8, patch_size=4, in_chans=3, depth=1, embed_dim=8, num_classes=5,
                                      scan_impl="triton"),  # the Triton host code, kernels in the interpreter
}


def _host_reads_in_a_training_step(model: torch.nn.Module) -> dict:
    model.train()
    size = model.patch_embed.img_size
    x = torch.randn(2, 3, *size)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 3])).backward()
    counts = {}
    for event in prof.events():
        if event.name in HOST_READS:
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def test_finite_check_defaults_off_on_cuda_only(monkeypatch):
    monkeypatch.delenv(FINITE_CHECK_ENV, raising=False)
    assert finite_check_enabled(torch.device("cpu")) and not finite_check_enabled(torch.device("cuda"))
    monkeypatch.setenv(FINITE_CHECK_ENV, "1")
    assert finite_check_enabled(torch.device("cuda"))
    monkeypatch.setenv(FINITE_CHECK_ENV, "0")
    assert not finite_check_enabled(torch.device("cpu"))


@pytest.mark.parametrize("name", MODELS)
def test_training_step_reads_nothing_back_without_the_finite_check(name, monkeypatch):
    monkeypatch.setenv(FINITE_CHECK_ENV, "0")
    assert _host_reads_in_a_training_step(MODELS[name]()) == {}


def test_the_proxy_sees_the_finite_check(monkeypatch):
    """With the check on, each scan call reads one flag back (depth 2 x two directions = 4 calls)."""
    monkeypatch.setenv(FINITE_CHECK_ENV, "1")
    model = MODELS["vim-chunk"]()
    assert _host_reads_in_a_training_step(model)["aten::is_nonzero"] == len(model.ssm_branches()) == 4
