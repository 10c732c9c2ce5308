"""Diverse group layers: SG-CNN's grouped conv and linear as real smaller computations.

Output unit ``i`` of a layer belongs to group ``g = groups[i]``; group ``g`` reads only its
sorted input channels ``S_g = inputs[g]``. Per group the inputs ``S_g`` are gathered and one
conv (or matmul) with that group's weight slice ``[|G_g|, |S_g|, ...]`` runs; the outputs are
concatenated and put back in the original unit order. A conv costs
``Σ_g |S_g|·|G_g|·kh·kw·H·W`` multiply-adds per image, a linear ``Σ_g |S_g|·|G_g|`` per row:
exactly what fvcore counts when it traces the module (gathers and concatenations are free).

That per-group computation is what runs in eval mode: FLOP counts (:mod:`autoprune.cost`
traces in eval mode), latency, validation and test. In training mode the same function runs
as one dense conv (or matmul) whose weight is assembled, differentiably, from the per-group
weights with zeros elsewhere (``W[i, j] = 0`` for ``j ∉ S_{g(i)}``): on the CPU many small
convs plus gathers are several times slower per step than one large GEMM
(``benchmarks/selfgroup.py``, its training-step table), and the gradients reach exactly the per-group
parameters, so training is the same mathematically (only floating-point summation order
differs). The parameters stay the small per-group tensors either way. With few groups and
large feature maps the per-group computation can be the faster one to train (the benchmark:
k=4 on 64 channels at 32×32); ``layer.dense_training = False`` makes a layer train that way.

:mod:`autoprune.selfgroup` decides the groups (SG-CNN's importance vectors, k-means and
connection threshold); this module only runs a given grouping.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ModelError

__all__ = ["DiverseGroupConv", "DiverseGroupLayer", "DiverseGroupLinear", "check_entry", "pad_amounts", "pair"]


def pair(v) -> tuple[int, int]:
    """``v`` as ``(int, int)``: an int repeated, or the first two of a sequence."""
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def pad_amounts(kernel: tuple[int, int], padding, dilation: tuple[int, int]) -> tuple[int, ...]:
    """``F.pad`` amounts (left, right, top, bottom) of a conv's ``padding``: an (h, w) pair,
    ``"valid"`` or ``"same"`` (the extra pixel of an odd total on the right/bottom, as
    ``nn.Conv2d`` pads)."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        out: list[int] = []
        for d, k in zip(reversed(dilation), reversed(kernel)):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    ph, pw = pair(padding)
    return (pw, pw, ph, ph)


def check_entry(groups: list[int], inputs: list[list[int]], in_channels: int,
                out_channels: int, where: str = "") -> None:
    """ModelError unless ``groups``/``inputs`` describe a valid grouping of the layer."""
    at = f"{where}: " if where else ""
    if len(groups) != out_channels:
        raise ModelError(f"{at}self-grouping lists {len(groups)} filters but the layer has "
                         f"{out_channels} output channels")
    n = len(inputs)
    if n == 0:
        raise ModelError(f"{at}self-grouping has no groups")
    bad = [g for g in groups if not 0 <= g < n]
    if bad:
        raise ModelError(f"{at}filter group {bad[0]} outside 0..{n - 1} "
                         f"(the spec has {n} input sets)")
    empty = sorted(set(range(n)) - set(groups))
    if empty:
        raise ModelError(f"{at}self-grouping group {empty[0]} has no filters")
    for g, s in enumerate(inputs):
        if not s:
            raise ModelError(f"{at}self-grouping group {g} reads no input channel")
        if list(s) != sorted(set(s)) or not 0 <= s[0] <= s[-1] < in_channels:
            raise ModelError(f"{at}self-grouping group {g}: inputs must be sorted distinct "
                             f"indices in 0..{in_channels - 1}")


