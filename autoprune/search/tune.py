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
4. **Sampler.** :class:`OptunaSearcher` (Ray's ``OptunaSearch`` with the YAML's
   sampler) tells Optuna only *final* scores: a trial that ASHA stopped early is told
   as PRUNED, never as if its truncated score were final. A trial whose proxy
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

With objective ``accuracy_flops`` ASHA still ranks trials by proxy score alone, so it
stops the smaller structures first and thins out the Pareto front (a warning says so).

Ray: by default autoprune starts a local Ray (dashboard off, bound to 127.0.0.1,
``RAY_AUTH_MODE=disabled`` unless set) and stops it at the end. ``address=`` /
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
from ..errors import AutopruneError
from ..plan import Plan, select
from ..space import Space
from .space import Candidate, SearchSpace, load

__all__ = ["PENALTY", "STATES", "OptunaSearcher", "Shared", "best_trial", "evaluate_candidate",
           "driver_state", "importances", "mark_seeds", "pareto_front", "rebuild_study", "rungs", "search",
           "trial_fields", "trial_row", "trials_table"]

PENALTY = -1.0
"""``proxy_score`` a diverged trial reports: finite (samplers and Tune handle it) and below
every real accuracy, so a diverged structure never ranks above a trained one."""

STATES = ("COMPLETE", "PRUNED", "FAIL", "ERROR", "INCOMPLETE")
"""Trial states in the report: COMPLETE (final proxy score), PRUNED (stopped early by ASHA;
its score is from a lower rung), FAIL (proxy fine-tune diverged: PENALTY), ERROR (crashed
after every retry), INCOMPLETE (never finished)."""

DEFAULT_SPACE = "resnet_cifar"
TUNE_DIR = "tune"              # the Tune experiment, under --out
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
    budget: str
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


def _finished_result(experiment_dir: str | None, trial_id: str) -> dict | None:
    """The final result this trial already reported (in its result.json), if any."""
    if not experiment_dir:
        return None
    path = Path(experiment_dir) / f"trial_{trial_id}" / "result.json"
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("final"):
            return {k: row[k] for k in METRIC_KEYS if k in row}
    return None


def _trainable(config: dict, shared: Shared | None = None) -> None:
    """The Ray Tune function trainable: one candidate, reported with ``ray.tune.report``."""
    import ray
    from ray import tune

    torch.set_num_threads(max(1, int(shared.threads)))
    node = ray.get_runtime_context().get_node_id()
    number = config.get(NUMBER_KEY)
    done = _finished_result(shared.experiment_dir, tune.get_context().get_trial_id())
    if done is not None:  # finished before the driver died, after Tune's last snapshot
        tune.report({**done, "replayed": True})
        return
    evaluate_candidate(shared, config, report=lambda m: tune.report({**m, "node": node, "number": number}))


def _tune_snapshot(directory: Path) -> dict[str, dict] | None:
    """Tune's newest trial snapshot in ``directory``: trial id → {config, status, last_result}."""
    paths = sorted(directory.glob("experiment_state-*.json"))
    if not paths:
        return None
    try:
        state = json.loads(paths[-1].read_text())
        trials = {}
        for trial_json, runtime_json in state["trial_data"]:
            trial, runtime = json.loads(trial_json), json.loads(runtime_json)
            trials[trial["trial_id"]] = {"config": trial.get("config") or {}, "status": trial.get("status"),
                                         "last_result": runtime.get("last_result") or {}}
        return trials
    except (OSError, ValueError, KeyError, TypeError):
        return None


