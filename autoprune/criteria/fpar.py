"""FPAR — attention and rank (Int. J. Mach. Learn. Cybern., 2024).

Score of channel c of a unit: ``Â_c + λ·R̂_c``, where ``A`` is the mean gate of an
SE-style attention acting on the unit's channels, ``R`` is HRank's average feature-map
rank (tap ``post``, after the activation), and ``Â``, ``R̂`` are each divided by their
maximum within the unit. ``λ`` (param ``lam``) defaults to 1.

The paper's observation is that an attention module's mean channel weights are nearly
constant across input batches, so a few batches estimate ``A``.

Where ``A`` comes from — :func:`attention`:

- **native** gates: a unit whose channels are multiplied by a sigmoid/hard-sigmoid
  gate computed from them, as in torchvision's ``SqueezeExcitation`` (MobileNetV3,
  EfficientNet, RegNet-Y). Recognised structurally: a module with exactly two
  conv/linear layers — the squeeze layer, defined first, reading the unit (one of its
  consumers) and the excitation layer producing the unit's width (one of its root
  layers, since the product couples it to the unit) — and a ``Sigmoid``/``Hardsigmoid`` child, whose
  output (the gate) is read with a forward hook over ``read_batches`` batches.
- **Reconstruction** (the paper's text on this point was not available): for units
  without a native gate, a temporary SE-style *probe* ``GAP → FC(C→h) → ReLU → FC(h→C)
  → sigmoid`` (``h = max(4, C // reduction)``) scales the unit's channels where the
  next layers read them (a forward pre-hook on every consumer scaling the input
  positions of the unit; one probe per unit shared by its consumers, each gating from
  the channels it reads). The probes alone are trained for ``steps`` SGD steps on the
  cross-entropy of the calibration batches with the backbone frozen (eval mode, no
  parameter gradients), then ``A_c`` is the mean gate over ``read_batches`` batches
  and all consumers, and the probes are removed. The excitation layer starts at zero
  weight and bias ``init_bias`` (gate 0.5 by default), so all channels start equal
  and only training separates them; initialisation is seeded (``seed``), so the same
  settings give the same result. A unit's identity (residual) path is not gated.
  A few steps separate probe gates only slightly (a spread of a few hundredths), so
  with the paper's max-normalisation ``Â`` then mostly breaks ties of ``R̂``; raise
  ``steps``/``lr``, lower ``lam``, or use the ``norm="minmax"`` option to weigh it more.

The ``fpar`` criterion combines a given attention with rank summaries:

>>> stats = autoprune.calibrate(space, model, batches, criteria=["hrank"])  # or "fpar"
>>> att = autoprune.criteria.fpar.attention(space, model, batches, steps=30)
>>> scores = autoprune.criteria.score("fpar", space, stats, attention=att, lam=1.0)

or in one call: ``fpar_scores(space, model, batches)``. :func:`autoprune.prune` and the
search compute the attention themselves (:meth:`FPAR.inputs`, on the calibration images,
with the run's seed); its settings (:data:`SETTINGS`) go in
``prune(..., criterion_params={"fpar": {"lam": 0.5, "steps": 60}})`` and are checked by
:func:`check_settings` before any work.
"""

from __future__ import annotations

import itertools
import math
from contextlib import contextmanager
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CriterionError, short
from ..layers import ROOT_TYPES
from .base import Criterion
from .hrank import RankState, mean_ranks

GATE_TYPES = (nn.Sigmoid, nn.Hardsigmoid)
MODES = ("auto", "native", "probe")
NORMS = ("max", "minmax")
MAX_STEPS = 100_000
"""Cap on ``steps`` and ``read_batches`` (each a forward pass over a calibration batch)."""


def _int_in(low: int, high: int | None = None) -> Callable[[object], bool]:
    return lambda v: (isinstance(v, int) and not isinstance(v, bool) and v >= low
                      and (high is None or v <= high))


def _real(ok: Callable[[float], bool]) -> Callable[[object], bool]:
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      and ok(v))