class DiverseGroupLayer(nn.Module):
    """What the grouped conv and linear share: the grouping, per-group parameters
    ``weight_{g}`` (``[|G_g|, |S_g|, *kernel]``, rows in increasing unit order) and, with
    ``bias``, ``bias_{g}``; gather → per-group op → concatenate → un-permute.

    The index tensors are non-persistent buffers (the spec, not the state_dict, carries
    the structure). Subclasses call :meth:`setup_groups` and run :meth:`grouped`.
    """

    #: train mode runs one dense op on the masked weight (module docstring); False: per group
    dense_training: bool = True

    def setup_groups(self, n_in: int, n_out: int, kernel: tuple[int, ...], groups: Iterable[int],
                     inputs: Iterable[Iterable[int]], bias: bool, device=None, dtype=None) -> None:
        groups = [int(g) for g in groups]
        inputs = [[int(j) for j in s] for s in inputs]
        check_entry(groups, inputs, n_in, n_out)
        self.group_of = groups
        self.inputs = inputs
        self.members = [[i for i, g in enumerate(groups) if g == k] for k in range(len(inputs))]
        self.num_groups = len(inputs)
        self.has_bias = bool(bias)
        kw = {"device": device, "dtype": dtype}
        for g in range(self.num_groups):
            w = torch.empty(len(self.members[g]), len(inputs[g]), *kernel, **kw)
            self.register_parameter(f"weight_{g}", nn.Parameter(w))
            if self.has_bias:
                self.register_parameter(f"bias_{g}", nn.Parameter(torch.empty(len(self.members[g]), **kw)))
            self.register_buffer(f"index_{g}", torch.tensor(inputs[g], dtype=torch.long,
                                                            device=device), persistent=False)
        # for the training path: where each entry of the concatenated, flattened per-group
        # weights sits in the flattened dense [n_out, n_in] weight (row-major, per group)
        flat = [r * n_in + c for m, s in zip(self.members, inputs) for r in m for c in s]
        self.register_buffer("dense_index", torch.tensor(flat, dtype=torch.long, device=device),
                             persistent=False)
        perm = [i for m in self.members for i in m]
        inverse = [0] * n_out
        for pos, i in enumerate(perm):
            inverse[i] = pos
        self.register_buffer("inverse", torch.tensor(inverse, dtype=torch.long, device=device),
                             persistent=False)
        self.full = [len(s) == n_in for s in inputs]
        self.identity = perm == list(range(n_out))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Per group, the initialisation ``nn.Conv2d``/``nn.Linear`` use (Kaiming-uniform, a=√5)."""
        for g in range(self.num_groups):
            w = getattr(self, f"weight_{g}")
            nn.init.kaiming_uniform_(w, a=5 ** 0.5)
            if self.has_bias:
                bound = 1 / w[0].numel() ** 0.5
                nn.init.uniform_(getattr(self, f"bias_{g}"), -bound, bound)

    def copy_dense(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Take each group's slice ``W[G_g][:, S_g]`` (and ``b[G_g]``) of a dense layer."""
        with torch.no_grad():
            for g in range(self.num_groups):
                rows = torch.tensor(self.members[g], dtype=torch.long, device=weight.device)
                cols = getattr(self, f"index_{g}")
                getattr(self, f"weight_{g}").copy_(weight.index_select(0, rows).index_select(1, cols))
                if bias is not None:
                    getattr(self, f"bias_{g}").copy_(bias.index_select(0, rows))

    def masked_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The masked dense weight (``W[i, j] = 0`` for ``j ∉ S_{g(i)}``) and bias, built
        differentiably from the per-group parameters (their gradients flow back through it)."""
        ws = [getattr(self, f"weight_{g}") for g in range(self.num_groups)]
        kernel = ws[0].shape[2:]
        values = torch.cat([w.reshape(-1, *kernel) for w in ws])
        weight = values.new_zeros(len(self.group_of) * self.n_in, *kernel) \
            .index_copy(0, self.dense_index, values).view(len(self.group_of), self.n_in, *kernel)
        bias = None
        if self.has_bias:
            bias = torch.cat([getattr(self, f"bias_{g}") for g in range(self.num_groups)])
            bias = bias if self.identity else bias.index_select(0, self.inverse)
        return weight, bias

    def dense_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The masked dense weight (``W[i, j] = 0`` for ``j ∉ S_{g(i)}``) and bias, detached."""
        with torch.no_grad():
            weight, bias = self.masked_weight()
        return weight, bias

    @property
    def n_in(self) -> int:
        raise NotImplementedError

    def connections(self) -> int:
        """``Σ_g |S_g|·|G_g|``: kept (input, output) pairs."""
        return sum(len(s) * len(m) for s, m in zip(self.inputs, self.members))

    def spec_entry(self) -> dict:
        """This module's grouping as a JSON-able spec entry."""
        return {"groups": list(self.group_of), "inputs": [list(s) for s in self.inputs]}

    def grouped(self, x: torch.Tensor, dim: int,
                op: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]) -> torch.Tensor:
        """Per group ``op(x[S_g along dim], weight_g, bias_g)``, concatenated along ``dim`` and
        put back in the original unit order."""
        outs = []
        for g in range(self.num_groups):
            xg = x if self.full[g] else x.index_select(dim, getattr(self, f"index_{g}"))
            bias = getattr(self, f"bias_{g}") if self.has_bias else None
            outs.append(op(xg, getattr(self, f"weight_{g}"), bias))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim)
        return y if self.identity else y.index_select(dim, self.inverse)


