"""tools/pretrain_test_vim.py with tiny settings: bit-reproducible files, trained weights, a guarded --out."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).parents[2] / "tools"))
import pretrain_test_vim as tool  # noqa: E402

TINY = tool.PretrainSettings(n_classes=5, steps=3, batch_size=8, val_images=16)


def test_two_builds_give_identical_bytes_and_the_recipe_in_the_metadata(tmp_path):
    digests, threads = [], torch.get_num_threads()
    for name in ("a.safetensors", "b.safetensors"):
        model, val_accuracy = tool.pretrain(TINY)
        digests.append(tool.save_backbone(model, tmp_path / name, TINY, val_accuracy))
    assert digests[0] == digests[1]
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["mambacl"])["settings"] == tool.asdict(TINY)
        assert "head.weight" not in f.keys()
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()  # restored


def test_training_moves_every_parameter_and_another_seed_gives_another_model():
    trained = tool.pretrain(TINY)[0].state_dict()
    init = tool.initial_model(TINY).state_dict()
    for name, tensor in trained.items():
        assert not torch.equal(tensor, init[name]), name
    other = tool.pretrain(tool.PretrainSettings(**dict(tool.asdict(TINY), seed=1)))[0].state_dict()
    assert not torch.equal(other["pos_embed"], trained["pos_embed"])


def test_existing_out_is_not_overwritten(tmp_path):
    out = tmp_path / "kept.safetensors"
    out.write_bytes(b"keep")
    with pytest.raises(SystemExit):
        tool.main(["--out", str(out), "--steps", "1"])
    assert out.read_bytes() == b"keep"
