"""Ray Tune runner: Optuna proposes structures, Ray Tune evaluates them in parallel.

>>> result = autoprune.search.search(model, data, "flops<=50%", space="resnet_cifar",
...                                  trials=64, workers=2, out="runs/y")
>>> result.report["best_trial"], result.report["seeds"]

One search, step by step:

1. **Driver, once.** The dense model is traced into a :class:`~autoprune.space.Space`,
   calibrated once for every criterion the search space names (and for HPSE/FCHP
   clusters), scored per criterion, and cluster labels are computed for every
   cluster-count choice. The uniform and the DI-greedy structures at the budget are
   turned into search params (``SearchSpace.params_for``) and enqueued as the first
   two trials (``points_to_evaluate``), so the search starts from the baselines.
2. **Shipped once.** All of that (CPU weights, Space, scores, labels, data) goes into
   Ray's object store once through ``tune.with_parameters``; trials read it, nothing
   is recomputed per trial.
3. **Trials.** ``tune.Tuner`` runs ``--workers`` trials at a time, each asking for
   ``{"cpu": 1, "gpu": 1/workers}`` (GPU only where the cluster has one). A trial
   fits its candidate to the budget (``Space.fit``), mixes the precomputed scores,
   selects channels (cluster-proportionally if the space clusters), prunes
   physically, optionally self-groups, re-estimates BN (adaptive BN), proxy
   fine-tunes and scores accuracy on the first ``eval_batches`` validation batches.
   It reports ``proxy_score``, ``flops``, ``params`` and its node id.
4. **Sampler.** :class:`OptunaSearcher` (a Ray Tune ``Searcher`` driving an Optuna study
   with the YAML's sampler through ``ask``/``tell``) tells Optuna only *final* scores:
   a trial that ASHA stopped early is told as PRUNED, never as if its truncated score
   were final. A trial whose proxy
   fine-tune diverges (non-finite loss, :class:`~autoprune.evaluate.Diverged`)
   reports the finite :data:`PENALTY` and is marked ``FAIL``; a crashed worker is
   retried (``FailureConfig(max_failures=...)``) and marked ``ERROR`` only when the
   retries are spent.
5. **Result.** The best trial's structure is rebuilt on the driver, fully fine-tuned
   and written like ``autoprune prune`` writes (``model.pt``, ``plan.json``,
   ``report.json``, ``widths.png``) plus ``history.png``, ``importances.png`` and,
   for objective ``accuracy_flops``, ``pareto.png``. ``report.json`` holds one entry
   per trial (``trials``), the ``best_trial`` and the seeds' scores (``seeds``).

Multi-fidelity (``asha:`` in the YAML): ASHA's time unit is a proxy fine-tuning step.
A trial reports at the rungs ``grace_period · reduction_factor^k`` steps (below
``finetune_steps``) and at ``finetune_steps``; the fine-tune itself is the same SGD
run as without ASHA, paused to score at each rung.

Resuming: the Tune experiment lives in ``OUT/tune`` and the run's settings in
``OUT/search.json`` (the validated space in ``OUT/space.yaml``). ``autoprune search
--resume OUT`` (``search(..., out=OUT, resume=True)``) restores it with
``Tuner.restore``. Tune snapshots its state, the searcher's and the trials' results
into ``OUT/tune`` together, at most a second apart (``TUNE_GLOBAL_CHECKPOINT_S=1``):
trials finished in the last snapshot are kept as they are; trials that were running
(or finished after it) run again under the same id and config, and a trial whose final
result did reach ``OUT`` reports it again instead of recomputing; new trials are drawn
only until the requested count is reached, so none is lost, counted twice or added.
Tune writes its state files in place, so a driver killed at the wrong moment can leave
the newest one torn: it is then moved aside (``.unusable``, said in a warning) and the
search continues in a new Tune experiment in ``OUT/tune`` whose searcher starts from its
own saved record, handing out every trial again under its number and params (finished
ones report their saved result again). Only a real Ctrl-C ends a search early with
KeyboardInterrupt; Tune ending early otherwise is an AutopruneError.

With objective ``accuracy_flops`` ASHA still ranks trials by proxy score alone, so it
stops the smaller structures first and thins out the Pareto front (a warning says so).

Ray: by default autoprune starts a local Ray of its own (``ray.init(address="local")``,
even if another Ray runs on the machine or ``RAY_ADDRESS`` is set; dashboard off, bound
to 127.0.0.1, ``RAY_AUTH_MODE=disabled`` unless set) and stops it at the end. ``address=`` /
``--address`` joins an existing cluster instead and leaves it running. A cluster
with token authentication::

    # head node: create a token (saved in ~/.ray/auth_token) and start Ray with it
    export RAY_AUTH_MODE=token
    ray get-auth-token --generate
    ray start --head --port=6379 --num-cpus=8 --include-dashboard=false
    # every other node: the same token, via RAY_AUTH_TOKEN or a copied ~/.ray/auth_token
    export RAY_AUTH_MODE=token RAY_AUTH_TOKEN=<token printed by ray get-auth-token>
    ray start --address=HEAD_IP:6379 --num-cpus=8
    # driver (any machine that reaches the head; same two variables)
    autoprune search --checkpoint base.pt --flops 50% --address HEAD_IP:6379 --out /shared/runs/y

(``--address auto`` joins a cluster started on this machine; on a trusted
single-machine cluster ``RAY_AUTH_MODE=disabled`` on every ``ray start`` and on the
driver turns authentication off.) Trial results are written by the driver under
``--out``; workers read nothing from it except, on resume, their own previous result,
so ``--out`` on a shared filesystem (NFS) is only needed for that shortcut.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from .. import evaluate, grouping
from ..budget import TOLERANCE, Budget
from ..criteria import mix as _mix
from ..data import DataBundle
from ..errors import AutopruneError, short
from ..plan import Plan, select
from ..space import Space
from .space import Candidate, SearchSpace, load

__all__ = ["PENALTY", "STATES", "OptunaSearcher", "Shared", "best_trial", "evaluate_candidate",
           "driver_state", "importances", "mark_seeds", "pareto_front", "read_settings", "rebuild_study",
           "rungs", "search", "trial_fields", "trial_row", "trials_table"]

PENALTY = -1.0
"""``proxy_score`` a diverged trial reports: finite (samplers and Tune handle it) and below
every real accuracy, so a diverged structure never ranks above a trained one."""

STATES = ("COMPLETE", "PRUNED", "FAIL", "ERROR", "INCOMPLETE")
"""Trial states in the report: COMPLETE (final proxy score), PRUNED (stopped early by ASHA;
its score is from a lower rung), FAIL (proxy fine-tune diverged: PENALTY), ERROR (crashed
after every retry), INCOMPLETE (never finished)."""

DEFAULT_SPACE = "resnet_cifar"
TUNE_DIR = "tune"              # the Tune experiment, under --out
TUNE_STATE_GLOB = "experiment_state-*.json"  # Tune's trial snapshots in TUNE_DIR, one per session
SEARCHER_STATE_GLOB = "searcher-state-*.pkl"  # OptunaSearcher.save's files in TUNE_DIR, one per session
SETTINGS_FILE = "search.json"  # what --resume needs to rebuild the driver side
SPACE_FILE = "space.yaml"      # the validated search space, so a resume does not depend on the original file
TRIALS_FILE = "trials.json"    # the trials table, written before the final fine-tune
NUMBER_KEY = "_number"         # Optuna trial number, added to each Tune config by OptunaSearcher
EVAL_BATCH = 256               # images per evaluation batch (eval_batches counts these)
PROXY_BATCH = 64               # proxy fine-tune / adaptive-BN batch size (as evaluate.proxy_finetune)
METRIC_KEYS = ("proxy_score", "proxy_steps", "final", "diverged", "flops", "params",
               "budget_scale", "node", "number", "started_at", "time_prepare_s", "time_compute_s",
               "time_trial_s", "error")


# --------------------------------------------------------------------------- shared state


@dataclass
class Shared:
    """Everything a trial needs, computed once on the driver and put in Ray's object store once.

    ``scores``: criterion → unit → channel scores. ``labels``: cluster-count choice (None:
    the method's default) → unit → cluster labels. ``model`` is the dense base on the CPU
    (also ``space.model``). ``experiment_dir`` is where Tune writes each trial's results.
    """

    model: nn.Module
    space: Space
    spec: SearchSpace
    budget: "Budget | str"
    scores: dict[str, dict[str, torch.Tensor]]
    labels: dict[int | None, dict[str, np.ndarray]] | None
    data: DataBundle
    seed: int = 0
    threads: int = 1
    experiment_dir: str | None = None


def _cpu(x):
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, Mapping):
        return {k: _cpu(v) for k, v in x.items()}
    return x


def _shippable_space(space: Space, model: nn.Module) -> Space:
    """A shallow copy of ``space`` on the CPU model (pickles without graph maps)."""
    out = copy.copy(space)
    out.model = model
    ex = space.example_input
    out.example_input = tuple(t.cpu() for t in ex) if isinstance(ex, tuple) else ex.cpu()
    return out


# --------------------------------------------------------------------------- one trial


def rungs(asha: Mapping | None, total: int) -> list[int]:
    """Proxy-step counts at which a trial reports: ASHA's rungs below ``total``, then ``total``.

    ASHA's milestones are ``grace_period · reduction_factor^k``; reporting at the ceiling of
    each lets the scheduler decide at every rung. Without ASHA (or without proxy
    fine-tuning) a trial reports once.
    """
    if not asha or total <= 0:
        return [max(total, 0)]
    g, rf = float(asha["grace_period"]), float(asha["reduction_factor"])
    out, m = [], g
    while m < total:
        step = int(math.ceil(m - 1e-9))
        if not out or step > out[-1]:
            out.append(step)
        m *= rf
    return out + [total] if not out or out[-1] != total else out


def _eval_subset(dataset: Dataset, batches: int) -> Dataset:
    """The first ``batches`` × 256 images of ``dataset`` (the same ones for every trial)."""
    n = min(len(dataset), batches * EVAL_BATCH)
    return dataset if n == len(dataset) else Subset(dataset, range(n))


def _chunked_proxy_finetune(model: nn.Module, dataset: Dataset, milestones: Sequence[int], lr: float,
                            seed: int, device) -> Iterator[int]:
    """The SGD run of :func:`~autoprune.evaluate.proxy_finetune` (same seed, batches and cosine
    schedule over ``milestones[-1]`` steps), paused after each milestone (yields its step count)."""
    import itertools

    from ..train import cross_entropy, sgd, sgd_steps

    total = milestones[-1]
    torch.manual_seed(seed)
    model.to(device)
    batches = itertools.islice(evaluate._repeat(evaluate._shuffled(dataset, PROXY_BATCH, seed)), total)
    optimizer, schedule = sgd(model, lr, total, 0.9, 5e-4)
    done = 0
    for milestone in milestones:
        offset = done
        sgd_steps(model, itertools.islice(batches, milestone - done), optimizer, schedule,
                  cross_entropy(), device,
                  diverged=lambda step, loss: evaluate.Diverged(offset + step, loss))
        done = milestone
        yield done


def _mixed_scores(scores: Mapping[str, Mapping[str, torch.Tensor]], weights: Mapping[str, float]):
    """One criterion: its scores; several: :func:`autoprune.criteria.mix` of them."""
    used = {k: w for k, w in weights.items() if w > 0}
    if len(used) == 1:
        return scores[next(iter(used))]
    return _mix(weights, scores)


def _candidate_labels(labels: Mapping | None, cand: Candidate, space: Space) -> dict | None:
    """Per unit, the precomputed cluster labels for the candidate's cluster count."""
    if labels is None or cand.cluster_method is None:
        return None
    return {u.name: labels[(cand.cluster_k or {}).get(u.name)][u.name] for u in space.units}


def build_structure(shared: Shared, cand: Candidate) -> tuple[Plan, nn.Module, dict[str, int], int, int]:
    """The candidate's Plan, pruned (and self-grouped) copy of ``shared.model``, widths, FLOPs
    and params (FLOPs/params from the analytic cost model, less what self-grouping saves)."""
    from ..selfgroup import self_group_model, selfgroup_cost_delta

    space, spec = shared.space, shared.spec
    widths = space.fit(cand.ratios, cand.budget(shared.budget), spec.max_ratio)
    plan = select(space, widths, scores=_mixed_scores(shared.scores, cand.mix),
                  clusters=_candidate_labels(shared.labels, cand, space))
    small = plan.apply(shared.model)
    cost = space.cost(widths)
    flops, params = cost.flops, cost.params
    if cand.selfgroup:
        small, sg = self_group_model(small, "all", k=int(cand.selfgroup["k"]),
                                     cp=float(cand.selfgroup["cp"]), seed=shared.seed, copy=False)
        plan.selfgroup = sg
        x = torch.zeros(space.input_shape, device=next(small.parameters()).device)
        delta = selfgroup_cost_delta(small, sg, x)
        flops, params = flops - delta.flops, params - delta.params
    return plan, small, widths, int(flops), int(params)


def _check_finite(model: nn.Module, step: int) -> None:
    """Diverged if the last update left a non-finite weight (its loss was still finite)."""
    for p in model.parameters():
        if not bool(torch.isfinite(p).all()):
            raise evaluate.Diverged(step, float("nan"))


def evaluate_candidate(shared: Shared, params: Mapping[str, Any],
                       report: Callable[[dict], None] | None = None, device=None) -> dict:
    """One trial without Ray: build the candidate ``params`` describe and proxy-score it.

    Adaptive BN (``proxy.bn_batches``), proxy fine-tuning (``proxy.finetune_steps`` at
    ``proxy.lr``) and accuracy on the first ``proxy.eval_batches`` validation batches.
    ``report`` (e.g. ``ray.tune.report``) receives the metrics at every ASHA rung and at
    the end; the final metrics are also returned. A diverged fine-tune gives
    ``proxy_score = PENALTY`` and ``diverged = True``. Timings: ``time_prepare_s`` (fit,
    select, prune), ``time_compute_s`` (adaptive BN, fine-tune, evaluation) and
    ``time_trial_s`` (everything).
    """
    start, started_at = time.perf_counter(), time.time()
    spec = shared.spec
    device = torch.device(device) if device is not None else evaluate.default_device()
    cand = spec.candidate(params, shared.space)
    proxy = spec.proxy
    _, small, _, flops, nparams = build_structure(shared, cand)
    small.to(device)
    base = {"flops": flops, "params": nparams, "budget_scale": cand.budget_scale,
            "diverged": False, "error": ""}
    prepared = time.perf_counter()
    evalset = _eval_subset(shared.data.val, int(proxy.eval_batches))
    steps_total = int(proxy.finetune_steps)
    milestones = rungs(spec.asha, steps_total)
    compute = 0.0

    def metrics(score: float, steps: int, final: bool, **extra) -> dict:
        now = time.perf_counter()
        return {**base, "proxy_score": float(score), "proxy_steps": steps, "final": final,
                "started_at": started_at, "time_prepare_s": prepared - start, "time_compute_s": compute,
                "time_trial_s": now - start, **extra}

    out = None
    t = time.perf_counter()
    try:
        if proxy.bn_batches:
            evaluate.adaptive_bn(small, shared.data.train, n_batches=int(proxy.bn_batches),
                                 batch_size=PROXY_BATCH, seed=shared.seed, device=device)
        if len(milestones) == 1:  # no early stopping: the library's proxy fine-tune as is
            if steps_total:
                evaluate.proxy_finetune(small, shared.data.train, steps=steps_total, lr=proxy.lr,
                                        batch_size=PROXY_BATCH, seed=shared.seed, device=device)
            _check_finite(small, steps_total)
            score = evaluate.accuracy(small, evalset, batch_size=EVAL_BATCH, device=device)
            compute += time.perf_counter() - t
            out = metrics(score, steps_total, True)
        else:
            for steps in _chunked_proxy_finetune(small, shared.data.train, milestones, proxy.lr,
                                                 shared.seed, device):
                _check_finite(small, steps)
                score = evaluate.accuracy(small, evalset, batch_size=EVAL_BATCH, device=device)
                compute += time.perf_counter() - t
                out = metrics(score, steps, steps == steps_total)
                if report is not None and not out["final"]:
                    report(out)
                t = time.perf_counter()
    except evaluate.Diverged as exc:
        compute += time.perf_counter() - t
        out = metrics(PENALTY, exc.step, True, diverged=True, error=str(exc))
    if report is not None:
        report(out)
    return out


# --------------------------------------------------------------------------- Ray side


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def _final_row(path: Path) -> dict | None:
    """The last final result in a trial's result.json (torn lines skipped), or None."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("final"):
            return row
    return None


def _finished_result(experiment_dir: str | None, trial_id: str, config: Mapping | None = None) -> dict | None:
    """The final result this trial already reported (in its result.json), if any.

    With ``config`` (which holds ``_number``), also the final result another trial
    directory holds for the same number and params: a trial handed out again under a new
    Tune id (an orphan, or every trial after a restart from the searcher's own state).
    """
    if not experiment_dir:
        return None
    own = Path(experiment_dir) / f"trial_{trial_id}" / "result.json"
    row = _final_row(own)
    number = (config or {}).get(NUMBER_KEY)
    if row is None and number is not None:
        for path in sorted(Path(experiment_dir).glob("trial_*/result.json")):
            other = _final_row(path) if path != own else None
            cfg = other.get("config") if other else None
            if isinstance(cfg, Mapping) and cfg.get(NUMBER_KEY) == number and _flat(cfg) == _flat(config):
                row = other
                break
    return None if row is None else {k: row[k] for k in METRIC_KEYS if k in row}


def _trainable(config: dict, shared: Shared | None = None) -> None:
    """The Ray Tune function trainable: one candidate, reported with ``ray.tune.report``."""
    import ray
    from ray import tune

    torch.set_num_threads(max(1, int(shared.threads)))
    node = ray.get_runtime_context().get_node_id()
    number = config.get(NUMBER_KEY)
    done = _finished_result(shared.experiment_dir, tune.get_context().get_trial_id(), config)
    if done is not None:  # finished before the driver died, after Tune's last snapshot
        tune.report({**done, "replayed": True})
        return
    evaluate_candidate(shared, config, report=lambda m: tune.report({**m, "node": node, "number": number}))


def _read_snapshot(path: Path) -> dict[str, dict] | None:
    """One Tune experiment-state file: trial id → {config, status, last_result}; None if unreadable."""
    try:
        state = json.loads(path.read_text())
        trials = {}
        for trial_json, runtime_json in state["trial_data"]:
            trial, runtime = json.loads(trial_json), json.loads(runtime_json)
            trials[trial["trial_id"]] = {"config": trial.get("config") or {}, "status": trial.get("status"),
                                         "last_result": runtime.get("last_result") or {}}
        return trials
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _tune_snapshot(directory: Path) -> dict[str, dict] | None:
    """Tune's newest trial snapshot in ``directory`` (None if there is none or it is torn)."""
    paths = sorted(Path(directory).glob(TUNE_STATE_GLOB))  # Tune restores the newest name too
    return _read_snapshot(paths[-1]) if paths else None


SEARCHER_FORMAT = "autoprune-searcher/1"
_FINISHED = ("COMPLETE", "PRUNED", "FAIL")


def _tpe(seed: int | None = None):
    """The default sampler factory (Optuna's TPE)."""
    import optuna

    return optuna.samplers.TPESampler(seed=seed)


def _nested(flat: Mapping[str, Any]) -> dict:
    """Optuna's flat names (``ratio/layer1``) as Tune's nested config (the inverse of :func:`_flat`)."""
    out: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def _read_searcher_state(path: Path) -> dict | None:
    """A state :meth:`OptunaSearcher.save` wrote, or None if unreadable (torn, another format)."""
    import pickle

    try:
        with open(path, "rb") as f:
            state = pickle.load(f)
    except Exception:  # noqa: BLE001 - a torn or foreign pickle can raise anything
        return None
    return state if isinstance(state, dict) and state.get("format") == SEARCHER_FORMAT else None


def _newest_searcher_state(directory: Path) -> dict | None:
    """The newest readable searcher state Tune kept in ``directory`` (one file per session)."""
    for path in sorted(Path(directory).glob(SEARCHER_STATE_GLOB), reverse=True):
        state = _read_searcher_state(path)
        if state is not None:
            return state
    return None


@functools.lru_cache(maxsize=None)
def _optuna_search_class():
    """The OptunaSearcher class, defined on first use so that importing autoprune skips Ray."""
    from ray.tune.search import Searcher

    class OptunaSearcher(Searcher):
        """A Ray Tune searcher driving an Optuna study through Optuna's public API only.

        ``space`` is a define-by-run function (``SearchSpace.define``); ``sampler`` a
        picklable factory ``sampler(seed=...)`` returning the Optuna sampler (e.g. the
        bound ``SearchSpace.make_sampler``); ``points_to_evaluate`` are enqueued, in
        order, as the first trials; ``max_trials`` caps the trials handed out (the
        points included), so a resumed search never draws more than requested.

        Each config carries the Optuna trial number (``_number``). Only final scores are
        told: a trial the scheduler stopped before its final rung is told PRUNED; a
        diverged one is told its penalty and tagged user attr ``diverged``; an errored
        one is told FAIL.

        The study (and its sampler, which may hold locks) never leaves the process:
        pickling (Tune's ``tuner.pkl``), :meth:`save` and :meth:`restore` keep plain data
        (the sampler factory and seed, every trial's number, params, distributions,
        state, values and attributes, Tune's trial ids, orphans, the cap and the points),
        and the study is rebuilt from it on first use: finished trials are added with
        ``optuna.trial.create_trial``, running ones asked again with their params
        enqueued, so numbers stay. The rebuilt sampler is seeded with ``seed`` plus the
        number of trials, so it does not repeat the draws it made before.
        """

        def __init__(self, space: Callable, metric: str | list[str], mode: str | list[str],
                     points_to_evaluate: Sequence[Mapping] | None = None,
                     sampler: Callable[..., Any] | None = None, seed: int = 0,
                     max_trials: int | None = None):
            super().__init__(metric=metric, mode=mode)
            if not callable(space):
                raise TypeError("OptunaSearcher: space must be a define-by-run function of an optuna.Trial")
            if sampler is not None and not callable(sampler):
                raise TypeError("OptunaSearcher: sampler must be a factory sampler(seed=...), "
                                "e.g. SearchSpace.make_sampler or optuna.samplers.RandomSampler")
            self.__setstate__({
                "format": SEARCHER_FORMAT, "define": space, "metric": metric, "mode": mode,
                "sampler": sampler or _tpe, "seed": int(seed), "max_trials": max_trials,
                "points": [dict(p) for p in points_to_evaluate or ()], "seeded": 0,
                "trials": [], "ids": {}, "orphans": []})

        # -- plain state

        def __getstate__(self) -> dict:
            return {"format": SEARCHER_FORMAT, "define": self._define, "metric": self._metric,
                    "mode": self._mode, "sampler": self._sampler, "seed": self._seed,
                    "max_trials": self._max_trials, "points": self._points, "seeded": self._seeded,
                    "trials": self._trials, "ids": self._ids, "orphans": self._orphans}

        def __setstate__(self, state: Mapping) -> None:
            if not isinstance(state, Mapping) or state.get("format") != SEARCHER_FORMAT:
                raise ValueError(f"not an {SEARCHER_FORMAT} state")
            self._define, self._metric, self._mode = state["define"], state["metric"], state["mode"]
            self._sampler, self._seed, self._max_trials = state["sampler"], state["seed"], state["max_trials"]
            self._points, self._seeded = copy.deepcopy(list(state["points"])), int(state["seeded"])
            self._trials = copy.deepcopy(list(state["trials"]))  # record i is Optuna trial number i
            self._ids = dict(state["ids"])  # Tune trial id -> number
            self._orphans = list(state["orphans"])  # numbers handed out that Tune does not know
            self._study = None  # rebuilt on first use
            self._live: dict[int, Any] = {}  # number -> optuna.Trial of the running trials

        def save(self, checkpoint_path: str) -> None:
            """Write the plain state (pickle) atomically to ``checkpoint_path``."""
            import pickle

            path = Path(checkpoint_path)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                pickle.dump(self.__getstate__(), f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

        def restore(self, checkpoint_path: str) -> None:
            """Load a saved state and :meth:`reconcile` it with Tune's snapshot next to it.

            An unreadable file (torn, or another format) gives way to the newest readable
            state in the same folder; with none, this searcher keeps its state and adopts
            every trial Tune recorded.
            """
            path = Path(checkpoint_path)
            state = _read_searcher_state(path) or _newest_searcher_state(path.parent)
            if state is not None:
                self.__setstate__(state)
            snapshot = _tune_snapshot(path.parent)
            if snapshot is not None:
                self.reconcile(snapshot)

        def restart(self, state: Mapping) -> None:
            """Take ``state`` (as :meth:`save` wrote) for a new Tune experiment: Tune's old
            trial ids are forgotten and every trial is handed out again, in number order
            (finished ones keep what Optuna was told)."""
            self.__setstate__(state)
            self._ids, self._orphans = {}, list(range(len(self._trials)))

        # -- the study

        @property
        def study(self):
            """The Optuna study (built, or rebuilt from the plain state, on first use)."""
            if self._study is None:
                self._study = self._rebuild()
            return self._study

        def trial(self, trial_id: str):
            """The Optuna FrozenTrial of Tune trial ``trial_id`` (None if unknown)."""
            number = self._ids.get(trial_id)
            return None if number is None else self.study.get_trials(deepcopy=True)[number]

        def _directions(self) -> list[str]:
            modes = self._mode if isinstance(self._mode, list) else [self._mode]
            return ["maximize" if m == "max" else "minimize" for m in modes]

        def _rebuild(self):
            import optuna
            from optuna.distributions import json_to_distribution
            from optuna.trial import TrialState

            study = optuna.create_study(directions=self._directions(),
                                        sampler=self._sampler(seed=self._seed + len(self._trials)),
                                        pruner=optuna.pruners.NopPruner())
            for rec in self._trials:
                dists = {k: json_to_distribution(v) for k, v in rec["distributions"].items()}
                if rec["state"] in _FINISHED:
                    study.add_trial(optuna.trial.create_trial(
                        state=TrialState[rec["state"]], values=rec["values"], params=rec["params"],
                        distributions=dists, user_attrs=rec["user_attrs"], system_attrs=rec["system_attrs"],
                        intermediate_values=rec["intermediate"]))
                    continue
                study.enqueue_trial(dict(rec["params"]), skip_if_exists=False)
                trial = study.ask(fixed_distributions=dists)
                if trial.number != rec["number"]:
                    raise RuntimeError(f"searcher state out of order: trial {rec['number']} rebuilt as "
                                       f"{trial.number}")
                for step, value in rec["intermediate"].items():
                    trial.report(value, step)
                for key, value in rec["user_attrs"].items():
                    trial.set_user_attr(key, value)
                self._live[trial.number] = trial
            return study

        def _ask(self, params: Mapping | None) -> int:
            """A new Optuna trial (``params`` enqueued first, if given): its number."""
            from optuna.distributions import distribution_to_json

            study = self.study
            if params is not None:
                study.enqueue_trial(dict(params), skip_if_exists=False)
            trial = study.ask()
            self._define(trial)
            if trial.number != len(self._trials):
                raise RuntimeError(f"Optuna numbered a trial {trial.number}, expected {len(self._trials)}")
            self._trials.append({
                "number": trial.number, "params": dict(trial.params),
                "distributions": {k: distribution_to_json(d) for k, d in trial.distributions.items()},
                "state": "RUNNING", "values": None, "user_attrs": {}, "system_attrs": {},
                "intermediate": {}})
            self._live[trial.number] = trial
            return trial.number

        def _next_point(self) -> Mapping | None:
            if self._seeded < len(self._points):
                self._seeded += 1
                return self._points[self._seeded - 1]
            return None

        def _config(self, number: int) -> dict:
            return {**_nested(self._trials[number]["params"]), NUMBER_KEY: number}

        def _tell(self, number: int, values: list | None, state, diverged: bool = False) -> None:
            from optuna.trial import TrialState

            study = self.study  # first: a rebuild fills self._live
            trial = self._live.pop(number)
            if diverged:
                trial.set_user_attr("diverged", True)
            try:
                frozen = study.tell(trial, values, state=state)
            except ValueError:  # values Optuna rejects (NaN): the trial failed
                frozen = study.tell(trial, None, state=TrialState.FAIL)
            self._trials[number].update(
                state=frozen.state.name, values=frozen.values, params=dict(frozen.params),
                user_attrs=dict(frozen.user_attrs), system_attrs=dict(frozen.system_attrs),
                intermediate=dict(frozen.intermediate_values))

        def _finished(self, number: int) -> bool:
            return self._trials[number]["state"] in _FINISHED

        # -- Ray Tune's Searcher interface

        def suggest(self, trial_id: str):
            if trial_id not in self._ids:
                if self._orphans:  # drawn before, unknown to Tune's experiment: hand it out again
                    number = self._orphans.pop(0)
                elif self._max_trials is not None and len(self._trials) >= self._max_trials:
                    return Searcher.FINISHED
                else:
                    number = self._ask(self._next_point())
                self._ids[trial_id] = number
            return self._config(self._ids[trial_id])

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            number = self._ids.get(trial_id)
            if number is None or self._finished(number) or isinstance(self._metric, list):
                return  # Optuna keeps intermediate values for single-objective studies only
            value, step = result.get(self._metric), result.get("training_iteration")
            rec = self._trials[number]
            if value is None or step is None or int(step) in rec["intermediate"]:
                return
            _ = self.study  # first: a rebuild fills self._live
            self._live[number].report(float(value), int(step))
            rec["intermediate"][int(step)] = float(value)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            from optuna.trial import TrialState

            number = self._ids.get(trial_id)
            if number is None or self._finished(number):
                return
            metrics = self._metric if isinstance(self._metric, list) else [self._metric]
            values = None
            if result and not error and result.get("final"):  # not final: stopped early (PRUNED)
                values = [result.get(m) for m in metrics]
                values = None if any(v is None for v in values) else [float(v) for v in values]
            state = (TrialState.COMPLETE if values is not None
                     else TrialState.FAIL if error else TrialState.PRUNED)
            self._tell(number, values, state, diverged=bool(values and result.get("diverged")))

        def reconcile(self, trials: Mapping[str, Mapping]) -> None:
            """Align this (restored) searcher with Tune's trial snapshot ``trials``.

            Tune writes its trial snapshot and the searcher's one after the other, so a
            killed driver can leave either a moment older. Trials Tune knows but the
            searcher does not are adopted under their own params (numbers follow on; a
            pending seed point counts as drawn); trials Tune finished are told their last
            result; trials the searcher handed out but Tune never recorded are orphans,
            handed out again by :meth:`suggest`.
            """
            ordered = sorted(trials.items(), key=lambda kv: kv[1]["config"].get(NUMBER_KEY, math.inf))
            for trial_id, trial in ordered:
                if trial_id not in self._ids:
                    self._next_point()  # the seeds are the first trials: this one took the next
                    self._ids[trial_id] = self._ask(_flat(trial["config"]))
                if trial["status"] in ("TERMINATED", "ERROR"):
                    self.on_trial_complete(trial_id, trial["last_result"] or None,
                                           error=trial["status"] == "ERROR")
            unknown = [t for t, n in self._ids.items() if t not in trials and not self._finished(n)]
            self._orphans = sorted(set(self._orphans) | {self._ids.pop(t) for t in unknown})

    OptunaSearcher.__module__ = __name__
    OptunaSearcher.__qualname__ = "OptunaSearcher"  # pickled by reference, through __getattr__ below
    return OptunaSearcher


def __getattr__(name: str):
    if name == "OptunaSearcher":  # Ray is imported on first use only
        return _optuna_search_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail fast on a HOST:PORT nobody listens on (ray.init would retry for minutes)."""
    import socket

    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout).close()
    except OSError as exc:
        raise AutopruneError(f"cannot reach a Ray cluster at --address {address} ({exc.strerror or exc}); "
                             "start one with 'ray start --head --port PORT' or use --address auto "
                             "for a cluster on this machine") from None


@contextmanager
def _ray_session(address: str | None, num_cpus: int, progress: bool) -> Iterator[dict]:
    """Join ``address`` or start a local Ray (dashboard off, loopback); stop what we started."""
    import ray

    if ray.is_initialized():
        yield {"address": "existing", "started": False}
        return
    if address:
        try:
            ray.init(address=address, log_to_driver=progress, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise AutopruneError(f"cannot join the Ray cluster at --address {address}: {exc}; "
                                 "start one with 'ray start --head' (see autoprune.search.tune)") from None
        info = {"address": address, "started": False}
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # address="local": a Ray of our own even if a cluster (or RAY_ADDRESS) is around
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=progress, configure_logging=False)
        info = {"address": "local", "started": True}
    try:
        yield info
    finally:
        ray.shutdown()


def _gpus_available(local: bool) -> bool:
    import ray
    if local:
        return torch.cuda.is_available()
    return ray.cluster_resources().get("GPU", 0) > 0


# --------------------------------------------------------------------------- trials table


def _flat(config: Mapping, prefix: str = "") -> dict:
    """Tune's nested config back to Optuna's flat names (``ratio/layer1``); ``_number`` dropped."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if name == NUMBER_KEY:
            continue
        if isinstance(value, Mapping):
            out.update(_flat(value, name + "/"))
        else:
            out[name] = value
    return out


def trial_row(trial_id: str, config: Mapping, metrics: Mapping | None, error: str | None = None) -> dict:
    """One trials-table entry from a Tune trial's config, last result and error."""
    m = dict(metrics or {})
    if error:
        state = "ERROR"
    elif not m or "proxy_score" not in m:
        state = "INCOMPLETE"
    elif m.get("diverged"):
        state = "FAIL"
    elif m.get("final"):
        state = "COMPLETE"
    else:
        state = "PRUNED"
    number = config.get(NUMBER_KEY, m.get("number"))
    score = m.get("proxy_score")
    return {"number": None if number is None else int(number), "trial_id": trial_id, "state": state,
            "flops": m.get("flops"), "params": m.get("params"),
            "proxy_score": None if score is None else float(score),
            "proxy_steps": m.get("proxy_steps"), "budget_scale": m.get("budget_scale"),
            "node": m.get("node"), "config": _flat(config),
            "started_at": m.get("started_at"), "time_s": m.get("time_trial_s"),
            "compute_s": m.get("time_compute_s"), "replayed": bool(m.get("replayed", False)),
            "error": error or m.get("error") or None}


def trials_table(rows: Iterable[dict]) -> list[dict]:
    """Rows ordered by trial number (trials without one last, by id)."""
    return sorted(rows, key=lambda r: (r["number"] is None, r["number"] if r["number"] is not None else 0,
                                       r["trial_id"]))


def _same_params(config: Mapping, point: Mapping) -> bool:
    for key, value in point.items():
        have = config.get(key)
        if isinstance(value, float) or isinstance(have, float):
            if have is None or not math.isclose(float(have), float(value), rel_tol=1e-9, abs_tol=1e-12):
                return False
        elif have != value:
            return False
    return True


def mark_seeds(rows: list[dict], seeds: Mapping[str, Mapping]) -> list[dict]:
    """Set ``seed_of`` (e.g. "uniform", "greedy") on the trial each enqueued point became.

    The enqueued points are the first trials Optuna hands out, in order, so seed ``i`` is
    the trial numbered ``i`` when its params match (else the lowest-numbered match).
    """
    for i, (name, point) in enumerate(seeds.items()):
        match = [r for r in rows if r["number"] == i and _same_params(r["config"], point)]
        match = match or [r for r in rows if "seed_of" not in r and _same_params(r["config"], point)]
        if match:
            match[0]["seed_of"] = name
    return rows


def best_trial(rows: Sequence[dict]) -> dict | None:
    """The COMPLETE trial with the highest proxy score (ties: fewer FLOPs, then lower number)."""
    done = [r for r in rows if r["state"] == "COMPLETE" and r["proxy_score"] is not None]
    if not done:
        return None
    return max(done, key=lambda r: (r["proxy_score"], -(r["flops"] or 0), -(r["number"] or 0)))


def pareto_front(rows: Sequence[dict]) -> list[dict]:
    """COMPLETE trials no other beats on both proxy score (higher) and FLOPs (lower)."""
    done = [r for r in rows if r["state"] == "COMPLETE" and r["proxy_score"] is not None]
    front = []
    for r in done:
        dominated = any(o["proxy_score"] >= r["proxy_score"] and o["flops"] <= r["flops"]
                        and (o["proxy_score"] > r["proxy_score"] or o["flops"] < r["flops"])
                        for o in done)
        if not dominated:
            front.append(r)
    return sorted(front, key=lambda r: r["flops"])


def rebuild_study(rows: Sequence[dict], spec: SearchSpace, space: Space):
    """An in-memory Optuna study holding the COMPLETE trials of the table (for importances).

    Distributions come from replaying the space's define-by-run function on each trial's
    params (``optuna.trial.FixedTrial``).
    """
    import optuna

    names, modes = spec.metrics()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize" if m == "max" else "minimize" for m in modes])
    define = spec.define(space)
    for r in rows:
        if r["state"] != "COMPLETE":
            continue
        fixed = optuna.trial.FixedTrial(dict(r["config"]))
        define(fixed)
        values = [float(r[n]) for n in names]
        study.add_trial(optuna.trial.create_trial(params=fixed.params, distributions=fixed.distributions,
                                                  values=values))
    return study


def importances(rows: Sequence[dict], spec: SearchSpace, space: Space,
                seed: int = 0) -> tuple[dict | None, str]:
    """Optuna's fANOVA importances of the params for the proxy score, or None and why not."""
    import optuna

    study = rebuild_study(rows, spec, space)
    if len(study.trials) < 2:
        return None, f"needs at least 2 complete trials, have {len(study.trials)}"
    if not study.trials[0].params:
        return None, "the search space has no variables"
    try:
        result = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=seed),
            target=lambda t: t.values[0])
    except (RuntimeError, ValueError) as exc:
        return None, f"optuna.importance failed: {exc}"
    return {k: float(v) for k, v in result.items()}, ""


# --------------------------------------------------------------------------- driver


def _spec(space: "str | os.PathLike | SearchSpace") -> SearchSpace:
    return space if isinstance(space, SearchSpace) else load(space)


def _write_space(spec: SearchSpace, path: Path) -> None:
    """The validated space as YAML (loadable by :func:`~.space.load`)."""
    import yaml

    from ..checkpoint import atomic_write_text
    data = {k: v for k, v in spec.as_dict().items() if k not in ("name", "path") and v is not None}
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def _calibration(spec: SearchSpace, num_classes: int) -> list:
    """Calibration specs for the space's criteria and HPSE/FCHP clusters (once per run)."""
    from .. import criteria as _criteria

    specs = []
    for name in spec.criteria:
        if _criteria.get(name).taps():
            specs.append((name, {"num_classes": num_classes}) if name == "di" else name)
    c = spec.clusters
    if c is not None and c.method in ("hpse", "fchp") and c.method not in spec.criteria:
        specs.append(c.method)
    if c is not None and c.method == "hpse" and c.k:
        specs = [s for s in specs if s != "hpse"] + [("hpse", {"k": int(c.k[0])})]
    return specs


def driver_state(model: nn.Module, data: DataBundle, spec: SearchSpace, budget: Budget, seed: int,
                  calib_images: int, progress: bool, device) -> tuple[Space, dict, dict | None]:
    """Space, per-criterion scores and per-k cluster labels, computed once."""
    from ..calibrate import calibrate
    from ..criteria import score
    from ..criteria.base import Stats
    from ..data import loader

    space = Space(model, torch.zeros(1, *data.input_shape, device=device))
    budget.target(space)
    spec.variables(space)  # ties that match no unit fail here, before calibration
    specs = _calibration(spec, data.num_classes)
    stats = (calibrate(space, model, loader(data.train, batch_size=64, shuffle=True, seed=seed), specs,
                       n_images=calib_images, device=device, progress=progress) if specs else Stats())
    scores = {name: _cpu(score(name, space, stats, **({"num_classes": data.num_classes} if name == "di" else {})))
              for name in spec.criteria}
    labels = None
    if spec.clusters is not None:
        choices = list(spec.clusters.k) if spec.clusters.k else [None]
        labels = {k: grouping.cluster(spec.clusters.method, space, stats, k, seed=seed) for k in choices}
    return space, scores, labels


def _seed_points(space: Space, spec: SearchSpace, budget: Budget, scores: Mapping,
                 progress: bool) -> dict[str, dict]:
    """Search params of the uniform and the greedy structures at the budget."""
    from ..prune import choose_widths

    greedy_by = "di" if "di" in spec.criteria else spec.criteria[0]
    points = {}
    for name, crit_scores in (("uniform", None), ("greedy", scores[greedy_by])):
        widths, _ = choose_widths(name, space, budget, crit_scores, None, progress=progress)
        ratios = {u.name: 1.0 - widths[u.name] / u.width for u in space.units}
        points[name] = spec.params_for(ratios, space)
    return points


def _resources(workers: int, cpus_per_trial: float, gpus: bool) -> dict:
    return {"cpu": cpus_per_trial, "gpu": (1.0 / workers if workers > 1 else 1.0) if gpus else 0.0}


def _check_inputs(trials: int, workers: int, spec: SearchSpace) -> None:
    """AutopruneError for settings the runner cannot use; a warning for a doubtful mix."""
    if trials < 1 or workers < 1:
        raise AutopruneError(f"need trials >= 1 and workers >= 1, got trials={trials}, workers={workers}")
    if trials < 2:
        raise AutopruneError("need at least 2 trials: the first two are the uniform and greedy seeds")
    if spec.asha and spec.proxy.finetune_steps < spec.asha.grace_period:
        raise AutopruneError(f"{spec.label}: asha.grace_period ({spec.asha.grace_period} steps) exceeds "
                             f"proxy.finetune_steps ({spec.proxy.finetune_steps}); ASHA counts proxy "
                             "fine-tuning steps")
    if spec.asha and spec.objective == "accuracy_flops":
        warnings.warn(f"{spec.label}: ASHA stops trials by proxy score alone, so with objective "
                      "accuracy_flops it favours the larger structures and thins out the Pareto front; "
                      "consider leaving asha off", stacklevel=3)


def _error_line(error: BaseException | None) -> str | None:
    if error is None:
        return None
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1].strip() if lines else ''}"


