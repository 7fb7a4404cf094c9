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


def test_a_timm_cnn_loads_a_local_pretrained_file(tmp_path):
    import timm
    source = timm.create_model("resnet18", num_classes=1000)  # the torchvision/timm layout, with its classifier
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model = build_backbone(RunConfig(benchmark="split_cifar100", model="resnet18",
                                     pretrained=str(tmp_path / "resnet18.pth")), (3, 32, 32))
    assert model.pretrained_source == str(tmp_path / "resnet18.pth") and model.num_classes == 0
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, source.state_dict()[name], msg=name)


def test_a_mambacl_backbone_records_its_pretrained_file(tmp_path):
    import timm
    source = timm.create_model("test_vim", img_size=8, patch_size=2, in_chans=1, num_classes=0)
    torch.save(source.state_dict(), tmp_path / "vim.pth")
    model = build_backbone(RunConfig(pretrained=str(tmp_path / "vim.pth")), (1, 8, 8))
    assert model.pretrained_source == str(tmp_path / "vim.pth")
    torch.testing.assert_close(model.pos_embed, source.pos_embed)
