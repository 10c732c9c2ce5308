"""Training and evaluating baselines: SGD (Nesterov momentum) with a per-step cosine LR.

>>> data = autoprune.data.load("digits", image_size=16)
>>> model = autoprune.models.create("resnet20", num_classes=data.num_classes)
>>> history = train(model, data, epochs=30)
>>> history["test_acc"] == accuracy(model, data.test)
True
"""

from __future__ import annotations

import math
import sys
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.data import Dataset

from .data import DataBundle, loader
from .errors import AutopruneError, OptionError, short


class TrainingError(AutopruneError, RuntimeError):
    """Training diverged (non-finite loss), usually because the learning rate is too high."""


MAX_LR = 1000.0
"""The largest learning rate accepted; far larger ones overflow float32 in the optimizer step."""


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_of(model: nn.Module) -> torch.device:
    """Where ``model``'s parameters are (the default device for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else default_device()


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, batch_size: int = 256,
             device: torch.device | str | None = None) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` in eval mode (NaN for an empty dataset).

    ``device=None`` evaluates where the model's parameters already are; the model's
    train/eval mode is restored afterwards.
    """
    device = torch.device(device) if device is not None else device_of(model)
    was_training = model.training
    model.to(device).eval()
    correct = total = 0
    try:
        for images, labels in loader(dataset, batch_size=batch_size):
            logits = model(images.to(device, non_blocking=True))
            correct += int((logits.argmax(dim=1).cpu() == labels).sum())
            total += len(labels)
    finally:
        model.train(was_training)
    return correct / total if total else math.nan


LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(label_smoothing: float = 0.0) -> LossFn:
    """The loss ``(model, images, labels) -> CE(model(images), labels)``."""
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    return lambda model, images, labels: criterion(model(images), labels)


def train(model: nn.Module, data: DataBundle, epochs: int, lr: float = 0.1, batch_size: int = 64,
          weight_decay: float = 5e-4, momentum: float = 0.9, seed: int = 0,
          label_smoothing: float = 0.0, device: torch.device | str | None = None,
          progress: bool = True) -> dict:
    """Train ``model`` in place on ``data.train``; returns its history.

    History: ``train_loss`` (mean per epoch), ``val_acc`` (per epoch) and
    ``test_acc`` (after the last epoch). ``seed`` fixes the shuffling order and any
    randomness inside the model, so equal arguments give equal weights (on the CPU).
    """
    return fit(model, data, epochs, cross_entropy(label_smoothing), lr=lr, batch_size=batch_size,
               weight_decay=weight_decay, momentum=momentum, seed=seed, device=device,
               progress=progress)


def fit(model: nn.Module, data: DataBundle, epochs: int, loss_fn: LossFn, lr: float,
        batch_size: int = 64, weight_decay: float = 5e-4, momentum: float = 0.9, seed: int = 0,
        device: torch.device | str | None = None, progress: bool = True) -> dict:
    """Epochs of :func:`sgd` minimising ``loss_fn(model, images, labels)``; history as :func:`train`."""
    if epochs < 1 or batch_size < 1 or not 0 < lr <= MAX_LR:
        raise OptionError(f"need epochs >= 1, batch_size >= 1 and 0 < lr <= {MAX_LR:g}, got "
                          f"epochs={short(epochs)}, batch_size={short(batch_size)}, lr={short(lr)}")
    torch.manual_seed(seed)
    device = torch.device(device) if device is not None else default_device()
    model.to(device)
    batches = loader(data.train, batch_size=batch_size, shuffle=True, seed=seed)
    optimizer, schedule = sgd(model, lr, epochs * len(batches), momentum, weight_decay)
    history: dict = {"train_loss": [], "val_acc": []}
    for epoch in range(epochs):
        bar = _bar(len(batches), f"epoch {epoch + 1}/{epochs}", progress)
        loss, _ = sgd_steps(model, batches, optimizer, schedule, loss_fn, device, bar,
                            diverged=_diverged_in(epoch))
        history["train_loss"].append(loss)
        history["val_acc"].append(accuracy(model, data.val, device=device))
        bar.set_postfix(loss=f"{loss:.4f}", val_acc=f"{history['val_acc'][-1]:.4f}")
        bar.close()
    history["test_acc"] = accuracy(model, data.test, device=device)
    return history


def sgd(model: nn.Module, lr: float, total_steps: int, momentum: float = 0.9,
        weight_decay: float = 5e-4) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD (Nesterov when ``momentum > 0``) and a cosine LR decaying to 0 over ``total_steps``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                                weight_decay=weight_decay, nesterov=momentum > 0)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))


def sgd_steps(model: nn.Module, batches: Iterable, optimizer: torch.optim.Optimizer,
              schedule: torch.optim.lr_scheduler.LRScheduler, loss_fn: LossFn,
              device: torch.device, bar=None,
              diverged: Callable[[int, float], Exception] | None = None) -> tuple[float, float]:
    """One optimizer + schedule step per ``(images, labels)`` batch in train mode.

    Returns the per-sample mean loss and the last batch's loss. A non-finite loss raises
    ``diverged(step, loss)`` (steps count from 1), by default a :class:`TrainingError`.
    """
    diverged = diverged or _diverged_in(None)
    model.train()
    total, count, last = 0.0, 0, math.nan
    for step, (images, labels) in enumerate(batches, start=1):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        loss = loss_fn(model, images, labels)
        last = loss.item()
        if not math.isfinite(last):
            raise diverged(step, last)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        total += last * len(labels)
        count += len(labels)
        if bar is not None:
            bar.set_postfix(loss=f"{total / count:.4f}", refresh=False)
            bar.update()
    return total / max(count, 1), last


def _diverged_in(epoch: int | None) -> Callable[[int, float], Exception]:
    where = f"epoch {epoch + 1}, " if epoch is not None else ""
    return lambda step, loss: TrainingError(
        f"training diverged: loss is {loss} at {where}step {step}; use a lower learning rate (--lr)")


def _bar(total: int, desc: str, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=not progress, leave=True,
                dynamic_ncols=True)
