"""Tests for autoprune.models: CIFAR architectures, the name registry and arch round-trips."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision
from torch import nn

from autoprune import models
from autoprune.errors import ModelError


def expected_resnet_params(depth: int, num_classes: int = 10, in_channels: int = 3) -> int:
    """Parameter count of a CIFAR ResNet with projection shortcuts, from layer shapes."""
    n = (depth - 2) // 6

    def conv(cin: int, cout: int, k: int) -> int:
        return cin * cout * k * k

    def bn(c: int) -> int:
        return 2 * c

    total = conv(in_channels, 16, 3) + bn(16)
    cin = 16
    for width in (16, 32, 64):
        for _ in range(n):
            total += conv(cin, width, 3) + bn(width) + conv(width, width, 3) + bn(width)
            if cin != width:
                total += conv(cin, width, 1) + bn(width)
            cin = width
    return total + 64 * num_classes + num_classes


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("depth", [20, 32, 56, 110])
def test_resnet_param_count_matches_layer_formula(depth: int) -> None:
    model = models.create(f"resnet{depth}", num_classes=10)
    assert n_params(model) == expected_resnet_params(depth)


def test_resnet56_matches_published_count_plus_projections() -> None:
    # Option A ResNet-56 has 853,018 parameters; two projections add 16*32+64 + 32*64+128.
    assert n_params(models.create("resnet56")) == 853_018 + (16 * 32 + 64) + (32 * 64 + 128)
    small = models.create("resnet20", num_classes=100, in_channels=1)
    assert n_params(small) == expected_resnet_params(20, 100, 1)


def test_resnet_structure_projection_only_at_downsampling() -> None:
    model = models.create("resnet20")
    blocks = [b for layer in (model.layer1, model.layer2, model.layer3) for b in layer]
    projections = [i for i, b in enumerate(blocks) if not isinstance(b.shortcut, nn.Identity)]
    assert projections == [3, 6]
    for i in projections:
        conv, bn = blocks[i].shortcut
        assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (2, 2)
        assert isinstance(bn, nn.BatchNorm2d)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 1 + 2 * len(blocks)
    assert len({id(m) for m in relus}) == len(relus), "ReLU modules must not be shared"
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    assert isinstance(model.flatten, nn.Flatten)
    assert isinstance(model.fc, nn.Linear) and model.fc.in_features == 64


def test_kaiming_init_scale() -> None:
    torch.manual_seed(0)
    conv = models.create("resnet56").layer3[1].conv1  # 64 -> 64, 3x3: fan_out = 576
    assert conv.weight.std().item() == pytest.approx((2 / 576) ** 0.5, rel=0.05)


@pytest.mark.parametrize("name", ["resnet20", "vgg16_bn"])
@pytest.mark.parametrize("size", [8, 16, 32])
def test_cifar_output_shapes(name: str, size: int) -> None:
    model = models.create(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)


def test_vgg16_bn_layout() -> None:
    model = models.create("vgg16_bn", num_classes=10)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    pools = [m for m in model.features if isinstance(m, nn.MaxPool2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert len(pools) == 5 and all(p.ceil_mode for p in pools)
    assert isinstance(model.avgpool, nn.AdaptiveAvgPool2d)
    kinds = [type(m) for m in model.classifier]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (model.classifier[0].in_features, model.classifier[3].out_features) == (512, 10)


@pytest.mark.parametrize(
    "name, kwargs",
    [("resnet20", {"in_channels": 1}), ("vgg16_bn", {}), ("resnet18", {}), ("googlenet", {})],
)
def test_arch_roundtrip_rebuilds_same_state_dict(name: str, kwargs: dict) -> None:
    model = models.create(name, num_classes=5, **kwargs)
    arch = json.loads(json.dumps(models.arch_of(model)))  # must survive JSON
    assert arch["name"] == name and arch["num_classes"] == 5
    rebuilt = models.create(**arch)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    rebuilt.load_state_dict(model.state_dict())
    assert models.arch_of(copy.deepcopy(model)) == models.arch_of(model)


def test_arch_of_returns_a_copy_and_rejects_foreign_models() -> None:
    model = models.create("resnet20")
    models.arch_of(model)["kwargs"]["in_channels"] = 99
    assert models.arch_of(model)["kwargs"] == {}
    with pytest.raises(ModelError, match="create"):
        models.arch_of(nn.Linear(2, 2))


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(ModelError) as info:
        models.create("resnet65")
    message = str(info.value)
    assert "'resnet56'" in message and "available()" in message


def test_bad_kwargs_name_model_and_argument() -> None:
    with pytest.raises(ModelError, match=r"'resnet56'.*'widht'.*in_channels"):
        models.create("resnet56", widht=2)
    with pytest.raises(ModelError, match=r"'resnet18'.*'bogus'"):
        models.create("resnet18", bogus=1)
    with pytest.raises(ModelError, match="JSON"):
        models.create("resnet20", in_channels=object())
    with pytest.raises(ModelError, match="weights"):
        models.create("resnet18", weights="DEFAULT")
    with pytest.raises(ModelError, match="num_classes"):
        models.create("resnet20", num_classes=0)


def test_torchvision_model_class_and_classes() -> None:
    model = models.create("mobilenet_v2", num_classes=3).eval()
    assert isinstance(model, torchvision.models.MobileNetV2)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert isinstance(models.create("torchvision/resnet18", num_classes=4), torchvision.models.ResNet)


def test_googlenet_and_inception_have_no_aux_heads() -> None:
    net = models.create("googlenet", num_classes=4).train()
    assert net.aux1 is None and net.aux2 is None
    out = net(torch.randn(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 4)
    assert models.create("inception_v3", num_classes=4).AuxLogits is None
    aux = models.create("googlenet", num_classes=4, aux_logits=True)
    assert aux.aux1 is not None and models.arch_of(aux)["kwargs"]["aux_logits"] is True


def test_available_lists_cifar_torchvision_and_shadowed_names() -> None:
    names = models.available()
    assert len(names) == len(set(names))
    assert names[:5] == ["resnet20", "resnet32", "resnet56", "resnet110", "vgg16_bn"]
    assert "resnet18" in names and "vit_b_16" in names
    assert "torchvision/vgg16_bn" in names and "torchvision/resnet18" not in names
    tv = set(torchvision.models.list_models(module=torchvision.models))
    assert tv - {"vgg16_bn"} <= set(names)


def test_shadowed_name_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(models.create("vgg16_bn"), models.CifarVGG)
    calls = []

    def fake_get_model(name: str, **config: object) -> nn.Module:
        calls.append((name, config))
        return nn.Linear(1, 1)

    monkeypatch.setattr(torchvision.models, "get_model", fake_get_model)
    model = models.create("torchvision/vgg16_bn", num_classes=6)
    assert calls == [("vgg16_bn", {"weights": None, "num_classes": 6})]
    assert models.arch_of(model)["name"] == "torchvision/vgg16_bn"
