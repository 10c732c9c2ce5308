"""Tests for autoprune.evaluate: adaptive BN, proxy/full fine-tuning, distillation, latency."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autoprune as ap
from autoprune import evaluate as ev
from autoprune import train as tr
from autoprune.data import LabeledTensors

SIZE = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on the shared 2-core box two threads ran this module 30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bundle() -> ap.data.DataBundle:
    return ap.data.load("digits", image_size=SIZE)


@pytest.fixture(scope="module")
def trained(bundle) -> nn.Module:
    """resnet20 trained for two short epochs on 8x8 digits (about 90% test accuracy)."""
    torch.manual_seed(0)
    model = ap.models.create("resnet20", num_classes=bundle.num_classes)
    tr.train(model, bundle, epochs=2, lr=0.1, batch_size=32, seed=0, device="cpu", progress=False)
    return model.eval()


@pytest.fixture(scope="module")
def pruned(trained) -> nn.Module:
    """``trained`` pruned to half its FLOPs: its BN running statistics are now wrong."""
    space = ap.Space(trained, torch.zeros(1, 3, SIZE, SIZE))
    widths = space.fit({u.name: 0.5 for u in space.units}, "flops<=50%")
    return ap.select(space, widths).apply(trained).eval()


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def train_mode_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The training objective on one batch (batch statistics), leaving ``model`` untouched."""
    with torch.no_grad():
        return F.cross_entropy(copy.deepcopy(model).train()(x), y).item()


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))


# --------------------------------------------------------------------------- adaptive BN


def test_adaptive_bn_recovers_accuracy_of_a_pruned_model(bundle, pruned) -> None:
    before = tr.accuracy(pruned, bundle.test)
    model = copy.deepcopy(pruned).train()
    momenta = [m.momentum for m in bn_layers(model)]
    out = ev.adaptive_bn(model, bundle, n_batches=20, batch_size=64)
    assert out is model and not model.training
    assert [m.momentum for m in bn_layers(model)] == momenta
    assert tr.accuracy(model, bundle.test) > before + 0.15