def _results(grid) -> list[dict]:
    """Raw trial rows from Tune's ResultGrid (last result, config and error per trial)."""
    rows = []
    for r in grid:
        metrics = dict(r.metrics or {})
        trial_id = metrics.get("trial_id") or Path(r.path).name.removeprefix("trial_")
        rows.append(trial_row(trial_id, r.config or {}, metrics, _error_line(r.error)))
    return rows


def search(model: nn.Module, data: DataBundle, budget: "str | Budget" = "flops<=50%",
           space: "str | os.PathLike | SearchSpace" = DEFAULT_SPACE, trials: int = 64, workers: int = 2,
           address: str | None = None, out: "str | os.PathLike | None" = None, resume: bool = False,
           finetune_epochs: int = 5, lr: float = 0.01, distill: bool = False, seed: int = 0,
           calib_images: int = 512, bn_batches: int = 50, cpus_per_trial: float = 1,
           max_failures: int = 2, progress: bool = True, device=None,
           inputs: Mapping | None = None):
    """Search ``trials`` structures meeting ``budget`` and fine-tune the best; see the module doc.

    ``space``: a packaged search-space name, a YAML path or a :class:`SearchSpace`.
    ``workers`` trials run at once, each on ``cpus_per_trial`` CPUs and ``1/workers`` of a
    GPU where the cluster has GPUs; a crashed trial is retried ``max_failures`` times.
    ``address`` joins a running Ray cluster ("auto" or HOST:PORT); without it a local Ray
    is started and stopped. ``out`` holds the Tune experiment (``out/tune``) and the
    outputs (a temporary folder, removed afterwards, if None); ``resume=True`` continues
    the search in ``out`` with the settings recorded there (``budget``, ``space``,
    ``trials``, ``workers`` and ``seed`` given here are then ignored).
    ``finetune_epochs``/``lr``/``distill``/``bn_batches`` are the final fine-tune of the
    best structure, as in :func:`autoprune.prune`. Stopped early (Ctrl-C), it raises
    KeyboardInterrupt naming how to resume, and writes no model or report; AutopruneError
    if Tune ends early without an interrupt, or ``out/search.json`` is malformed on resume. ``inputs`` are recorded in
    ``search.json`` (the CLI stores how to rebuild model and data for ``--resume``).
    Returns :class:`autoprune.prune.Result`; ``result.report`` is report.json.
    """
    start = time.time()
    if resume and out is None:
        raise AutopruneError("resume=True needs out= (the folder of the search to continue)")
    if address:
        _check_reachable(address)
    temp = tempfile.mkdtemp(prefix="autoprune-search-") if out is None else None
    try:
        run = _settings(Path(out if out is not None else temp).resolve(), resume, space, budget,
                        trials, workers, seed)
        return _search(run, model, data, address, finetune_epochs, lr, distill, calib_images,
                       bn_batches, cpus_per_trial, max_failures, progress, device, inputs, start)
    except KeyboardInterrupt as exc:
        if temp is None and str(exc):  # Tune saved its state: say how to continue
            raise KeyboardInterrupt(f"{exc}; continue with: autoprune search --resume {out} "
                                    "(search(..., resume=True))") from None
        raise
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