RULES: dict[str, tuple[Callable[[object], bool], str]] = {
    "mode": (lambda v: isinstance(v, str) and v in MODES, f"one of {', '.join(MODES)}"),
    "steps": (_int_in(0, MAX_STEPS), f"an integer in 0..{MAX_STEPS}"),
    "read_batches": (_int_in(1, MAX_STEPS), f"an integer in 1..{MAX_STEPS}"),
    "reduction": (_int_in(1), "an integer >= 1"),
    "lr": (_real(lambda v: v > 0), "a finite number > 0"),
    "momentum": (_real(lambda v: 0 <= v < 1), "a number in [0, 1)"),
    "init_bias": (_real(lambda v: True), "a finite number"),
    "lam": (_real(lambda v: v >= 0), "a finite number >= 0"),
    "norm": (lambda v: isinstance(v, str) and v in NORMS, f"one of {', '.join(NORMS)}"),
    "rtol": (lambda v: v is None or _real(lambda r: r >= 0)(v), "a finite number >= 0 (or None)"),
}
"""Per setting of the criterion, its test and what it allows."""
ATTENTION_SETTINGS = ("mode", "steps", "lr", "momentum", "reduction", "init_bias", "read_batches")
"""The settings that go to :func:`attention`."""
SETTINGS = ("lam", "norm", "rtol", *ATTENTION_SETTINGS)
"""What a user may set for ``fpar`` (``prune(criterion_params={"fpar": {...}})``)."""


def check_settings(settings: Mapping[str, object]) -> None:
    """CriterionError (one line: the setting, its value and what is allowed) for the first
    value of ``settings`` its rule in :data:`RULES` refuses; names without a rule pass."""
    for key, value in settings.items():
        if key in RULES and not RULES[key][0](value):
            raise CriterionError(f"fpar setting {key} must be {RULES[key][1]}, got {short(value)}")


def native_gates(space, model: nn.Module | None = None) -> dict[str, list[str]]:
    """Per unit with a model-own SE-style gate, the names of its gate activation modules."""
    model = space.model if model is None else model
    modules = dict(model.named_modules())
    found: dict[str, list[str]] = {}
    for unit in space.units:
        for consumer, _, _ in unit.consumers:
            parts = consumer.split(".")
            for depth in range(len(parts) - 1, 0, -1):  # nearest ancestor first
                prefix = ".".join(parts[:depth])
                gate = _gate_of(modules[prefix], prefix, consumer, unit)
                if gate:
                    if gate not in found.setdefault(unit.name, []):
                        found[unit.name].append(gate)
                    break
    return found


def _gate_of(module: nn.Module, prefix: str, consumer: str, unit) -> str | None:
    """The gate child of ``module`` if it is an SE block squeezing ``consumer`` into ``unit``."""
    layers = [f"{prefix}.{n}" for n, m in module.named_modules() if n and isinstance(m, ROOT_TYPES)]
    gates = [f"{prefix}.{n}" for n, m in module.named_children() if isinstance(m, GATE_TYPES)]
    if len(layers) != 2 or len(gates) != 1 or layers[0] != consumer:
        return None  # the squeeze layer (defined first) must read the unit
    excite = layers[1]
    return gates[0] if excite in unit.modules and consumer not in unit.modules else None


class Probe(nn.Module):
    """SE-style gate on a unit's C channels: GAP → FC(C→h) → ReLU → FC(h→C) → sigmoid."""

    def __init__(self, width: int, reduction: int = 16, init_bias: float = 0.0) -> None:
        super().__init__()
        hidden = max(4, width // reduction)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        nn.init.zeros_(self.fc2.weight)
        nn.init.constant_(self.fc2.bias, init_bias)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))


class _Reading:
    """Running sum of gates per unit channel, and how many gate rows were added."""

    def __init__(self, width: int) -> None:
        self.sum = torch.zeros(width, dtype=torch.double)
        self.count = 0
        self.active = False

    def add(self, gate: torch.Tensor) -> None:
        if self.active:
            self.sum += gate.detach().double().sum(0).cpu()
            self.count += gate.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.count, 1)).float()


def _consumer_hook(probe: Probe, positions, channels, width: int, reading: _Reading):
    pos = torch.tensor(positions, dtype=torch.long)
    ch = torch.tensor(channels, dtype=torch.long)
    per_channel = torch.bincount(ch, minlength=width).clamp(min=1).double()

    def hook(module, inputs):
        x = inputs[0]
        n = x.shape[0]
        p, c = pos.to(x.device), ch.to(x.device)
        picked = x.index_select(1, p).reshape(n, len(positions), -1).mean(2)
        pooled = torch.zeros(n, width, dtype=x.dtype, device=x.device).index_add(1, c, picked)
        pooled = pooled / per_channel.to(x.device, x.dtype)
        gate = probe(pooled)
        reading.add(gate)
        factor = torch.ones(n, x.shape[1], dtype=x.dtype, device=x.device).index_copy(1, p, gate[:, c])
        scaled = x.clone() * factor.reshape(n, x.shape[1], *([1] * (x.dim() - 2)))
        return (scaled,) + tuple(inputs[1:])
    return hook


