"""The Ray side of a search: the session, the trainable, Tune's files and Ctrl-C.

:func:`ray_session` joins a cluster or starts a local Ray of its own; :func:`trainable` is
:func:`~.trial.evaluate_candidate` as a Tune function trainable, with the
:class:`~.trial.Shared` state shipped once. Tune's experiment snapshots and each trial's
``result.json`` are read back here (a torn snapshot is moved aside), and
:func:`sigint_watch` tells a real Ctrl-C from Tune ending early. Ray is imported on first use.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch

from ..errors import AutopruneError
from .trial import Shared, evaluate_candidate
from .trials import NUMBER_KEY, flat_config, trial_row

__all__ = ["check_reachable", "error_line", "finished_result", "gpus_available", "ray_session",
           "read_snapshot", "resources", "result_rows", "sigint_watch", "trainable", "trial_dirname",
           "tune_snapshot", "tune_state_problem"]

WORKER_NICENESS = "RAY_worker_niceness"  # Ray's setting: the niceness its workers add to their own
TUNE_STATE_GLOB = "experiment_state-*.json"  # Tune's trial snapshots in the experiment, one per session
METRIC_KEYS = ("proxy_score", "proxy_steps", "final", "diverged", "flops", "params",
               "budget_scale", "node", "number", "started_at", "time_prepare_s", "time_compute_s",
               "time_trial_s", "error")


# --------------------------------------------------------------------------- the session


def check_reachable(address: str, timeout: float = 5.0) -> None:
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
def ray_session(address: str | None, num_cpus: int, progress: bool) -> Iterator[dict]:
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
                                 "start one with 'ray start --head' (see autoprune.search)") from None
        info = {"address": address, "started": False}
    else:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        # Ray renices its workers by +15 (RAY_worker_niceness), so that on a busy machine the
        # trials, which are this job's work, starve: a 6-trial search beside two busy processes
        # took 11x its time at niceness 0 (benchmarks/ray_niceness.py). Ours keep the driver's
        # niceness unless the variable is set; the raylet reads it when ray.init starts it (its
        # workers inherit the raylet's environment), so it is set for that call only.
        users = os.environ.get(WORKER_NICENESS)
        os.environ[WORKER_NICENESS] = users if users is not None else "0"
        try:
            # address="local": a Ray of our own even if a cluster (or RAY_ADDRESS) is around
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=progress, configure_logging=False)
        finally:
            niceness = os.environ.pop(WORKER_NICENESS)
            if users is not None:
                os.environ[WORKER_NICENESS] = users
        info = {"address": "local", "started": True, "worker_niceness": niceness}
    try:
        yield info
    finally:
        ray.shutdown()


def gpus_available(local: bool) -> bool:
    """Whether trials can have GPUs: this machine's for a local Ray, else the cluster's."""
    import ray
    if local:
        return torch.cuda.is_available()
    return ray.cluster_resources().get("GPU", 0) > 0


def resources(workers: int, cpus_per_trial: float, gpus: bool) -> dict:
    """One trial's resource request: its CPUs and ``1/workers`` of a GPU where there are GPUs."""
    return {"cpu": cpus_per_trial, "gpu": (1.0 / workers if workers > 1 else 1.0) if gpus else 0.0}


# --------------------------------------------------------------------------- the trainable


def trial_dirname(trial) -> str:
    """A trial's folder in the experiment (where :func:`finished_result` looks)."""
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


def finished_result(experiment_dir: str | None, trial_id: str, config: Mapping | None = None) -> dict | None:
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
            if (isinstance(cfg, Mapping) and cfg.get(NUMBER_KEY) == number
                    and flat_config(cfg) == flat_config(config)):
                row = other
                break
    return None if row is None else {k: row[k] for k in METRIC_KEYS if k in row}


def _trainable(config: dict, shared: Shared | None = None) -> None:
    """The Ray Tune function trainable: one candidate, reported with ``ray.tune.report``.

    Its name is the trainable's name in Tune's experiment; ``Tuner.restore`` checks it."""
    import ray
    from ray import tune

    torch.set_num_threads(max(1, int(shared.threads)))
    node = ray.get_runtime_context().get_node_id()
    number = config.get(NUMBER_KEY)
    done = finished_result(shared.experiment_dir, tune.get_context().get_trial_id(), config)
    if done is not None:  # finished before the driver died, after Tune's last snapshot
        tune.report({**done, "replayed": True})
        return
    evaluate_candidate(shared, config, report=lambda m: tune.report({**m, "node": node, "number": number}))


def trainable(shared: Shared, request: Mapping[str, float]):
    """The trainable Tune runs: ``shared`` put in the object store once, ``request`` per trial
    (:func:`resources`)."""
    from ray import tune

    return tune.with_resources(tune.with_parameters(_trainable, shared=shared), dict(request))


# --------------------------------------------------------------------------- Tune's files


def read_snapshot(path: Path) -> dict[str, dict] | None:
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


def tune_snapshot(directory: Path) -> dict[str, dict] | None:
    """Tune's newest trial snapshot in ``directory`` (None if there is none or it is torn)."""
    paths = sorted(Path(directory).glob(TUNE_STATE_GLOB))  # Tune restores the newest name too
    return read_snapshot(paths[-1]) if paths else None


def tune_state_problem(experiment: Path) -> str | None:
    """Why Tune's newest experiment state in ``experiment`` cannot be restored (None: it can).

    A torn (truncated) or trial-less newest state is moved aside (``.unusable``), so that
    neither Tune nor a later resume picks it up again.
    """
    paths = sorted(experiment.glob(TUNE_STATE_GLOB))  # Tune restores the newest name
    if not paths:
        return "it holds no Tune experiment state"
    newest = paths[-1]
    trials = read_snapshot(newest)
    if trials:
        return None
    why = "is truncated or unreadable" if trials is None else "records no trial"
    os.replace(newest, newest.with_name(newest.name + ".unusable"))
    return f"Tune's experiment state {newest.name} {why} (moved aside to {newest.name}.unusable)"


def error_line(error: BaseException | None) -> str | None:
    """``Type: last line of the message`` (None for no error)."""
    if error is None:
        return None
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1].strip() if lines else ''}"


def result_rows(grid) -> list[dict]:
    """Raw trial rows from Tune's ResultGrid (last result, config and error per trial)."""
    rows = []
    for r in grid:
        metrics = dict(r.metrics or {})
        trial_id = metrics.get("trial_id") or Path(r.path).name.removeprefix("trial_")
        rows.append(trial_row(trial_id, r.config or {}, metrics, error_line(r.error)))
    return rows


# --------------------------------------------------------------------------- Ctrl-C


@contextmanager
def sigint_watch() -> Iterator[Callable[[], bool]]:
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