@dataclass
class _Run:
    """One search's settings: given, or read back from ``out`` on resume."""

    out: Path
    resume: bool
    spec: SearchSpace
    budget: Budget
    trials: int
    workers: int
    seed: int
    seeds: dict | None = None  # the enqueued params; recorded on the first run

    @property
    def experiment(self) -> Path:
        return self.out / TUNE_DIR


def _settings(out: Path, resume: bool, space, budget, trials: int, workers: int, seed: int) -> _Run:
    from ray import tune

    if resume:
        saved = read_settings(out) if (out / SETTINGS_FILE).is_file() else None
        if saved is None or not tune.Tuner.can_restore(str(out / TUNE_DIR)):
            raise AutopruneError(f"{out} holds no search to resume (no {SETTINGS_FILE} and {TUNE_DIR}/ "
                                 "experiment state); start one with autoprune search --out DIR")
        spec = load(out / SPACE_FILE)
        spec.name = saved.get("space") or spec.name
        run = _Run(out, True, spec, saved["budget"], saved["trials"], saved["workers"], saved["seed"],
                   saved["seeds"])
    else:
        if (out / TUNE_DIR).exists() and any((out / TUNE_DIR).iterdir()):
            raise AutopruneError(f"{out} already holds a search; continue it with --resume {out} "
                                 "(resume=True) or choose another --out")
        run = _Run(out, False, _spec(space), Budget.parse(budget), int(trials), int(workers), int(seed))
    _check_inputs(run.trials, run.workers, run.spec)
    return run


