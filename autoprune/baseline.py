"""Trained baselines, cached: the dense model every pruning run starts from.

``prune``/``search``/``compare`` given a model name instead of a checkpoint train the
baseline once and reuse it, keyed by model, data settings, epochs, lr and seed.
The cache lives in ``$AUTOPRUNE_CACHE`` (default ``~/.cache/autoprune``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from torch import nn

from . import checkpoint, models
from .data import DataBundle
from .errors import DataError
from .train import train


def cache_dir() -> Path:
    return Path(os.environ.get("AUTOPRUNE_CACHE", Path.home() / ".cache" / "autoprune"))


def cached_baseline(name: str, data: DataBundle, epochs: int = 30, seed: int = 0, lr: float = 0.1,
                    progress: bool = True, directory: str | Path | None = None) -> tuple[nn.Module, dict]:
    """The trained ``name`` on ``data``: loaded from the cache, or trained and cached."""
    key = json.dumps({"model": name, "data": data.settings, "name": data.name, "epochs": epochs,
                      "seed": seed, "lr": lr}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    path = Path(directory or cache_dir()) / f"baseline-{name.replace('/', '_')}-{digest}.pt"
    if path.is_file():
        return checkpoint.load_baseline(path)
    import torch
    torch.manual_seed(seed)
    model = models.create(name, num_classes=data.num_classes)
    history = train(model, data, epochs=epochs, lr=lr, seed=seed, progress=progress)
    meta = {"accuracy": history["test_acc"], "data": data.settings | {"name": data.name},
            "input_shape": list(data.input_shape), "epochs": epochs, "seed": seed, "lr": lr}
    checkpoint.save_baseline(path, model.cpu(), **meta)
    return model, meta


def check_compatible(model: nn.Module, data: DataBundle, where: str) -> None:
    """DataError when the model's classifier does not match the dataset's classes."""
    arch = getattr(model, "autoprune_arch", None) or {}
    classes = arch.get("num_classes")
    if classes is not None and classes != data.num_classes:
        raise DataError(f"{where} has {classes} classes but {data.name} has {data.num_classes}; "
                        f"use a checkpoint trained on {data.name} or --model/--data to train one")