def _output_hook(probe: Probe, width: int, reading: _Reading):
    def hook(module, inputs, out):
        n = out.shape[0]
        gate = probe(out.reshape(n, width, -1).mean(2))
        reading.add(gate)
        return out * gate.reshape(n, width, *([1] * (out.dim() - 2)))
    return hook


@contextmanager
def _probes_attached(model: nn.Module, space, names: list[str], probes: dict[str, Probe],
                     readings: dict[str, _Reading]):
    hooks = []
    try:
        for name in names:
            unit = space.unit(name)
            if unit.consumers:
                for consumer, positions, channels in unit.consumers:
                    hooks.append(model.get_submodule(consumer).register_forward_pre_hook(
                        _consumer_hook(probes[name], positions, channels, unit.width, readings[name])))
            else:
                hooks.append(model.get_submodule(name).register_forward_hook(
                    _output_hook(probes[name], unit.width, readings[name])))
        yield
    finally:
        for h in hooks:
            h.remove()


@contextmanager
def _frozen(model: nn.Module):
    """Eval mode and no parameter gradients for the backbone; restored afterwards."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _read_native(model: nn.Module, gates: dict[str, list[str]], space, pool, device) -> dict[str, torch.Tensor]:
    readings = {u: _Reading(space.unit(u).width) for u in gates}
    hooks = []

    def hook_for(reading: _Reading, width: int):
        def hook(module, inputs, out):
            if out.dim() >= 2 and out.shape[1] == width:
                reading.add(out.reshape(out.shape[0], width, -1).mean(2))
        return hook

    for unit, names in gates.items():
        readings[unit].active = True
        for gate in names:
            hooks.append(model.get_submodule(gate).register_forward_hook(
                hook_for(readings[unit], space.unit(unit).width)))
    try:
        with torch.no_grad():
            for x, _ in pool:
                model(x.to(device))
    finally:
        for h in hooks:
            h.remove()
    return {u: r.mean() for u, r in readings.items() if r.count}


def attention(space, model: nn.Module | None, batches: Iterable, *, mode: str = "auto",
              steps: int = 30, lr: float = 0.5, momentum: float = 0.9, reduction: int = 16,
              init_bias: float = 0.0, read_batches: int = 4, seed: int = 0,
              device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """Per unit, the mean attention gate ``A`` of each channel, in (0, 1).

    ``mode``: ``"auto"`` uses the model's own SE gates where present and trained
    probes elsewhere (reconstruction, see the module docstring); ``"native"`` only
    native gates (units without one get ``A = 1``: their FPAR score is rank only);
    ``"probe"`` probes on every unit. ``batches`` yields (images, labels); the first
    ``max(steps, read_batches)`` are used, cycled for training. ``model`` defaults
    to ``space.model``; it is left as it was (mode, ``requires_grad``, no hooks).
    """
    check_settings({"mode": mode, "steps": steps, "lr": lr, "momentum": momentum, "reduction": reduction,
                    "init_bias": init_bias, "read_batches": read_batches})
    model = space.model if model is None else model
    device = torch.device(device) if device else next(model.parameters()).device
    pool = list(itertools.islice(iter(batches), max(steps, read_batches)))
    if not pool:
        raise ValueError("fpar attention: no calibration batch given")
    reading_pool = pool[:read_batches]
    gates = native_gates(space, model) if mode != "probe" else {}
    out: dict[str, torch.Tensor] = {}
    with _frozen(model):
        if gates:
            out.update(_read_native(model, gates, space, reading_pool, device))
        todo = [u.name for u in space.units if u.name not in out]
        if mode == "native":
            out.update({name: torch.ones(space.unit(name).width) for name in todo})
        elif todo:
            out.update(_train_and_read_probes(model, space, todo, pool, reading_pool, device, steps=steps,
                                              lr=lr, momentum=momentum, reduction=reduction,
                                              init_bias=init_bias, seed=seed))
    return {u.name: out[u.name] for u in space.units}


def _train_and_read_probes(model, space, names, pool, reading_pool, device, *, steps, lr, momentum,
                           reduction, init_bias, seed) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probes = {n: Probe(space.unit(n).width, reduction, init_bias) for n in names}
    for probe in probes.values():
        probe.to(device)
    readings = {n: _Reading(space.unit(n).width) for n in names}
    params = [p for probe in probes.values() for p in probe.parameters()]
    with _probes_attached(model, space, names, probes, readings):
        if steps:
            opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
            with torch.enable_grad():
                for step in range(steps):
                    x, y = pool[step % len(pool)]
                    loss = F.cross_entropy(model(x.to(device)), y.to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        for r in readings.values():
            r.active = True
        with torch.no_grad():
            for x, _ in reading_pool:
                model(x.to(device))
    return {n: r.mean() for n, r in readings.items()}


def _normalised(t: torch.Tensor, norm: str = "max") -> torch.Tensor:
    t = torch.as_tensor(t).double().flatten()
    if t.numel() == 0:
        return t
    if norm == "minmax":
        t = t - t.min()
    top = t.max()
    return t / top if top > 0 else torch.zeros_like(t)


def combine(att: Mapping[str, torch.Tensor], ranks: Mapping[str, torch.Tensor], lam: float = 1.0,
            norm: str = "max") -> dict[str, torch.Tensor]:
    """FPAR score per unit: ``A/max(A) + lam·R/max(R)`` (a zero maximum gives zeros).

    ``norm="minmax"`` (an option, not the paper's) rescales each of A and R to [0, 1]
    instead, so that probe gates that separated little still weigh as much as rank.
    """
    check_settings({"norm": norm})
    missing = set(ranks) - set(att)
    if missing:
        raise KeyError(f"fpar: no attention for units {sorted(missing)[:5]}")
    return {u: (_normalised(att[u], norm) + float(lam) * _normalised(r, norm)).float()
            for u, r in ranks.items()}


class FPAR(RankState, Criterion):
    """FPAR score ``Â + λ·R̂`` (tap ``post``: its summaries are HRank's).

    Params: ``attention`` (unit → Tensor[width], from :func:`attention`; required at
    score time), ``lam`` (λ, default 1), ``norm`` (``"max"``, the paper's, or
    ``"minmax"``; see :func:`combine`), ``rtol`` (rank tolerance), and the settings of
    :func:`attention` (:data:`ATTENTION_SETTINGS`) that :meth:`inputs` uses. Scoring reads
    this criterion's own rank summaries, or ``hrank``'s when only those were calibrated.
    """

    name = "fpar"
    tap = "post"
    requires = ("attention",)
    settings = SETTINGS

    def check(self) -> None:
        super().check()
        check_settings(self.params)

    def inputs(self, space, model, batches, *, seed=0, device=None):
        """``attention``: :func:`attention` of ``model`` on the calibration ``batches`` with
        this criterion's settings and ``seed`` (probes trained where the model has no SE gate)."""
        settings = {k: self.params[k] for k in ATTENTION_SETTINGS if k in self.params}
        return {"attention": attention(space, model, batches, seed=seed, device=device, **settings)}

    def score(self, space, stats):
        att = self.params.get("attention")
        if att is None:
            raise ValueError("fpar needs its attention: att = autoprune.criteria.fpar.attention(space, "
                             "model, batches), then score('fpar', space, stats, attention=att)")
        source = self.name if self.name in stats or "hrank" not in stats else "hrank"
        return combine(att, mean_ranks(stats, source), self.params.get("lam", 1.0),
                       self.params.get("norm", "max"))


def fpar_scores(space, model: nn.Module | None, batches: Iterable, *, lam: float = 1.0, norm: str = "max",
                stats=None, n_images: int = 256, progress: bool = False,
                **attention_kwargs) -> dict[str, torch.Tensor]:
    """FPAR scores in one call: rank summaries (calibrated here unless ``stats`` holds
    ``fpar`` or ``hrank`` ones) and :func:`attention` (``attention_kwargs`` go to it)."""
    batches = list(batches)
    model = space.model if model is None else model
    if stats is None or ("fpar" not in stats and "hrank" not in stats):
        from ..calibrate import calibrate
        stats = calibrate(space, model, batches, criteria=["hrank"], n_images=n_images, progress=progress)
    att = attention(space, model, batches, **attention_kwargs)
    return FPAR(attention=att, lam=lam, norm=norm).score(space, stats)


__all__ = ["ATTENTION_SETTINGS", "FPAR", "MODES", "NORMS", "Probe", "RULES", "SETTINGS", "attention",
           "check_settings", "combine", "fpar_scores", "native_gates"]