class DiverseGroupConv(DiverseGroupLayer):
    """A conv whose filter groups each read their own subset of input channels.

    ``groups[i]`` is the group of filter ``i`` (original filter order) and
    ``inputs[g]`` the sorted input channels group ``g`` reads; parameters and buffers as
    :class:`DiverseGroupLayer` says (``weight_{g}``: ``[|G_g|, |S_g|, kh, kw]``). Stride,
    padding (including string and non-zero padding modes) and dilation mean what they
    mean for ``nn.Conv2d``.

    Build one from a dense conv with :meth:`from_conv`; the plain constructor
    initialises each group's weights the way ``nn.Conv2d`` does.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, groups: Iterable[int],
                 inputs: Iterable[Iterable[int]], stride=1, padding=0, dilation=1,
                 bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = pair(kernel_size)
        self.stride = pair(stride)
        self.dilation = pair(dilation)
        self.padding = padding if isinstance(padding, str) else pair(padding)
        self.padding_mode = padding_mode
        # Non-zero padding modes: pad once up front, then convolve without padding
        # (what nn.Conv2d does); the dense conv's pad amounts are reproduced exactly.
        self.pad_amounts = None if padding_mode == "zeros" else \
            pad_amounts(self.kernel_size, self.padding, self.dilation)
        self.setup_groups(self.in_channels, self.out_channels, self.kernel_size, groups, inputs,
                          bias, device, dtype)

    @property
    def n_in(self) -> int:
        return self.in_channels

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, groups: Iterable[int],
                  inputs: Iterable[Iterable[int]]) -> "DiverseGroupConv":
        """The grouped conv keeping ``conv``'s weights ``W[G_g][:, S_g]`` (and biases)."""
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
            raise ModelError(f"self-grouping needs a dense nn.Conv2d (groups=1), got "
                             f"{type(conv).__name__}" + (f" with groups={conv.groups}"
                                                         if isinstance(conv, nn.Conv2d) else ""))
        w = conv.weight
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, groups, inputs,
                  stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                  bias=conv.bias is not None, padding_mode=conv.padding_mode,
                  device=w.device, dtype=w.dtype)
        new.copy_dense(w, conv.bias)
        new.train(conv.training)
        return new

    def to_dense(self) -> nn.Conv2d:
        """The equivalent masked dense conv: ``W[i, j] = 0`` for ``j ∉ S_{g(i)}``."""
        weight, bias = self.dense_weight()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, bias=self.has_bias,
                         padding_mode=self.padding_mode, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        return conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = self.padding
        if self.pad_amounts is not None:
            x = F.pad(x, self.pad_amounts, mode=self.padding_mode)
            padding = 0
        if self.training and self.dense_training:  # the same function as one dense conv
            return F.conv2d(x, *self.masked_weight(), self.stride, padding, self.dilation)
        return self.grouped(x, 1, lambda xg, w, b: F.conv2d(xg, w, b, self.stride, padding, self.dilation))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.num_groups}, "
                f"connections={self.connections()}/{self.in_channels * self.out_channels}, "
                f"bias={self.has_bias}")


class DiverseGroupLinear(DiverseGroupLayer):
    """A fully connected layer whose output groups each read their own subset of inputs.

    **Reconstruction** (METHODS.md §6 describes conv layers only): the linear counterpart
    of :class:`DiverseGroupConv`, a 1×1 conv on ``[..., in_features]``:
    ``weight_{g}`` is ``[|G_g|, |S_g|]`` and one ``F.linear`` per group runs on the gathered
    features ``x[..., S_g]``; ``Σ_g |S_g|·|G_g|`` multiply-adds per row.
    """

    def __init__(self, in_features: int, out_features: int, groups: Iterable[int],
                 inputs: Iterable[Iterable[int]], bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.setup_groups(self.in_features, self.out_features, (), groups, inputs, bias, device, dtype)

    @property
    def n_in(self) -> int:
        return self.in_features

    @classmethod
    def from_linear(cls, linear: nn.Linear, groups: Iterable[int],
                    inputs: Iterable[Iterable[int]]) -> "DiverseGroupLinear":
        """The grouped linear keeping ``linear``'s weights ``W[G_g][:, S_g]`` (and biases)."""
        if type(linear) is not nn.Linear:
            raise ModelError(f"self-grouping needs an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        new = cls(linear.in_features, linear.out_features, groups, inputs,
                  bias=linear.bias is not None, device=w.device, dtype=w.dtype)
        new.copy_dense(w, linear.bias)
        new.train(linear.training)
        return new

    def to_dense(self) -> nn.Linear:
        """The equivalent masked dense linear: ``W[i, j] = 0`` for ``j ∉ S_{g(i)}``."""
        weight, bias = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.has_bias,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.dense_training:  # the same function as one dense matmul
            return F.linear(x, *self.masked_weight())
        return self.grouped(x, -1, F.linear)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"groups={self.num_groups}, connections={self.connections()}/"
                f"{self.in_features * self.out_features}, bias={self.has_bias}")
