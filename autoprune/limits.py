"""Sizes refused before anything is allocated: fixed caps, and memory estimates.

An image side above ``MAX_IMAGE_SIZE``, more input channels than ``MAX_CHANNELS`` or
more classes than ``MAX_CLASSES`` is refused outright; below the caps, the bytes a step
needs (a dataset held in memory, a model's parameters, one forward pass's activations,
measured on the ``meta`` device, so for free) are compared with the memory free now.
Either way the user gets one :class:`~autoprune.errors.SizeError` line naming the cap or
the estimate, instead of an allocator's traceback, possibly after hours of work.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .errors import SizeError, short

MAX_IMAGE_SIZE = 4096
MAX_CHANNELS = 4096
MAX_CLASSES = 100_000
SMALL_INPUT = 512 * 512


def human_bytes(n: float) -> str:
    for suffix, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {suffix}"
    return f"{int(n)} B"


def available_memory(device: torch.device | str | None = None) -> int | None:
    """Bytes free now on ``device`` (CUDA: free device memory; CPU: MemAvailable, within
    any cgroup limit); None when unknown (then nothing is refused for lack of memory)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError):  # pragma: no cover - no usable CUDA
            return None
    if device.type != "cpu":
        return None
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = None
    try:  # a container's own limit (cgroup v2), when it is lower
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            left = max(int(limit) - used, 0)
            free = left if free is None else min(free, left)
    except (OSError, ValueError):
        pass
    return free


def check_fits(nbytes: float, what: str, hint: str, device: torch.device | str | None = None) -> None:
    """SizeError when ``what`` needs more than the memory free on ``device``."""
    free = available_memory(device)
    if free is not None and nbytes > free:
        where = f"{torch.device(device).type.upper()} " if device is not None else ""
        raise SizeError(f"{what} needs about {human_bytes(nbytes)}, more than the "
                        f"{human_bytes(free)} of {where}memory free; {hint}")


def check_image_size(size: object, what: str = "image size") -> int:
    """``size`` as an int in [1, MAX_IMAGE_SIZE]; SizeError (a ValueError) if not."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE:
        raise SizeError(f"{what} must be an integer from 1 to {MAX_IMAGE_SIZE}, got {short(size)}")
    return size


def check_input_shape(shape: object, what: str = "input shape") -> tuple[int, int, int]:
    """``shape`` as [C, H, W] with 1 <= C <= MAX_CHANNELS and 1 <= H, W <= MAX_IMAGE_SIZE."""
    ok = isinstance(shape, (list, tuple)) and len(shape) == 3 and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in shape)
    if not ok or shape[0] > MAX_CHANNELS or max(shape[1:]) > MAX_IMAGE_SIZE:
        raise SizeError(f"{what} must be [C, H, W] with C from 1 to {MAX_CHANNELS} and H, W from 1 "
                        f"to {MAX_IMAGE_SIZE}, got {short(shape)}")
    return tuple(shape)


def forward_bytes(model: nn.Module, shape: Sequence[int]) -> int | None:
    """Bytes of every leaf module's output for one input of ``shape`` (batch 1), measured
    by running ``model`` on the ``meta`` device (no memory, no compute); None if it cannot.

    Parameters and buffers are swapped for meta stand-ins for the pass and put back after.
    """
    total, swapped, hooks = 0, [], []

    def count(module, inputs, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    was_training = model.training
    try:
        for module in model.modules():
            for name, p in list(module.named_parameters(recurse=False)):
                swapped.append((module, name, p))
                setattr(module, name, nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad))
            for name, b in list(module.named_buffers(recurse=False)):
                swapped.append((module, name, b))
                setattr(module, name, torch.empty_like(b, device="meta"))
            if next(module.children(), None) is None:
                hooks.append(module.register_forward_hook(count))
        with torch.no_grad():
            model.eval()(torch.empty(1, *shape, device="meta"))
    except Exception:  # noqa: BLE001 - an op without a meta kernel: no estimate, no refusal
        return None
    finally:
        for h in hooks:
            h.remove()
        for module, name, t in reversed(swapped):
            setattr(module, name, t)
        model.train(was_training)
    return total


def check_forward(model: nn.Module, shape: Sequence[int], name: str, batch_size: int = 1,
                  training: bool = False, device: torch.device | str | None = None,
                  hint: str = "use a smaller --image-size / --input-size") -> None:
    """SizeError unless ``batch_size`` inputs of ``shape`` (with gradients when ``training``:
    every activation kept for the backward pass, and its gradient) fit in memory.

    One image of at most ``SMALL_INPUT`` pixels is never refused (nor measured: the first
    meta-device pass imports parts of torch that take seconds to load).
    """
    if batch_size == 1 and not training and int(torch.Size(shape[1:]).numel()) <= SMALL_INPUT:
        return
    per_sample = forward_bytes(model, shape) or 0  # None: no estimate, the input itself still counts
    inputs = 4 * int(torch.Size(shape).numel())
    need = batch_size * (inputs + per_sample * (2 if training else 1))
    what = (f"{'training' if training else 'a forward pass of'} {name} on {batch_size} "
            f"input(s) of {'x'.join(map(str, shape))}")
    check_fits(need, what, hint, device)