def _budget_json(budget: Budget) -> dict:
    """The budget as numbers (exact, unlike its text form)."""
    return {"kind": budget.kind, "value": budget.value, "relative": budget.relative}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _settings_budget(value: Any) -> Budget | None:
    """search.json's budget: {kind, value, relative} or (older runs) text like 'flops<=50%'."""
    from ..budget import KINDS

    if isinstance(value, str):
        try:
            return Budget.parse(value)
        except AutopruneError:
            return None
    if not isinstance(value, Mapping) or set(value) != {"kind", "value", "relative"}:
        return None
    kind, number, relative = value["kind"], value["value"], value["relative"]
    if (kind not in KINDS or not isinstance(relative, bool) or isinstance(number, bool)
            or not isinstance(number, (int, float)) or not 0 < number < math.inf or (relative and number > 1)):
        return None
    return Budget(kind, float(number), relative)


def read_settings(out: "str | os.PathLike") -> dict:
    """``out/search.json`` validated: budget (a :class:`~autoprune.budget.Budget`), trials,
    workers, seed, seeds, space and inputs. AutopruneError naming the key if it is missing
    or wrong (such a search cannot be continued)."""
    path = Path(out) / SETTINGS_FILE
    fix = "this search cannot be continued; start a new one with autoprune search --out DIR"
    try:
        saved = json.loads(path.read_text())
    except OSError as exc:
        raise AutopruneError(f"{out} holds no search to resume (cannot read {SETTINGS_FILE}: "
                             f"{exc.strerror or exc}); start one with autoprune search --out DIR") from None
    except ValueError:
        raise AutopruneError(f"{path} is not valid JSON; {fix}") from None
    if not isinstance(saved, dict):
        raise AutopruneError(f"{path} must hold a JSON object, got {short(saved)}; {fix}")
    checks = {
        "budget": ("a budget {kind, value, relative} or text like 'flops<=50%'",
                   lambda v: _settings_budget(v) is not None),
        "trials": ("an int >= 2", lambda v: _is_int(v) and v >= 2),
        "workers": ("an int >= 1", lambda v: _is_int(v) and v >= 1),
        "seed": ("an int >= 0", lambda v: _is_int(v) and v >= 0),
        "seeds": ("a mapping of seed name to params",
                  lambda v: isinstance(v, dict) and all(isinstance(p, dict) for p in v.values())),
    }
    for key, (allowed, ok) in checks.items():
        if key not in saved:
            raise AutopruneError(f"{path}: '{key}' is missing (it must be {allowed}); {fix}")
        if not ok(saved[key]):
            raise AutopruneError(f"{path}: '{key}' must be {allowed}, got {short(saved[key])}; {fix}")
    for key, kind in (("space", str), ("inputs", dict)):
        if saved.get(key) is not None and not isinstance(saved[key], kind):
            raise AutopruneError(f"{path}: '{key}' must be a {'string' if kind is str else 'mapping'}, "
                                 f"got {short(saved[key])}; {fix}")
    return {**saved, "budget": _settings_budget(saved["budget"])}