@functools.lru_cache(maxsize=None)
def _optuna_search_class():
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class OptunaSearcher(OptunaSearch):
        """Ray's OptunaSearch telling Optuna only final scores, and exact on resume.

        Adds the Optuna trial number to each config (``_number``); a trial stopped by the
        scheduler before its final rung is told as PRUNED (its truncated score is never a
        final value); a diverged trial is told its penalty and tagged ``diverged``.
        ``max_trials`` caps the Optuna trials handed out, so a resumed search never draws
        more than requested. On restore the searcher is reconciled with Tune's trial
        snapshot (:meth:`reconcile`).
        """

        def __init__(self, *args, max_trials: int | None = None, **kwargs):
            super().__init__(*args, **kwargs)
            self._max_trials = max_trials
            self._orphans: list = []

        def suggest(self, trial_id: str):
            if trial_id not in self._ot_trials:
                if self._orphans:  # drawn before the kill, unknown to Tune: hand it out again
                    self._ot_trials[trial_id] = self._orphans.pop(0)
                elif self._max_trials is not None and len(self._ot_study.get_trials(deepcopy=False)) >= self._max_trials:
                    return Searcher.FINISHED
            config = super().suggest(trial_id)
            if isinstance(config, dict) and trial_id in self._ot_trials:
                config[NUMBER_KEY] = self._ot_trials[trial_id].number
            return config

        def on_trial_result(self, trial_id: str, result: dict):
            if trial_id in self._ot_trials:
                super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            if trial_id not in self._ot_trials:
                return
            if result and not error:
                if not result.get("final"):
                    result = None  # stopped early: PRUNED
                elif result.get("diverged"):
                    self._ot_trials[trial_id].set_user_attr("diverged", True)
            super().on_trial_complete(trial_id, result=result, error=error)

        def restore(self, checkpoint_path: str):
            super().restore(checkpoint_path)
            self.__dict__.setdefault("_orphans", [])
            snapshot = _tune_snapshot(Path(checkpoint_path).parent)
            if snapshot is not None:
                self.reconcile(snapshot)

        def reconcile(self, trials: Mapping[str, Mapping]) -> None:
            """Align this (restored) searcher with Tune's trial snapshot ``trials``.

            Tune writes its trial snapshot and the searcher's one after the other, so a
            killed driver can leave either a moment older. Trials Tune knows but the
            searcher does not are adopted under their own params (numbers follow on);
            trials Tune finished are told their last result; trials the searcher handed
            out but Tune never recorded are orphans, handed out again by :meth:`suggest`.
            """
            from optuna.trial import TrialState

            by_number = sorted(trials.items(), key=lambda kv: kv[1]["config"].get(NUMBER_KEY, math.inf))
            for trial_id, trial in by_number:
                if trial_id not in self._ot_trials:
                    queued = self._ot_study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
                    if not queued:  # else the next queued point (a seed, in order) is this trial's
                        self._ot_study.enqueue_trial(_flat(trial["config"]), skip_if_exists=False)
                    self._ot_trials[trial_id] = self._ot_study.ask()
                    self._suggest_from_define_by_run_func(self._space, self._ot_trials[trial_id])
                if trial["status"] in ("TERMINATED", "ERROR") and trial_id not in self._completed_trials:
                    self.on_trial_complete(trial_id, trial["last_result"] or None,
                                           error=trial["status"] == "ERROR")
            orphans = [t for t in self._ot_trials if t not in trials and t not in self._completed_trials]
            self._orphans = sorted((self._ot_trials.pop(t) for t in orphans), key=lambda ot: ot.number)

    return OptunaSearcher


def OptunaSearcher(*args, **kwargs):
    """An instance of the OptunaSearch subclass above (Ray is imported lazily)."""
    return _optuna_search_class()(*args, **kwargs)


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
        ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
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
    KeyboardInterrupt naming how to resume, and writes no model or report. ``inputs`` are recorded in
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
        path = out / SETTINGS_FILE
        if not path.is_file() or not tune.Tuner.can_restore(str(out / TUNE_DIR)):
            raise AutopruneError(f"{out} holds no search to resume (no {SETTINGS_FILE} and {TUNE_DIR}/ "
                                 "experiment state); start one with autoprune search --out DIR")
        saved = json.loads(path.read_text())
        spec = load(out / SPACE_FILE)
        spec.name = saved.get("space", spec.name)
        run = _Run(out, True, spec, Budget.parse(saved["budget"]), int(saved["trials"]),
                   int(saved["workers"]), int(saved["seed"]), saved["seeds"])
    else:
        if (out / TUNE_DIR).exists() and any((out / TUNE_DIR).iterdir()):
            raise AutopruneError(f"{out} already holds a search; continue it with --resume {out} "
                                 "(resume=True) or choose another --out")
        run = _Run(out, False, _spec(space), Budget.parse(budget), int(trials), int(workers), int(seed))
    _check_inputs(run.trials, run.workers, run.spec)
    return run


