"""Evaluating a (pruned) structure: adaptive BN, proxy and full fine-tuning, latency.

>>> small = plan.apply(model)
>>> adaptive_bn(small, data.train)                  # EagleEye: re-estimate BN statistics
>>> proxy_finetune(small, data, steps=200)          # a few hundred SGD steps
>>> finetune(small, data, epochs=30, teacher=model) # full fine-tune with distillation
>>> evaluate(small, data)                           # accuracy, latency_ms, flops, params

Training shares the SGD + per-step cosine loop of :mod:`autoprune.train`.
"""

from __future__ import annotations

import itertools
import time
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .cost import fvcore_cost
from .data import DataBundle, loader
from .errors import DataError, OptionError, short
from .layers import BATCH_NORM_TYPES
from .train import LossFn, accuracy, cross_entropy, default_device, device_of, fit, sgd, sgd_steps

__all__ = ["Diverged", "accuracy", "adaptive_bn", "distillation_loss", "evaluate", "finetune",
           "latency", "proxy_finetune"]

Device = torch.device | str | None


class Diverged(RuntimeError):
    """Proxy fine-tuning hit a non-finite loss at ``step`` (1-based); the trial has failed."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"proxy fine-tuning diverged: loss is {loss} at step {step}")
        self.step, self.loss = step, loss


# --------------------------------------------------------------------------- adaptive BN


def adaptive_bn(model: nn.Module, batches_or_dataset: DataBundle | Dataset | Iterable,
                n_batches: int = 50, batch_size: int = 64, seed: int = 0,
                device: Device = None) -> nn.Module:
    """EagleEye's adaptive BN: re-estimate every BN layer's running statistics in place.

    Running stats are reset and re-accumulated as a cumulative (equal-weight) average over
    ``n_batches`` batches (``momentum=None``), with no gradients; only BN layers run in
    train mode, so dropout stays off as at evaluation time. Batches come from a dataset
    (a DataBundle's ``train`` split; shuffled by ``seed``, repeated if it is shorter, full
    batches only) or from an iterable of ``images`` or ``(images, labels)``. Returns
    ``model`` in eval mode. ``device=None`` runs where the model's parameters are.
    """
    if n_batches < 1:
        raise OptionError(f"n_batches must be an integer >= 1, got {short(n_batches)}")
    device = torch.device(device) if device is not None else device_of(model)
    norms = [m for m in model.modules()
             if isinstance(m, BATCH_NORM_TYPES) and m.track_running_stats]
    momenta = [m.momentum for m in norms]
    model.to(device).eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        with torch.no_grad():
            for batch in itertools.islice(_batches(batches_or_dataset, batch_size, seed), n_batches):
                images = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(images.to(device, non_blocking=True))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return model


def _batches(source: DataBundle | Dataset | Iterable, batch_size: int, seed: int) -> Iterable:
    """Batches from a bundle/dataset (shuffled, repeated forever) or the iterable itself."""
    if isinstance(source, DataBundle):
        source = source.train
    if isinstance(source, Dataset):
        return training_batches(source, batch_size, seed)
    return source


def training_batches(dataset: Dataset, batch_size: int, seed: int) -> Iterator:
    """Shuffled full batches of ``dataset``, repeated forever (a new shuffle each pass): the
    stream :func:`proxy_finetune` trains on (the search's chunked fine-tune reads the same)."""
    return _repeat(_shuffled(dataset, batch_size, seed))


def _shuffled(dataset: Dataset, batch_size: int, seed: int):
    """A shuffled loader of full batches (a short last batch only if there is no full one)."""
    if batch_size < 1:
        raise OptionError(f"batch_size must be an integer >= 1, got {short(batch_size)}")
    if len(dataset) == 0:
        raise DataError("the dataset is empty; need at least one sample")
    return loader(dataset, batch_size=batch_size, shuffle=True, seed=seed,
                  drop_last=len(dataset) >= batch_size)


def _repeat(batches: Iterable) -> Iterator:
    """Pass over ``batches`` again and again (a new shuffle each pass)."""
    while True:
        yield from batches


# --------------------------------------------------------------------------- fine-tuning


def proxy_finetune(model: nn.Module, data: DataBundle | Dataset, steps: int = 200, lr: float = 0.01,
                   batch_size: int = 64, seed: int = 0, device: Device = None,
                   momentum: float = 0.9, weight_decay: float = 5e-4) -> dict:
    """``steps`` SGD steps (cosine LR over the steps) on ``data.train``, in place.

    Returns ``{"loss": last batch's loss, "steps": steps}``; a non-finite loss raises
    :class:`Diverged` so a search can mark the trial failed. Equal seeds give equal
    weights (on the CPU). ``device=None`` means CUDA when available.
    """
    if steps < 1 or lr <= 0:
        raise OptionError(f"need steps >= 1 and lr > 0, got steps={short(steps)}, lr={short(lr)}")
    dataset = data.train if isinstance(data, DataBundle) else data
    torch.manual_seed(seed)
    device = torch.device(device) if device is not None else default_device()
    model.to(device)
    batches = itertools.islice(training_batches(dataset, batch_size, seed), steps)
    optimizer, schedule = sgd(model, lr, steps, momentum, weight_decay)
    _, last = sgd_steps(model, batches, optimizer, schedule, cross_entropy(), device,
                        diverged=Diverged)
    return {"loss": last, "steps": steps}


def finetune(model: nn.Module, data: DataBundle, epochs: int, lr: float = 0.01, batch_size: int = 64,
             seed: int = 0, label_smoothing: float = 0.0, teacher: nn.Module | None = None,
             kd_alpha: float = 0.5, kd_temperature: float = 4.0, device: Device = None,
             progress: bool = True, momentum: float = 0.9, weight_decay: float = 5e-4) -> dict:
    """Fully fine-tune ``model`` in place (SGD momentum, per-step cosine LR); history as ``train``.

    With a ``teacher`` (normally the dense model) the loss is knowledge distillation,
    ``kd_alpha * T² * KL(teacher/T ‖ student/T) + (1 - kd_alpha) * CE`` (see
    :func:`distillation_loss`): our reconstruction of DI's "structure distillation"
    (METHODS.md §1), in which the pruned network learns to reproduce the dense one. The
    teacher is moved to ``device``, runs in eval mode without gradients and is otherwise left
    unchanged.
    """
    if teacher is None:
        loss_fn = cross_entropy(label_smoothing)
    else:
        if not 0.0 <= kd_alpha <= 1.0 or kd_temperature <= 0:
            raise OptionError(f"need 0 <= kd_alpha <= 1 and kd_temperature > 0, got "
                              f"kd_alpha={short(kd_alpha)}, kd_temperature={short(kd_temperature)}")
        loss_fn = _distill(teacher, kd_alpha, kd_temperature, label_smoothing)
    device = torch.device(device) if device is not None else default_device()
    was_training = teacher.training if teacher is not None else False
    if teacher is not None:
        teacher.to(device).eval()
    try:
        return fit(model, data, epochs, loss_fn, lr=lr, batch_size=batch_size,
                   weight_decay=weight_decay, momentum=momentum, seed=seed, device=device,
                   progress=progress)
    finally:
        if teacher is not None:
            teacher.train(was_training)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor, alpha: float = 0.5, temperature: float = 4.0,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """Hinton's KD loss: ``alpha * T² * KL(softmax(t/T) ‖ softmax(s/T)) + (1-alpha) * CE(s, y)``.

    The KL is averaged over the batch; T² keeps its gradients on the CE's scale.
    """
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True)
    ce = F.cross_entropy(student_logits, labels, label_smoothing=label_smoothing)
    return alpha * t * t * kl + (1.0 - alpha) * ce