def _record(run: _Run, inputs: Mapping | None) -> None:
    """search.json and space.yaml: everything --resume needs besides model and data."""
    from ..checkpoint import atomic_write_text

    run.out.mkdir(parents=True, exist_ok=True)
    _write_space(run.spec, run.out / SPACE_FILE)
    atomic_write_text(run.out / SETTINGS_FILE, json.dumps(
        {"format": "autoprune-search/1", "budget": _budget_json(run.budget), "space": run.spec.name,
         "trials": run.trials, "workers": run.workers, "seed": run.seed, "seeds": run.seeds,
         "inputs": dict(inputs or {})}, indent=1, default=str))


def _search(run: _Run, model, data, address, finetune_epochs, lr, distill, calib_images, bn_batches,
            cpus_per_trial, max_failures, progress, device, inputs, start):
    from ray import tune

    from ..checkpoint import write_json
    from ..prune import Result, _finish, write_outputs

    spec, budget, seed = run.spec, run.budget, run.seed
    torch.manual_seed(seed)
    device = torch.device(device) if device else evaluate.default_device()
    model = model.to(device).eval()
    space, scores, labels = driver_state(model, data, spec, budget, seed, calib_images, progress, device)
    if not run.resume:
        run.seeds = _seed_points(space, spec, budget, scores, progress)
        _record(run, inputs)
    cpu_model = copy.deepcopy(model).cpu().eval()
    shared = Shared(cpu_model, _shippable_space(space, cpu_model), spec, budget, scores, labels,
                    data, seed, threads=max(1, int(cpus_per_trial)), experiment_dir=str(run.experiment))
    names, modes = spec.metrics()
    with _ray_session(address, num_cpus=max(1, math.ceil(run.workers * cpus_per_trial)),
                      progress=progress) as ray_info:
        resources = _resources(run.workers, cpus_per_trial, _gpus_available(ray_info["started"]))
        trainable = tune.with_resources(tune.with_parameters(_trainable, shared=shared), resources)
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # state snapshots at most 1 s old
        t_fit, cpu_fit = time.time(), time.process_time()
        with _sigint_watch() as interrupted:
            if run.resume:
                tuner = _resumed_tuner(trainable, spec.define(space), run, max_failures, progress)
            else:
                tuner = _new_tuner(trainable, spec.define(space), run, max_failures, progress)
            grid = tuner.fit()
            stopped = interrupted()
        fit_s, fit_cpu = time.time() - t_fit, time.process_time() - cpu_fit

    fields = trial_fields(_results(grid), run.seeds)
    rows, best = fields["trials"], fields["best_trial"]
    write_json(run.out / TRIALS_FILE, rows)
    finished = sum(r["state"] != "INCOMPLETE" for r in rows)
    if finished < run.trials:
        if stopped:  # Ctrl-C: Tune saved its state and stopped
            raise KeyboardInterrupt(f"search stopped after {finished} of {run.trials} trials")
        raise AutopruneError(f"Ray Tune ended the search after {finished} of {run.trials} trials without "
                             f"an interrupt (trial states: {fields['states'] or 'none'}); see "
                             f"{run.out / TRIALS_FILE}; try autoprune search --resume {run.out}")
    if best is None:
        raise AutopruneError(f"no trial of {len(rows)} finished with a score (states: "
                             f"{fields['states']}); see {run.out / TRIALS_FILE}")
    cand = spec.candidate(best["config"], space)
    plan, small, widths, _, _ = build_structure(
        Shared(model, space, spec, budget, scores, labels, data, seed), cand)
    plan.meta = {"method": "search", "criterion": cand.mix, "budget": str(budget), "seed": seed,
                 "trial": best["number"]}
    report = _finish(model, small, data, space, budget, widths, seed, finetune_epochs, lr, distill,
                     bn_batches, progress, device)
    if plan.selfgroup:  # the budget's realized cost is the self-grouped model's, not the widths'
        b = report["budget"]
        b["realized_channels"], b["realized"] = b["realized"], report["pruned"][b["kind"]]
        b["realized_ratio"] = b["realized"] / b["base"]
        b["within_tolerance"] = b["target"] * (1 - TOLERANCE) <= b["realized"] <= b["target"]
    imp, why = importances(rows, spec, space, seed)
    report.update(
        method="search", criterion=cand.mix, clusters=cand.cluster_method, seed=seed,
        candidate=cand.as_dict(), selfgroup=bool(plan.selfgroup), trajectory=[],
        trials=rows, best_trial=best, seeds=fields["seeds"], importances=imp,
        search={"space": spec.as_dict(), "objective": spec.objective, "metrics": names, "modes": modes,
                "trials_requested": run.trials, "workers": run.workers, "resources_per_trial": resources,
                "ray": ray_info["address"], "asha": dict(spec.asha) if spec.asha else None,
                "states": fields["states"], "nodes": fields["nodes"], "resumed": run.resume,
                "tune_started_at": t_fit, "tune_s": round(fit_s, 2), "driver_cpu_s": round(fit_cpu, 2),
                "importances_note": why, "experiment": str(run.experiment)},
        elapsed_s=round(time.time() - start, 2))
    from ..report import plot_history, plot_importances, plot_pareto
    extra = {TRIALS_FILE: lambda path: write_json(path, rows),
             "history.png": lambda path: plot_history(rows, path, title=f"search @ {budget}")}
    if imp:
        extra["importances.png"] = lambda path: plot_importances(imp, path)
    if spec.objective == "accuracy_flops":
        extra["pareto.png"] = lambda path: plot_pareto(rows, path, title=f"search @ {budget}")
    write_outputs(run.out, plan, small, report, extra=extra)  # one set, manifest.json last
    return Result(small, plan, report)


