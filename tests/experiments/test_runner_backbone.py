"""build_backbone: the data's image size reaches models that take it; CNNs without img_size still build."""
import torch

from mambacl.experiments import RunConfig, build_backbone


def test_cnn_without_img_size_builds_and_runs_on_the_data_shape():
    model = build_backbone(RunConfig(benchmark="split_digits", model="resnet18"), (1, 8, 8))
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, model.num_features)


def test_vision_mamba_gets_the_data_image_size():
    model = build_backbone(RunConfig(benchmark="split_digits", model="test_vim"), (1, 8, 8))
    assert model.patch_embed.img_size == (8, 8)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, model.num_features)