def test_adaptive_bn_running_stats_are_batch_averages_and_nothing_else_changes(bundle, pruned) -> None:
    model = copy.deepcopy(pruned)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, inp, name=name: seen.setdefault(name, [])
                                         .append(inp[0].detach().clone()))
             for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    ev.adaptive_bn(model, bundle.train, n_batches=5, batch_size=64, seed=1)
    for h in hooks:
        h.remove()
    assert len(seen) == len(bn_layers(model)) > 0
    for name, inputs in seen.items():
        bn = model.get_submodule(name)
        assert len(inputs) == 5 and all(len(x) == 64 for x in inputs)
        mean = torch.cat(inputs).double().mean(dim=(0, 2, 3))
        var = torch.stack([x.double().transpose(0, 1).flatten(1).var(dim=1) for x in inputs]).mean(0)
        torch.testing.assert_close(bn.running_mean.double(), mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(bn.running_var.double(), var, atol=1e-4, rtol=1e-4)
        assert int(bn.num_batches_tracked) == 5
    after = model.state_dict()
    bn_buffers = {f"{name}.{b}" for name in seen for b in ("running_mean", "running_var",
                                                            "num_batches_tracked")}
    for key, value in after.items():
        if key in bn_buffers:
            continue
        assert torch.equal(value, before[key]), f"{key} changed"
    assert any(not torch.equal(after[k], before[k]) for k in bn_buffers if k.endswith("running_mean"))
    assert all(p.grad is None for p in model.parameters())


def test_adaptive_bn_takes_batches_and_keeps_dropout_off() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    model = nn.Sequential(conv, nn.Dropout(0.5), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
    model[2].running_mean.fill_(7.0)
    batches = [torch.randn(16, 3, 6, 6) for _ in range(4)]
    ev.adaptive_bn(model, [(x, torch.zeros(16)) for x in batches] + [torch.randn(16, 3, 6, 6)],
                   n_batches=3)
    with torch.no_grad():
        out = [conv(x) for x in batches[:3]]
    mean = torch.cat(out).mean(dim=(0, 2, 3))
    var = torch.stack([o.transpose(0, 1).flatten(1).var(dim=1) for o in out]).mean(0)
    torch.testing.assert_close(model[2].running_mean, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(model[2].running_var, var, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- proxy fine-tuning


def test_proxy_finetune_lowers_the_loss_on_a_fixed_batch(bundle, pruned) -> None:
    x, y = bundle.train.images[:64], bundle.train.labels[:64]
    model = copy.deepcopy(pruned)
    before = train_mode_loss(model, x, y)
    result = ev.proxy_finetune(model, LabeledTensors(x, y), steps=10, lr=0.01, batch_size=64,
                               device="cpu")
    assert result["steps"] == 10 and 0 < result["loss"] < before
    assert train_mode_loss(model, x, y) < 0.8 * before


def test_proxy_finetune_raises_diverged_with_the_step(bundle, pruned) -> None:
    with pytest.raises(ev.Diverged) as info:
        ev.proxy_finetune(copy.deepcopy(pruned), bundle, steps=50, lr=1e6, device="cpu")
    assert isinstance(info.value, RuntimeError)
    assert 1 < info.value.step <= 50 and f"step {info.value.step}" in str(info.value)


def test_proxy_finetune_is_deterministic_given_the_seed(bundle, pruned) -> None:
    runs = [copy.deepcopy(pruned) for _ in range(3)]
    results = [ev.proxy_finetune(m, bundle, steps=6, batch_size=32, seed=s, device="cpu")
               for m, s in zip(runs, (1, 1, 2))]
    assert same_weights(runs[0], runs[1]) and results[0] == results[1]
    assert not same_weights(runs[0], runs[2])
    assert not same_weights(runs[0], pruned)


# --------------------------------------------------------------------------- distillation


def test_distillation_loss_matches_the_formula_computed_by_hand() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(8, 10, dtype=torch.float64), 3 * torch.randn(8, 10, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    alpha, temp, eps = 0.3, 3.0, 0.1
    p_t = torch.exp(t / temp) / torch.exp(t / temp).sum(1, keepdim=True)
    log_p_s = s / temp - torch.log(torch.exp(s / temp).sum(1, keepdim=True))
    kl = (p_t * (torch.log(p_t) - log_p_s)).sum(1).mean()
    log_q = s - torch.log(torch.exp(s).sum(1, keepdim=True))
    ce = (-(1 - eps) * log_q[torch.arange(8), y] - eps / 10 * log_q.sum(1)).mean()
    expected = alpha * temp ** 2 * kl + (1 - alpha) * ce
    got = ev.distillation_loss(s, t, y, alpha=alpha, temperature=temp, label_smoothing=eps)
    torch.testing.assert_close(got, expected)
    assert ev.distillation_loss(s, s.clone(), y, alpha=1.0).abs() < 1e-12


def test_finetune_distilling_from_an_identical_teacher_keeps_the_student(bundle, capsys) -> None:
    teacher = tiny_net().train()
    reference = copy.deepcopy(teacher)
    student = copy.deepcopy(teacher)
    x, y = bundle.train.images[:32], bundle.train.labels[:32]
    with torch.no_grad():
        assert ev.distillation_loss(student(x), teacher(x), y, alpha=1.0) < 1e-6
    history = ev.finetune(student, bundle, epochs=1, lr=0.05, batch_size=64, teacher=teacher,
                          kd_alpha=1.0, weight_decay=0.0, device="cpu", progress=True)
    assert "epoch 1/1" in capsys.readouterr().err
    assert set(history) == {"train_loss", "val_acc", "test_acc"}
    assert history["train_loss"][0] < 1e-6
    assert max((a - b).abs().max() for a, b in zip(student.parameters(), teacher.parameters())) < 1e-5
    assert same_weights(teacher, reference) and teacher.training
    ce_student = copy.deepcopy(reference)
    ev.finetune(ce_student, bundle, epochs=1, lr=0.05, batch_size=64, weight_decay=0.0,
                device="cpu", progress=False)
    assert max((a - b).abs().max() for a, b in zip(ce_student.parameters(),
                                                   reference.parameters())) > 1e-3


# --------------------------------------------------------------------------- latency, evaluate


def test_latency_reports_ordered_positive_times_and_threads() -> None:
    model = tiny_net().train()
    result = ev.latency(model, (3, SIZE, SIZE), batch_size=2, warmup=2, runs=9)
    assert 0 < result["p10_ms"] <= result["median_ms"] <= result["p90_ms"]
    assert result["threads"] == torch.get_num_threads() and result["device"] == "cpu"
    assert result["batch_size"] == 2 and result["runs"] == 9
    assert model.training and all(p.grad is None for p in model.parameters())
    threads = torch.get_num_threads()
    assert ev.latency(model, (3, SIZE, SIZE), warmup=0, runs=3, threads=1)["threads"] == 1
    assert torch.get_num_threads() == threads


def test_evaluate_summarises_accuracy_latency_and_fvcore_cost(bundle, pruned) -> None:
    summary = ev.evaluate(pruned, bundle, runs=3, warmup=1)
    cost = ap.fvcore_cost(pruned, torch.zeros(1, 3, SIZE, SIZE))
    assert summary["flops"] == cost.flops and summary["params"] == cost.params
    assert summary["accuracy"] == tr.accuracy(pruned, bundle.test)
    assert summary["latency_ms"] > 0
    assert ev.accuracy is tr.accuracy