def trial_fields(rows: Iterable[dict], seeds: Mapping[str, Mapping]) -> dict:
    """The search part of report.json from raw trial rows: ``trials`` (ordered, seeds marked),
    ``best_trial``, ``seeds`` (each seed's number, state, proxy score, FLOPs, params),
    ``states`` (count per state) and ``nodes`` (distinct node ids)."""
    rows = mark_seeds(trials_table(rows), seeds)
    return {"trials": rows, "best_trial": best_trial(rows),
            "seeds": {name: _brief(next((r for r in rows if r.get("seed_of") == name), None))
                      for name in seeds},
            "states": _count_states(rows), "nodes": sorted({r["node"] for r in rows if r["node"]})}


def _new_tuner(trainable, define, run: _Run, max_failures: int, progress: bool, state: Mapping | None = None):
    """A fresh Tuner: OptunaSearcher (the YAML's sampler, seeds enqueued first), optional ASHA.
    With ``state`` (a saved searcher state) the searcher continues from it, handing out
    every trial it holds again first (see :meth:`OptunaSearcher.restart`)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    spec = run.spec
    names, modes = spec.metrics()
    single = len(names) == 1
    searcher = _optuna_search_class()(
        space=define, metric=names[0] if single else list(names), mode=modes[0] if single else list(modes),
        points_to_evaluate=[dict(p) for p in run.seeds.values()], sampler=spec.make_sampler, seed=run.seed,
        max_trials=run.trials)
    if state is not None:
        searcher.restart(state)
    scheduler = None
    if spec.asha:  # ASHA's time unit: proxy fine-tuning steps
        scheduler = ASHAScheduler(time_attr="proxy_steps", metric="proxy_score", mode="max",
                                  max_t=int(spec.proxy.finetune_steps),
                                  grace_period=int(spec.asha.grace_period),
                                  reduction_factor=float(spec.asha.reduction_factor))
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=run.trials,
                                    max_concurrent_trials=run.workers, reuse_actors=True,
                                    trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(run.out), verbose=1 if progress else 0,
                                  failure_config=tune.FailureConfig(max_failures=max_failures)))


def _tune_state_problem(experiment: Path) -> str | None:
    """Why Tune's newest experiment state in ``experiment`` cannot be restored (None: it can).

    A torn (truncated) or trial-less newest state is moved aside (``.unusable``), so that
    neither Tune nor a later resume picks it up again.
    """
    paths = sorted(experiment.glob(TUNE_STATE_GLOB))  # Tune restores the newest name
    if not paths:
        return "it holds no Tune experiment state"
    newest = paths[-1]
    trials = _read_snapshot(newest)
    if trials:
        return None
    why = "is truncated or unreadable" if trials is None else "records no trial"
    os.replace(newest, newest.with_name(newest.name + ".unusable"))
    return f"Tune's experiment state {newest.name} {why} (moved aside to {newest.name}.unusable)"


def _resumed_tuner(trainable, define, run: _Run, max_failures: int, progress: bool):
    """``Tuner.restore`` of the experiment in ``run.experiment``; if Tune's state there is torn,
    empty or not restorable, a new experiment in the same folder whose searcher continues
    from its own saved state (a warning says so)."""
    from ray import tune

    problem = _tune_state_problem(run.experiment)
    if problem is None:
        try:
            return tune.Tuner.restore(str(run.experiment), trainable=trainable, resume_unfinished=True,
                                      resume_errored=False, restart_errored=False)
        except Exception as exc:  # noqa: BLE001 - e.g. an unreadable tuner.pkl: fall back below
            problem = f"Ray Tune cannot restore it ({_error_line(exc)[:200]})"
    state = _newest_searcher_state(run.experiment)
    kept = len(state["trials"]) if state else 0
    warnings.warn(f"{run.experiment}: {problem}; continuing in a new Tune experiment there from the "
                  f"searcher's own record of {kept} trial(s): finished ones report their saved result "
                  "again, the others run again", stacklevel=3)
    return _new_tuner(trainable, define, run, max_failures, progress, state=state)


@contextmanager
def _sigint_watch() -> Iterator[Callable[[], bool]]:
    """Yields a function telling whether SIGINT (Ctrl-C) arrived while the block ran.

    Ray Tune catches the first SIGINT itself (it saves its state, stops and puts back the
    handler it found), so a handler is installed first: it notes a SIGINT that reaches it
    (and acts as the previous handler), and finding it back in place after ``fit`` means
    Tune's handler fired. The previous handler is restored at the end.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.getsignal(signal.SIGINT)
    seen: list[int] = []

    def handler(signum, frame):
        seen.append(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            raise KeyboardInterrupt

    tune_catches = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0").strip() in ("", "0")
    signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(seen) or (tune_catches and signal.getsignal(signal.SIGINT) is handler)
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def _brief(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {k: row[k] for k in ("number", "state", "proxy_score", "flops", "params")}


def _count_states(rows: Sequence[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return counts