def _record(run: _Run, inputs: Mapping | None) -> None:
    """search.json and space.yaml: everything --resume needs besides model and data."""
    from ..checkpoint import atomic_write_text

    run.out.mkdir(parents=True, exist_ok=True)
    _write_space(run.spec, run.out / SPACE_FILE)
    atomic_write_text(run.out / SETTINGS_FILE, json.dumps(
        {"format": "autoprune-search/1", "budget": str(run.budget), "space": run.spec.name,
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
    shared = Shared(cpu_model, _shippable_space(space, cpu_model), spec, str(budget), scores, labels,
                    data, seed, threads=max(1, int(cpus_per_trial)), experiment_dir=str(run.experiment))
    names, modes = spec.metrics()
    with _ray_session(address, num_cpus=max(1, math.ceil(run.workers * cpus_per_trial)),
                      progress=progress) as ray_info:
        resources = _resources(run.workers, cpus_per_trial, _gpus_available(ray_info["started"]))
        trainable = tune.with_resources(tune.with_parameters(_trainable, shared=shared), resources)
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # state snapshots at most 1 s old
        t_fit, cpu_fit = time.time(), time.process_time()
        if run.resume:
            tuner = tune.Tuner.restore(str(run.experiment), trainable=trainable, resume_unfinished=True,
                                       resume_errored=False, restart_errored=False)
        else:
            tuner = _new_tuner(trainable, spec.define(space), run, max_failures, progress)
        grid = tuner.fit()
        fit_s, fit_cpu = time.time() - t_fit, time.process_time() - cpu_fit

    fields = trial_fields(_results(grid), run.seeds)
    rows, best = fields["trials"], fields["best_trial"]
    write_json(run.out / TRIALS_FILE, rows)
    finished = sum(r["state"] != "INCOMPLETE" for r in rows)
    if finished < run.trials:  # Tune ends a run early only when stopped (Ctrl-C, SIGTERM)
        raise KeyboardInterrupt(f"search stopped after {finished} of {run.trials} trials")
    if best is None:
        raise AutopruneError(f"no trial of {len(rows)} finished with a score (states: "
                             f"{fields['states']}); see {run.out / TRIALS_FILE}")
    cand = spec.candidate(best["config"], space)
    plan, small, widths, _, _ = build_structure(
        Shared(model, space, spec, str(budget), scores, labels, data, seed), cand)
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
    write_outputs(run.out, plan, small, report)
    from ..report import plot_history, plot_importances, plot_pareto
    plot_history(rows, run.out / "history.png", title=f"search @ {budget}")
    if imp:
        plot_importances(imp, run.out / "importances.png")
    if spec.objective == "accuracy_flops":
        plot_pareto(rows, run.out / "pareto.png", title=f"search @ {budget}")
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


def _new_tuner(trainable, define, run: _Run, max_failures: int, progress: bool):
    """A fresh Tuner: OptunaSearcher (the YAML's sampler, seeds enqueued first), optional ASHA."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    spec = run.spec
    names, modes = spec.metrics()
    single = len(names) == 1
    searcher = OptunaSearcher(space=define, metric=names[0] if single else list(names),
                              mode=modes[0] if single else list(modes),
                              points_to_evaluate=[dict(p) for p in run.seeds.values()],
                              sampler=spec.make_sampler(run.seed), max_trials=run.trials)
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


def _brief(row: dict | None) -> dict | None:
    if row is None:
        return None
    return {k: row[k] for k in ("number", "state", "proxy_score", "flops", "params")}


def _count_states(rows: Sequence[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return counts
