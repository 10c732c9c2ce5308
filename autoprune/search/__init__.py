"""Structure search: Optuna proposes pruned structures, Ray Tune evaluates them in parallel.

>>> result = autoprune.search.search(model, data, "flops<=50%", space="resnet_cifar",
...                                  trials=64, workers=2, out="runs/y")
>>> result.report["best_trial"], result.report["seeds"]

The modules, top-down: :mod:`.runner` (a whole search: settings and ``search.json``,
driver state, seeds, the Tuner, the best structure's outputs), :mod:`.searcher` (the
OptunaSearcher), :mod:`.ray_tune` (the Ray session, the trainable, Tune's files, Ctrl-C),
:mod:`.trial` (one trial without Ray), :mod:`.trials` (the trials table, plain data) and
:mod:`.space` (YAML search spaces for Optuna define-by-run sampling; the file is read by
:mod:`.yaml_file`, checked by :mod:`.validate`, its sampler typed by :mod:`.samplers`, and
:mod:`.space_error` holds their error). Names are loaded on first use, so importing
:mod:`.trials` (as :mod:`autoprune.report` does) loads no more.

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
4. **Sampler.** :class:`~.searcher.OptunaSearcher` (a Ray Tune ``Searcher`` driving an
   Optuna study with the YAML's sampler through ``ask``/``tell``) tells Optuna only
   *final* scores: a trial that ASHA stopped early is told as PRUNED, never as if its
   truncated score were final. A trial whose proxy fine-tune diverges (non-finite loss,
   :class:`~autoprune.evaluate.Diverged`) reports the finite :data:`~.trial.PENALTY` and
   is marked ``FAIL``; a crashed worker is retried (``FailureConfig(max_failures=...)``)
   and marked ``ERROR`` only when the retries are spent.
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
A resumed search's cost (``report["compute"]``, ``elapsed_s``) is every process's: each
records its wall-time segment in ``OUT/clock.json`` as it runs (:mod:`.clock`; a killed
driver loses at most 5 s of it; the search's own cost counts each up to its final
fine-tune), and ``report["search"]`` says how many processes ran (``processes``; None when
a resumed folder held no record, with a warning) and what the earlier ones spent
(``earlier_processes_s``).

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

import importlib

_SOURCES = {"Candidate": "space", "SearchSpace": "space", "SearchSpaceError": "space", "load": "space",
            "search": "runner"}

__all__ = ["Candidate", "SearchSpace", "SearchSpaceError", "load", "search"]


def __getattr__(name: str):
    if name in _SOURCES:
        value = getattr(importlib.import_module(f"{__name__}.{_SOURCES[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