def _distill(teacher: nn.Module, alpha: float, temperature: float, label_smoothing: float) -> LossFn:
    """The loss ``(student, images, labels) -> distillation_loss(...)`` against ``teacher``."""
    def loss_fn(student: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = teacher(images)
        return distillation_loss(student(images), target, labels, alpha, temperature, label_smoothing)
    return loss_fn


# --------------------------------------------------------------------------- latency, summary


def latency(model: nn.Module, input_shape: tuple[int, ...], batch_size: int = 1, warmup: int = 5,
            runs: int = 30, device: Device = None, threads: int | None = None) -> dict:
    """Wall-clock forward latency of ``model`` on zeros of shape ``(batch_size, *input_shape)``.

    Eval mode, no gradients, ``warmup`` untimed passes, then ``runs`` timed ones (CUDA is
    synchronised around each). ``threads`` sets torch's CPU threads for the measurement
    only. Returns ``median_ms``, ``p10_ms``, ``p90_ms``, ``mean_ms`` plus ``batch_size``,
    ``runs``, ``warmup``, ``threads`` and ``device``. The model's mode is restored.
    """
    if runs < 1 or warmup < 0 or batch_size < 1:
        raise OptionError(f"need runs >= 1, warmup >= 0 and batch_size >= 1, got "
                          f"runs={short(runs)}, warmup={short(warmup)}, batch_size={short(batch_size)}")
    device = torch.device(device) if device is not None else device_of(model)
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    was_training = model.training
    model.to(device).eval()
    x = torch.zeros((batch_size, *input_shape), device=device)
    try:
        times = _timed_passes(model, x, warmup, runs)
        used = torch.get_num_threads()
    finally:
        model.train(was_training)
        torch.set_num_threads(old_threads)
    p10, p50, p90 = np.percentile(times, [10, 50, 90])
    return {"median_ms": float(p50), "p10_ms": float(p10), "p90_ms": float(p90),
            "mean_ms": float(np.mean(times)), "batch_size": batch_size, "runs": runs,
            "warmup": warmup, "threads": used, "device": str(device)}


@torch.no_grad()
def _timed_passes(model: nn.Module, x: torch.Tensor, warmup: int, runs: int) -> list[float]:
    """Milliseconds of each of ``runs`` forward passes after ``warmup`` untimed ones."""
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(runs):
        sync()
        start = time.perf_counter()
        model(x)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def evaluate(model: nn.Module, data: DataBundle, input_shape: tuple[int, ...] | None = None,
             latency_batch: int = 1, split: str = "test", device: Device = None, **latency_kw: Any) -> dict:
    """``flops`` and ``params`` (fvcore), ``accuracy`` (on ``data.<split>``), median
    ``latency_ms`` and the full ``latency`` measurement (:func:`latency`).

    FLOPs are counted for one input of ``input_shape`` (default ``data.input_shape``).
    ``device=None`` measures where the model's parameters are.
    """
    shape = tuple(input_shape if input_shape is not None else data.input_shape)
    device = torch.device(device) if device is not None else device_of(model)
    cost = fvcore_cost(model, torch.zeros((1, *shape), device=device))
    timing = latency(model, shape, batch_size=latency_batch, device=device, **latency_kw)
    return {"flops": cost.flops, "params": cost.params,
            "accuracy": accuracy(model, getattr(data, split), device=device),
            "latency_ms": timing["median_ms"], "latency": timing}
