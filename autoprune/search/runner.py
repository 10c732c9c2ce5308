"""A whole search: settings, driver state, the Tuner, and the best structure's outputs.

:func:`search` parses its inputs once and records them in ``OUT/search.json`` (read back,
checked, by :func:`read_settings` on resume); :func:`driver_state` computes the Space,
calibration, per-criterion scores and cluster labels once; Tune runs the trials from the
uniform and greedy seeds; the best trial's structure is fine-tuned and written like
``autoprune prune`` writes. The steps are told in :mod:`autoprune.search`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .. import evaluate, grouping
from ..budget import KINDS, Budget
from ..data import DataBundle
from ..errors import AutopruneError, short
from ..json_file import read_json
from ..methods import Context, get as get_method
from ..methods.search import Search
from ..pipeline import (Result, calibration_batches, calibration_specs, compute_record, criterion_scores, finish,
                        run_settings, write_outputs)
from ..space import Space
from .clock import SearchClock
from .ray_tune import (check_reachable, error_line, gpus_available, ray_session, resources, result_rows,
                       sigint_watch, trainable, trial_dirname, tune_state_problem)
from .searcher import newest_searcher_state, optuna_search_class
from .space import SearchSpace, load
from .trial import Shared, build_structure
from .trials import importances, trial_fields

__all__ = ["DEFAULT_SPACE", "SETTINGS_FILE", "SPACE_FILE", "TRIALS_FILE", "TUNE_DIR", "arm_space", "driver_state",
           "read_settings", "search", "search_settings", "space_digest"]

DEFAULT_SPACE = "resnet_cifar"
TUNE_DIR = "tune"              # the Tune experiment, under --out
SETTINGS_FILE = "search.json"  # what --resume needs to rebuild the driver side
SPACE_FILE = "space.yaml"      # the validated search space, so a resume does not depend on the original file
TRIALS_FILE = "trials.json"    # the trials table, written before the final fine-tune


def search(model: nn.Module, data: DataBundle, budget: "str | Budget" = "flops<=50%",
           space: "str | os.PathLike | SearchSpace" = DEFAULT_SPACE, trials: int = 64, workers: int = 2,
           address: str | None = None, out: "str | os.PathLike | None" = None, resume: bool = False,
           finetune_epochs: int = 5, lr: float = 0.01, distill: bool = False, seed: int = 0,
           calib_images: int = 512, bn_batches: int = 50, cpus_per_trial: float = 1,
           max_failures: int = 2, progress: bool = True, device=None,
           inputs: Mapping | None = None, sampler: str | None = None, seed_trials: bool = True,
           criterion: str | None = None, method: str = "search"):
    """Search ``trials`` structures meeting ``budget`` and fine-tune the best (see :mod:`autoprune.search`).

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
    if Tune ends early without an interrupt, or ``out/search.json`` is malformed on resume.
    ``inputs`` are recorded in ``search.json`` (the CLI stores how to rebuild model and
    data for ``--resume``). Returns :class:`autoprune.pipeline.Result`; ``result.report``
    is report.json.

    The comparison's arms (:mod:`autoprune.methods.search_arms`) are this search with one part
    changed (:func:`arm_space`): ``sampler`` (a name in :data:`~.samplers.SAMPLERS`) replaces the
    space's sampler (its arguments dropped), ``seed_trials=False`` enqueues no uniform/greedy
    seed trials, ``criterion`` ranks every channel by that one criterion with no mix, clusters
    or self-grouping (widths only). ``method`` is the registered name the report and plan
    carry (``search``, ``random``, ``search_widths``). All four are recorded, so a resume keeps them.
    """
    start = time.time()
    if not isinstance(get_method(method), Search):  # a registered name, checked before any work
        raise AutopruneError(f"method {method!r} is a width method, not a search run; use autoprune.prune")
    if not isinstance(seed_trials, bool):
        raise AutopruneError(f"seed_trials must be True or False, got {short(seed_trials)}")
    if resume and out is None:
        raise AutopruneError("resume=True needs out= (the folder of the search to continue)")
    budget = None if resume else Budget.parse(budget)  # on resume, the recorded budget applies
    if address:
        check_reachable(address)
    temp = tempfile.mkdtemp(prefix="autoprune-search-") if out is None else None
    try:
        run = _settings(Path(out if out is not None else temp).resolve(), resume, space, budget,
                        trials, workers, seed, (sampler, seed_trials, criterion, method))
        with SearchClock(run.out, start, run.resume) as clock:
            return _search(run, model, data, address, finetune_epochs, lr, distill, calib_images,
                           bn_batches, cpus_per_trial, max_failures, progress, device, inputs, clock)
    except KeyboardInterrupt as exc:
        if temp is None and str(exc):  # Tune saved its state: say how to continue
            raise KeyboardInterrupt(f"{exc}; continue with: autoprune search --resume {out} "
                                    "(search(..., resume=True))") from None
        raise
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


# --------------------------------------------------------------------------- settings (search.json)


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
    seed_trials: bool = True  # enqueue the uniform and greedy seeds (not for the random arm)
    method: str = "search"  # the registered name the report carries (search or a search arm)

    @property
    def experiment(self) -> Path:
        return self.out / TUNE_DIR


def _settings(out: Path, resume: bool, space, budget: Budget | None, trials: int, workers: int,
              seed: int, arm: tuple = (None, True, None, "search")) -> _Run:
    from ray import tune

    if resume:
        saved = read_settings(out) if (out / SETTINGS_FILE).is_file() else None
        if saved is None or not tune.Tuner.can_restore(str(out / TUNE_DIR)):
            raise AutopruneError(f"{out} holds no search to resume (no {SETTINGS_FILE} and {TUNE_DIR}/ "
                                 "experiment state); start one with autoprune search --out DIR")
        spec = load(out / SPACE_FILE)
        spec.name = saved.get("space") or spec.name
        run = _Run(out, True, spec, saved["budget"], saved["trials"], saved["workers"], saved["seed"],
                   saved["seeds"], method=saved.get("method") or "search")
    else:
        if (out / TUNE_DIR).exists() and any((out / TUNE_DIR).iterdir()):
            raise AutopruneError(f"{out} already holds a search; continue it with --resume {out} "
                                 "(resume=True) or choose another --out")
        sampler, seed_trials, criterion, method = arm
        spec = arm_space(space if isinstance(space, SearchSpace) else load(space), sampler, criterion)
        run = _Run(out, False, spec, budget, int(trials), int(workers), int(seed), seed_trials=seed_trials,
                   method=method)
    _check_inputs(run.trials, run.workers, run.spec)
    return run


def arm_space(spec: SearchSpace, sampler: str | None = None, criterion: str | None = None) -> SearchSpace:
    """``spec`` with one part changed for a comparison arm, validated again as a space of its own
    (SearchSpaceError naming the override): ``sampler`` replaces the sampler (default
    arguments); ``criterion`` ranks every channel by that one criterion, without a mix,
    clusters or self-grouping. ``spec`` itself when neither is given."""
    if sampler is None and criterion is None:
        return spec
    data = {k: v for k, v in spec.as_dict().items() if k not in ("name", "path") and v is not None}
    changed = []
    if sampler is not None:
        data["sampler"] = {"name": sampler}
        changed.append(f"sampler {sampler}")
    if criterion is not None:
        data["criteria"] = [criterion]
        data.pop("clusters", None)
        data.pop("selfgroup", None)
        changed.append(f"criterion {criterion} only")
    return SearchSpace.from_dict(data, name=spec.name, path=spec.path,
                                 label=f"{spec.label} ({', '.join(changed)})")


def space_digest(spec: SearchSpace) -> str:
    """SHA-256 of the space's canonical form (its validated settings as sorted JSON; the name,
    path and description left out): equal for the same space however it was written or loaded."""
    import hashlib

    canonical = {k: v for k, v in spec.as_dict().items() if k not in ("name", "path", "description")}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, default=str).encode()).hexdigest()


def search_settings(model: nn.Module, data: DataBundle, budget: Budget, spec: SearchSpace, method: str,
                    seed: int, *, trials: int, workers: int, finetune_epochs: int, lr: float, distill: bool,
                    calib_images: int, bn_batches: int) -> dict:
    """report["settings"] of a search (:func:`autoprune.pipeline.run_settings`): ``spec`` (the
    arm's space, :func:`arm_space`) as its digest, and the options a search's result depends on."""
    return run_settings(model, data, budget, method, seed, {
        "space": space_digest(spec), "trials": int(trials), "workers": int(workers),
        "finetune_epochs": finetune_epochs, "lr": lr, "distill": distill, "calib_images": calib_images,
        "bn_batches": bn_batches})


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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _settings_budget(value: Any) -> Budget | None:
    """search.json's budget: {kind, value, relative} or (older runs) text like 'flops<=50%'."""
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
        saved = read_json(path)
    except OSError as exc:
        raise AutopruneError(f"{out} holds no search to resume (cannot read {SETTINGS_FILE}: "
                             f"{exc.strerror or exc}); start one with autoprune search --out DIR") from None
    except (ValueError, RecursionError) as exc:
        raise AutopruneError(f"{path} is not valid JSON ({exc}); {fix}") from None
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
    for key, kind in (("space", str), ("inputs", dict), ("method", str)):
        if saved.get(key) is not None and not isinstance(saved[key], kind):
            raise AutopruneError(f"{path}: '{key}' must be a {'string' if kind is str else 'mapping'}, "
                                 f"got {short(saved[key])}; {fix}")
    return {**saved, "budget": _settings_budget(saved["budget"])}


def _record(run: _Run, inputs: Mapping | None) -> None:
    """search.json and space.yaml: everything --resume needs besides model and data. The
    budget is written as numbers (exact, unlike its text form)."""
    import yaml

    from ..checkpoint import atomic_write_text

    run.out.mkdir(parents=True, exist_ok=True)
    space = {k: v for k, v in run.spec.as_dict().items() if k not in ("name", "path") and v is not None}
    atomic_write_text(run.out / SPACE_FILE, yaml.safe_dump(space, sort_keys=False))  # loadable by load()
    budget = {"kind": run.budget.kind, "value": run.budget.value, "relative": run.budget.relative}
    atomic_write_text(run.out / SETTINGS_FILE, json.dumps(
        {"format": "autoprune-search/1", "budget": budget, "space": run.spec.name,
         "trials": run.trials, "workers": run.workers, "seed": run.seed, "seeds": run.seeds,
         "inputs": dict(inputs or {}), "method": run.method}, indent=1, default=str))


# --------------------------------------------------------------------------- driver state


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


def driver_state(model: nn.Module, data: DataBundle, spec: SearchSpace, budget: Budget, seed: int,
                 calib_images: int, progress: bool, device) -> tuple[Space, dict, dict | None]:
    """Space, per-criterion scores and per-k cluster labels, computed once."""
    from ..calibrate import calibrate
    from ..criteria.base import Stats

    space = Space(model, torch.zeros(1, *data.input_shape, device=device))
    budget.target(space)
    spec.variables(space)  # ties that match no unit fail here, before calibration
    c = spec.clusters
    specs = calibration_specs(spec.criteria, c.method if c else None, int(c.k[0]) if c and c.k else None,
                              data.num_classes)
    batches = calibration_batches(data, seed, calib_images)
    stats = (calibrate(space, model, batches, specs, n_images=calib_images, device=device,
                       progress=progress) if specs else Stats())
    # criteria that require more (fpar's attention) compute it on the same images
    scores = _cpu(criterion_scores(space, stats, spec.criteria, data.num_classes, model=model,
                                   batches=batches, seed=seed, device=device))
    labels = None
    if c is not None:
        labels = {k: grouping.cluster(c.method, space, stats, k, seed=seed)
                  for k in (list(c.k) if c.k else [None])}
    return space, scores, labels


def _seed_points(space: Space, spec: SearchSpace, budget: Budget, scores: Mapping, seed: int,
                 progress: bool) -> dict[str, dict]:
    """Search params of the uniform and the (criterion-mode) greedy structures at the budget."""
    greedy_by = "di" if "di" in spec.criteria else spec.criteria[0]
    points = {}
    for name, method_scores in (("uniform", None), ("greedy", scores[greedy_by])):
        context = Context(None, None, space, budget, scores=method_scores, seed=seed, progress=progress)
        widths = get_method(name).widths(space, budget, context).widths
        ratios = {u.name: 1.0 - widths[u.name] / u.width for u in space.units}
        points[name] = spec.params_for(ratios, space)
    return points


# --------------------------------------------------------------------------- the run


def _search(run: _Run, model, data, address, finetune_epochs, lr, distill, calib_images, bn_batches,
            cpus_per_trial, max_failures, progress, device, inputs, clock: SearchClock):
    from ..checkpoint import write_json

    spec, budget, seed = run.spec, run.budget, run.seed
    torch.manual_seed(seed)
    device = torch.device(device) if device else evaluate.default_device()
    model = model.to(device).eval()
    settings = search_settings(model, data, budget, spec, run.method, seed, trials=run.trials,  # the baseline
                               workers=run.workers, finetune_epochs=finetune_epochs, lr=lr,  # as given
                               distill=distill, calib_images=calib_images, bn_batches=bn_batches)
    space, scores, labels = driver_state(model, data, spec, budget, seed, calib_images, progress, device)
    if not run.resume:
        run.seeds = _seed_points(space, spec, budget, scores, seed, progress) if run.seed_trials else {}
        _record(run, inputs)
    cpu_model = copy.deepcopy(model).cpu().eval()
    shared = Shared(cpu_model, _shippable_space(space, cpu_model), spec, budget, scores, labels,
                    data, seed, threads=max(1, int(cpus_per_trial)), experiment_dir=str(run.experiment))
    names, modes = spec.metrics()
    with ray_session(address, num_cpus=max(1, math.ceil(run.workers * cpus_per_trial)),
                     progress=progress) as ray_info:
        request = resources(run.workers, cpus_per_trial, gpus_available(ray_info["started"]))
        runnable = trainable(shared, request)
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")  # state snapshots at most 1 s old
        t_fit, cpu_fit = time.time(), time.process_time()
        with sigint_watch() as interrupted:
            if run.resume:
                tuner = _resumed_tuner(runnable, spec.define(space), run, max_failures, progress)
            else:
                tuner = _new_tuner(runnable, spec.define(space), run, max_failures, progress)
            grid = tuner.fit()
            stopped = interrupted()
        fit_s, fit_cpu = time.time() - t_fit, time.process_time() - cpu_fit

    fields = trial_fields(result_rows(grid), run.seeds)
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
    plan.meta = {"method": run.method, "criterion": cand.mix, "budget": str(budget), "seed": seed,
                 "trial": best["number"]}
    method_s = clock.mark_searched()  # the search's own cost, every process's: all before the final fine-tune
    report = finish(model, small, data, space, budget, widths, seed, finetune_epochs, lr, distill,
                    bn_batches, progress, device, selfgroup=bool(plan.selfgroup))
    imp, why = importances(rows, spec, space, seed)
    report.update(
        method=run.method, criterion=cand.mix, clusters=cand.cluster_method, seed=seed,
        candidate=cand.as_dict(), trajectory=[],
        # as method selfgroup's report: the grouping's k and cp, or None where the space has none
        selfgroup={"k": int(cand.selfgroup["k"]), "cp": float(cand.selfgroup["cp"])} if plan.selfgroup else None,
        trials=rows, best_trial=best, seeds=fields["seeds"], importances=imp,
        search={"space": spec.as_dict(), "objective": spec.objective, "metrics": names, "modes": modes,
                "trials_requested": run.trials, "workers": run.workers, "resources_per_trial": request,
                "ray": ray_info["address"], "worker_niceness": ray_info.get("worker_niceness"),
                "asha": dict(spec.asha) if spec.asha else None,
                "states": fields["states"], "nodes": fields["nodes"], "resumed": run.resume,
                "processes": len(clock.earlier) + 1 if clock.complete else None, "earlier_processes_s": round(clock.earlier_s, 2),
                "tune_started_at": t_fit, "tune_s": round(fit_s, 2), "driver_cpu_s": round(fit_cpu, 2),
                "importances_note": why, "experiment": str(run.experiment)},
        compute=compute_record(sum(r["proxy_score"] is not None for r in rows), method_s, report["finetune"]),
        settings=settings,
        elapsed_s=round(clock.elapsed_s(), 2))
    from ..report import plot_history, plot_importances, plot_pareto
    extra = {TRIALS_FILE: lambda path: write_json(path, rows),
             "history.png": lambda path: plot_history(rows, path, title=f"search @ {budget}")}
    if imp:
        extra["importances.png"] = lambda path: plot_importances(imp, path)
    if spec.objective == "accuracy_flops":
        extra["pareto.png"] = lambda path: plot_pareto(rows, path, title=f"search @ {budget}")
    write_outputs(run.out, plan, small, report, extra=extra)  # one set, manifest.json last
    return Result(small, plan, report)


# --------------------------------------------------------------------------- the Tuner


def _new_tuner(runnable, define, run: _Run, max_failures: int, progress: bool, state: Mapping | None = None):
    """A fresh Tuner: OptunaSearcher (the YAML's sampler, seeds enqueued first), optional ASHA.
    With ``state`` (a saved searcher state) the searcher continues from it, handing out
    every trial it holds again first (see :meth:`OptunaSearcher.restart`)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    spec = run.spec
    names, modes = spec.metrics()
    single = len(names) == 1
    searcher = optuna_search_class()(
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
        runnable,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=run.trials,
                                    max_concurrent_trials=run.workers, reuse_actors=True,
                                    trial_dirname_creator=trial_dirname),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(run.out), verbose=1 if progress else 0,
                                  failure_config=tune.FailureConfig(max_failures=max_failures)))


def _resumed_tuner(runnable, define, run: _Run, max_failures: int, progress: bool):
    """``Tuner.restore`` of the experiment in ``run.experiment``; if Tune's state there is torn,
    empty or not restorable, a new experiment in the same folder whose searcher continues
    from its own saved state (a warning says so)."""
    from ray import tune

    problem = tune_state_problem(run.experiment)
    if problem is None:
        try:
            return tune.Tuner.restore(str(run.experiment), trainable=runnable, resume_unfinished=True,
                                      resume_errored=False, restart_errored=False)
        except Exception as exc:  # noqa: BLE001 - e.g. an unreadable tuner.pkl: fall back below
            problem = f"Ray Tune cannot restore it ({error_line(exc)[:200]})"
    state = newest_searcher_state(run.experiment)
    kept = len(state["trials"]) if state else 0
    warnings.warn(f"{run.experiment}: {problem}; continuing in a new Tune experiment there from the "
                  f"searcher's own record of {kept} trial(s): finished ones report their saved result "
                  "again, the others run again", stacklevel=3)
    return _new_tuner(runnable, define, run, max_failures, progress, state=state)
