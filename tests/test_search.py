"""Search runner: trials table, seeds, penalty, report schema (fast); Ray Tune end to end (slow).

The slow tests start real Ray sessions (local, a two-node cluster on this machine, a driver
killed and resumed) on resnet20 / digits 8x8 with tiny proxy settings.
"""

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import autoprune as ap
from autoprune import checkpoint, cli
from autoprune.evaluate import proxy_finetune
from autoprune.prune import prune
from autoprune.search.clock import CLOCK_FILE, read_segments
from autoprune.search.ray_tune import finished_result, resources
from autoprune.search.runner import search
from autoprune.search.searcher import OptunaSearcher
from autoprune.search.space import SearchSpace, Section, load
from autoprune.search.trial import PENALTY, Shared, _chunked_proxy_finetune, evaluate_candidate, rungs
from autoprune.search.trials import (STATES, best_trial, importances, pareto_front, rebuild_study, trial_fields,
                                     trial_row)
from autoprune.selfgroup_layers import DiverseGroupLayer

TINY = """\
ratios:
  - match: '.*'
    low: 0.0
    high: 0.8
    tie: stage
criteria: [l1]
proxy: {bn_batches: 2, finetune_steps: 5, eval_batches: 1, lr: 0.01}
sampler: {name: tpe, n_startup_trials: 4}
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY)
    return path


def _shared(model, data, spec, budget="flops<=50%"):
    space = ap.Space(model, torch.zeros(1, *data.input_shape))
    scores = {c: ap.criteria.score(c, space) for c in spec.criteria}
    return Shared(model, space, spec, budget, scores, None, data, seed=0)


# --------------------------------------------------------------------------- fast: pure parts


def test_penalty_is_finite_and_below_every_accuracy():
    assert math.isfinite(PENALTY) and PENALTY < 0.0


def test_rungs_follow_asha_milestones():
    assert rungs(None, 50) == [50]
    assert rungs({"grace_period": 1, "reduction_factor": 4}, 50) == [1, 4, 16, 50]
    assert rungs({"grace_period": 2, "reduction_factor": 2}, 8) == [2, 4, 8]
    assert rungs({"grace_period": 3, "reduction_factor": 1.5}, 10) == [3, 5, 7, 10]
    assert rungs({"grace_period": 1, "reduction_factor": 4}, 0) == [0]


def _row(tid, number, metrics, error=None, config=None):
    cfg = {"ratio": {"layer1": 0.1 * number, "layer2": 0.2}, "_number": number} if config is None else config
    return trial_row(tid, cfg, metrics, error)


def test_trial_row_states_and_flat_config():
    done = {"proxy_score": 0.8, "final": True, "flops": 10, "params": 5, "node": "n1", "diverged": False}
    row = _row("a", 3, done)
    assert row["state"] == "COMPLETE" and row["number"] == 3 and row["node"] == "n1"
    assert row["config"] == {"ratio/layer1": pytest.approx(0.3), "ratio/layer2": 0.2}  # flat, no _number
    assert _row("b", 1, {**done, "final": False})["state"] == "PRUNED"
    fail = _row("c", 2, {**done, "proxy_score": PENALTY, "diverged": True, "error": "diverged"})
    assert fail["state"] == "FAIL" and fail["proxy_score"] == PENALTY and fail["error"]
    assert _row("d", 4, {}, error="RayActorError: died")["state"] == "ERROR"
    assert _row("e", 5, {})["state"] == "INCOMPLETE"
    assert set(STATES) >= {r["state"] for r in (row, fail)}


def test_seed_marking_best_and_schema():
    ok = {"final": True, "diverged": False, "flops": 100, "params": 7, "node": "n"}
    rows = [_row("t2", 2, {**ok, "proxy_score": 0.9, "node": "m"}),
            _row("t0", 0, {**ok, "proxy_score": 0.5}),
            _row("t1", 1, {**ok, "proxy_score": 0.6}),
            _row("t3", 3, {**ok, "proxy_score": PENALTY, "diverged": True}),
            _row("t4", 4, {**ok, "proxy_score": 0.95, "final": False})]
    seeds = {"uniform": {"ratio/layer1": 0.0, "ratio/layer2": 0.2},
             "greedy": {"ratio/layer1": 0.1, "ratio/layer2": 0.2}}
    fields_ = trial_fields(rows, seeds)
    table = fields_["trials"]
    assert [r["number"] for r in table] == [0, 1, 2, 3, 4]
    assert [r.get("seed_of") for r in table] == ["uniform", "greedy", None, None, None]
    assert fields_["best_trial"]["number"] == 2  # the early-stopped 0.95 and the penalty never win
    assert fields_["seeds"]["uniform"] == {"number": 0, "state": "COMPLETE", "proxy_score": 0.5,
                                           "flops": 100, "params": 7}
    assert fields_["states"] == {"COMPLETE": 3, "FAIL": 1, "PRUNED": 1}
    assert fields_["nodes"] == ["m", "n"]
    for r in table:
        assert {"number", "state", "flops", "params", "proxy_score", "node", "config"} <= set(r)
    json.dumps(fields_)  # report.json-ready
    assert best_trial([r for r in table if r["state"] != "COMPLETE"]) is None


def test_pareto_front():
    ok = {"final": True, "diverged": False, "params": 1, "node": "n"}
    rows = [_row(f"t{i}", i, {**ok, "proxy_score": s, "flops": f})
            for i, (s, f) in enumerate([(0.9, 100), (0.8, 50), (0.85, 120), (0.7, 40), (0.8, 60)])]
    assert [r["number"] for r in pareto_front(rows)] == [3, 1, 0]


def test_searcher_tells_optuna_only_final_scores():
    import optuna
    def define(trial):
        trial.suggest_float("x", 0, 1)

    searcher = OptunaSearcher(space=define, metric="proxy_score",
                                 mode="max", sampler=optuna.samplers.RandomSampler, seed=0)
    configs = {tid: searcher.suggest(tid) for tid in ("a", "b", "c")}
    assert [configs[t]["_number"] for t in "abc"] == [0, 1, 2]
    searcher.on_trial_result("a", {"proxy_score": 0.9, "training_iteration": 1})
    searcher.on_trial_complete("a", {"proxy_score": 0.9, "final": False})  # stopped by ASHA
    searcher.on_trial_complete("b", {"proxy_score": PENALTY, "final": True, "diverged": True})
    searcher.on_trial_complete("c", {"proxy_score": 0.4, "final": True})
    trials = searcher.study.trials
    State = optuna.trial.TrialState
    assert [t.state for t in trials] == [State.PRUNED, State.COMPLETE, State.COMPLETE]
    assert trials[0].intermediate_values == {1: 0.9}  # Optuna keeps it as a pruned (partial) score
    assert trials[1].value == PENALTY and trials[1].user_attrs == {"diverged": True}
    assert searcher.study.best_trial.number == 2  # 0.4 final beats the truncated 0.9


def _define_x(trial):
    trial.suggest_float("x", 0, 1)


def _searcher(max_trials=None, points=()):
    import optuna

    return OptunaSearcher(space=_define_x, metric="proxy_score", mode="max", max_trials=max_trials,
                             points_to_evaluate=[dict(p) for p in points],
                             sampler=optuna.samplers.RandomSampler, seed=0)


def _snapshot(searcher, done=(), running=()):
    """Tune's view of trials: id -> config/status/last_result, as Tune's experiment state holds."""
    out = {}
    for tid in (*done, *running):
        config = {"x": searcher.trial(tid).params["x"], "_number": searcher.trial(tid).number}
        out[tid] = {"config": config, "status": "TERMINATED" if tid in done else "RUNNING",
                    "last_result": {"proxy_score": 0.5, "final": True} if tid in done else {}}
    return out


def test_searcher_caps_trials():
    searcher = _searcher(max_trials=3, points=[{"x": 0.25}])
    configs = [searcher.suggest(t) for t in "abcd"]
    assert configs[0] == {"x": 0.25, "_number": 0}
    assert [c["_number"] for c in configs[:3]] == [0, 1, 2] and configs[3] == "FINISHED"


def test_reconcile_adopts_trials_a_stale_searcher_missed(tmp_path):
    import pickle

    import optuna
    stale = _searcher(max_trials=5)
    for t in "ab":
        stale.suggest(t)
    stale.save(str(tmp_path / "stale.pkl"))  # the searcher's snapshot: a, b drawn
    for t in "cd":
        stale.suggest(t)
    stale.on_trial_complete("a", {"proxy_score": 0.5, "final": True})
    stale.on_trial_complete("c", {"proxy_score": 0.5, "final": True})
    tune_view = _snapshot(stale, done="ac", running="bd")  # Tune's snapshot, a moment newer
    fresh = _searcher(max_trials=5)
    fresh.restore(str(tmp_path / "stale.pkl"))
    fresh.reconcile(tune_view)
    trials = {t: fresh.trial(t) for t in "abcd"}
    assert {t: ot.number for t, ot in trials.items()} == {"a": 0, "b": 1, "c": 2, "d": 3}
    assert all(trials[t].params["x"] == tune_view[t]["config"]["x"] for t in "abcd")
    State = optuna.trial.TrialState
    states = {t.number: t.state for t in fresh.study.trials}
    assert states == {0: State.COMPLETE, 1: State.RUNNING, 2: State.COMPLETE, 3: State.RUNNING}
    assert fresh.suggest("e")["_number"] == 4 and fresh.suggest("f") == "FINISHED"
    assert pickle.loads(pickle.dumps(fresh.study.trials[2].params)) == trials["c"].params


def test_reconcile_hands_out_trials_tune_never_recorded(tmp_path):
    ahead = _searcher(max_trials=4)
    for t in "abc":
        ahead.suggest(t)
    x_c = ahead.trial("c").params["x"]
    tune_view = _snapshot(ahead, running="ab")  # Tune's snapshot predates trial c
    ahead.save(str(tmp_path / "ahead.pkl"))
    fresh = _searcher(max_trials=4)
    fresh.restore(str(tmp_path / "ahead.pkl"))
    fresh.reconcile(tune_view)
    again = fresh.suggest("z")  # a new Tune trial takes over the orphan: same number, same params
    assert again == {"x": x_c, "_number": 2}
    assert fresh.suggest("y")["_number"] == 3 and fresh.suggest("w") == "FINISHED"


def test_rebuilt_study_importances(tiny, trained):
    model, data = trained
    spec = load(tiny)
    space = ap.Space(model, torch.zeros(1, *data.input_shape))
    names = list(spec.variables(space))
    rows = []
    for i in range(6):
        config = {n: 0.1 * ((i + j) % 5) for j, n in enumerate(names)}
        rows.append(trial_row(f"t{i}", config, {"proxy_score": 0.5 + 0.05 * i, "final": True,
                                                     "flops": 1, "params": 1}))
    study = rebuild_study(rows, spec, space)
    assert len(study.trials) == 6 and set(study.trials[0].params) == set(names)
    imp, why = importances(rows, spec, space)
    assert why == "" and set(imp) == set(names) and sum(imp.values()) == pytest.approx(1.0)


def test_evaluate_candidate_meets_budget_and_penalises_divergence(tiny, trained):
    model, data = trained
    spec = load(tiny)
    shared = _shared(model, data, spec)
    space = shared.space
    params = spec.params_for({u.name: 0.5 for u in space.units}, space)
    m = evaluate_candidate(shared, params, device="cpu")
    target = ap.Budget.parse("flops<=50%").target(space)
    assert m["flops"] <= target and m["final"] and not m["diverged"]
    assert 0.0 <= m["proxy_score"] <= 1.0 and m["proxy_steps"] == 5
    assert m["time_trial_s"] >= m["time_compute_s"] > 0
    spec.proxy = Section({**spec.proxy, "lr": 1e12})
    bad = evaluate_candidate(shared, params, device="cpu")
    assert bad["diverged"] and bad["final"] and bad["proxy_score"] == PENALTY and bad["error"]


def test_finished_trial_result_is_found_for_replay(tmp_path):
    trial = tmp_path / "trial_abc"
    trial.mkdir()
    assert finished_result(str(tmp_path), "abc") is None
    lines = [{"proxy_score": 0.3, "final": False, "proxy_steps": 1, "trial_id": "abc"},
             {"proxy_score": 0.7, "final": True, "proxy_steps": 4, "flops": 9, "config": {"x": 1}}]
    (trial / "result.json").write_text("\n".join(json.dumps(x) for x in lines) + "\n{truncated")
    assert finished_result(str(tmp_path), "abc") == {"proxy_score": 0.7, "final": True,
                                                         "proxy_steps": 4, "flops": 9}
    assert finished_result(None, "abc") is None


def test_chunked_proxy_finetune_equals_one_run(trained):
    model, data = trained
    space = ap.Space(model, torch.zeros(1, *data.input_shape))
    plan = ap.select(space, space.fit({u.name: 0.5 for u in space.units}, "flops<=60%"))
    a, b = plan.apply(model), plan.apply(model)
    proxy_finetune(a, data.train, steps=6, lr=0.05, seed=3, device="cpu")
    assert list(_chunked_proxy_finetune(b, data.train, [1, 3, 6], 0.05, 3, "cpu")) == [1, 3, 6]
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_cli_search_bad_input_is_one_line(tmp_path, capsys, trained):
    model, data = trained
    base = tmp_path / "base.pt"
    checkpoint.save_baseline(base, model, data={"name": "digits", "image_size": 8},
                             input_shape=list(data.input_shape))
    cases = [
        (["search", "--checkpoint", str(base), "--flops", "50%"], "--out DIR"),
        (["search", "--checkpoint", str(base), "--out", str(tmp_path / "o")], "exactly one budget"),
        (["search", "--resume", str(tmp_path / "nothing")], "no such folder"),
        (["search", "--checkpoint", str(base), "--flops", "50%", "--space", "nosuch_space",
          "--out", str(tmp_path / "o2")], "nosuch_space"),
        (["search", "--checkpoint", str(base), "--flops", "50%", "--trials", "0", "--out", str(tmp_path / "o3")],
         "positive int"),
    ]
    for argv, needle in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("autoprune: error:") and needle in err, err
    assert cli.main(["search", "--checkpoint", str(base), "--flops", "50%", "--out", str(tmp_path / "o4"),
                     "--address", "127.0.0.1:1"]) == 2  # fails fast, before any calibration
    assert "cannot reach a Ray cluster" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["search", "--resume", str(tmp_path / "empty")]) == 2
    assert "no search to resume" in capsys.readouterr().err


# --------------------------------------------------------------------------- slow: Ray end to end


def _check_outputs(out: Path, report: dict, data, trials: int, budget: str = "flops<=50%"):
    assert len(report["trials"]) == trials
    target = report["budget"]["target"]
    assert all(r["flops"] is not None and r["flops"] <= target for r in report["trials"])
    again = ap.load(out / "model.pt")
    recount = ap.fvcore_cost(again, torch.zeros(1, *data.input_shape))
    assert (report["pruned"]["flops"], report["pruned"]["params"]) == tuple(recount)
    assert report["best_trial"]["flops"] == recount.flops
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["trials"] == report["trials"] and on_disk["best_trial"] == report["best_trial"]
    for name in ("history.png", "widths.png", "plan.json"):
        assert (out / name).stat().st_size > 0


@pytest.mark.slow
def test_search_local_ray(tiny, trained, tmp_path):
    model, data = trained
    out = tmp_path / "run"
    result = prune(model, data, "flops<=50%", method="search", space=tiny, trials=8, workers=2,
                   finetune_epochs=0, out=out, progress=False)
    report = result.report
    _check_outputs(out, report, data, 8)
    rows = report["trials"]
    assert [r.get("seed_of") for r in rows[:2]] == ["uniform", "greedy"]
    assert not any(r.get("seed_of") for r in rows[2:])
    assert sorted(r["number"] for r in rows) == list(range(8))
    assert len({r["trial_id"] for r in rows}) == 8
    assert all(r["state"] == "COMPLETE" for r in rows)
    uniform = report["seeds"]["uniform"]
    assert report["best_trial"]["proxy_score"] >= uniform["proxy_score"] == rows[0]["proxy_score"]
    assert report["method"] == "search" and report["search"]["ray"] == "local"
    assert report["search"]["resources_per_trial"]["cpu"] == 1
    assert (out / "importances.png").exists() and report["importances"]
    import ray
    assert not ray.is_initialized()  # the local Ray autoprune started is stopped again


@pytest.mark.slow
def test_search_two_node_cluster(tiny, trained, tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    model, data = trained
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        address = cluster.address
        result = search(model, data, "flops<=50%", space=tiny, trials=6, workers=2,
                           address=address, finetune_epochs=0, out=tmp_path / "run", progress=False)
    finally:
        ray.shutdown()
        cluster.shutdown()
    rows = result.report["trials"]
    nodes = {r["node"] for r in rows}
    assert len(rows) == 6 and all(r["node"] for r in rows)
    assert len(nodes) >= 2, nodes
    assert result.report["search"]["ray"] == address


def _final_lines(out: Path) -> dict[str, list[dict]]:
    """Per trial directory, the final results in its result.json."""
    found = {}
    for path in glob.glob(str(out / "tune" / "trial_*" / "result.json")):
        rows = []
        for line in Path(path).read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("final"):
                rows.append(row)
        found[Path(path).parent.name] = rows
    return found


def _finished(out: Path) -> int:
    return sum(1 for rows in _final_lines(out).values() if rows)


def _kill_session(pid: int) -> None:
    """SIGKILL the driver's process group, then any process left in its session (Ray workers)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if os.getsid(int(proc.name)) == pid:
                os.kill(int(proc.name), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _start_driver(tiny, trained, tmp_path) -> tuple[subprocess.Popen, Path, dict]:
    """`autoprune search` (8 trials of ~0.5 s, 2 workers) in a subprocess of its own session,
    returned once it is running; output goes to tmp_path/driver.log."""
    model, data = trained
    tiny.write_text(TINY.replace("finetune_steps: 5", "finetune_steps: 30"))  # trials of ~0.5 s
    base = tmp_path / "base.pt"
    checkpoint.save_baseline(base, model, data={"name": "digits", "image_size": 8},
                             input_shape=list(data.input_shape))
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "autoprune.cli", "search", "--checkpoint", str(base), "--flops", "50%",
            "--space", str(tiny), "--trials", "8", "--workers", "2", "--epochs", "0", "--out", str(out),
            "--no-progress"]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    with open(tmp_path / "driver.log", "w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, out, env


def _wait_for_finished(proc, out: Path, n: int, tmp_path) -> None:
    deadline = time.time() + 150
    while _finished(out) < n and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, (tmp_path / "driver.log").read_text()[-2000:]
    assert _finished(out) >= n


def _resume(out: Path, env: dict) -> dict:
    resumed = subprocess.run([sys.executable, "-m", "autoprune.cli", "search", "--resume", str(out),
                              "--no-progress"], env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_and_resumes(tiny, trained, tmp_path):
    proc, out, env = _start_driver(tiny, trained, tmp_path)
    try:
        _wait_for_finished(proc, out, 2, tmp_path)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        _kill_session(proc.pid)
    last = (tmp_path / "driver.log").read_text().strip().splitlines()[-1]
    assert last.startswith("autoprune: interrupted: search stopped after ") and f"--resume {out}" in last
    assert not (out / "report.json").exists() and not (out / "model.pt").exists()
    # Tune writes its experiment state non-atomically: tear the newest one, as a driver killed
    # mid-write would, and the resume must still lose and repeat nothing (one run, two checks:
    # the plain resume path is the killed-driver test's).
    done_before = _finished(out)
    newest = sorted((out / "tune").glob("experiment_state-*.json"))[-1]
    text = newest.read_text()
    newest.write_text(text[: len(text) // 2])
    resumed = subprocess.run([sys.executable, "-m", "autoprune.cli", "search", "--resume", str(out),
                              "--no-progress"], env=env, capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "truncated or unreadable" in resumed.stderr and "searcher's own record" in resumed.stderr
    rows = json.loads((out / "report.json").read_text())["trials"]
    assert sorted(r["number"] for r in rows) == list(range(8)) and all(r["state"] == "COMPLETE" for r in rows)
    assert [r.get("seed_of") for r in rows[:2]] == ["uniform", "greedy"]
    assert len({json.dumps(r["config"], sort_keys=True) for r in rows}) == 8
    assert sum(r["replayed"] for r in rows) >= done_before  # finished before: replayed, not rerun


@pytest.mark.slow
def test_killed_driver_resumes_without_losing_or_repeating(tiny, trained, tmp_path):
    _, data = trained
    launched = time.time()
    proc, out, env = _start_driver(tiny, trained, tmp_path)
    try:
        _wait_for_finished(proc, out, 3, tmp_path)
    finally:
        killed = time.time()
        _kill_session(proc.pid)
        proc.wait()
    assert not (out / "report.json").exists()
    # the killed process's time survives in its clock record, to within a heartbeat (5 s; 15
    # allowed on a loaded machine), unmarked: it never reached its final fine-tune
    (seg,) = read_segments(out / CLOCK_FILE)
    assert launched <= seg[0] <= seg[1] <= killed and seg[1] >= killed - 15 and seg[2] is None
    done_before = {name: rows[-1]["started_at"] for name, rows in _final_lines(out).items() if rows}
    assert 3 <= len(done_before) < 8
    report = _resume(out, env)
    rows = report["trials"]
    assert report["search"]["resumed"] and len(rows) == 8
    # its cost counts both processes: the killed one's recorded segment and the resumed one's
    assert report["search"]["processes"] == 2
    assert report["search"]["earlier_processes_s"] == pytest.approx(seg[1] - seg[0], abs=0.01)
    assert report["elapsed_s"] >= report["compute"]["method_s"] >= \
        report["search"]["earlier_processes_s"] + report["search"]["tune_s"]
    first, second = read_segments(out / CLOCK_FILE)
    assert first == seg and killed <= second[0] <= second[1]
    assert sorted(r["number"] for r in rows) == list(range(8))
    assert len({r["trial_id"] for r in rows}) == 8
    assert len({json.dumps(r["config"], sort_keys=True) for r in rows}) == 8
    assert all(r["state"] == "COMPLETE" for r in rows)
    assert [r.get("seed_of") for r in rows[:2]] == ["uniform", "greedy"]
    assert _finished(out) == 8 and len(glob.glob(str(out / "tune" / "trial_*"))) == 8
    finals = _final_lines(out)
    for name, started in done_before.items():  # finished before the kill: kept (or replayed), not rerun
        assert len(finals[name]) == 1 and finals[name][0]["started_at"] == started, finals[name]
    _check_outputs(out, report, data, 8)


class FaultySpace(SearchSpace):
    """A search space whose trial number ``diverge`` fine-tunes at a huge lr and whose trial
    number ``crash`` kills its worker process on the first attempt (pickled by value)."""

    diverge, crash, marker = 2, 3, ""

    def candidate(self, params, space):
        number = params.get("_number")
        if number == self.crash and not os.path.exists(self.marker):
            Path(self.marker).write_text("crashed once")
            os._exit(1)
        self.proxy = Section({**self.proxy, "lr": 1e12 if number == self.diverge else 0.01})
        return super().candidate(params, space)


@pytest.mark.slow
def test_diverged_trial_is_penalised_and_crashed_worker_retried(tiny, trained, tmp_path):
    from ray import cloudpickle

    model, data = trained
    # rungs at 2 and 4 proxy steps; lr 1e12 gives a NaN loss at step 2, before the first rung
    tiny.write_text(TINY.replace("finetune_steps: 5", "finetune_steps: 4")
                    + "asha: {grace_period: 2, reduction_factor: 2}\n")
    spec = load(tiny)
    faulty = FaultySpace(**{f.name: getattr(spec, f.name) for f in fields(spec)})
    faulty.marker = str(tmp_path / "crashed")
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        result = search(model, data, "flops<=50%", space=faulty, trials=6, workers=2,
                           finetune_epochs=0, out=tmp_path / "run", progress=False)
    finally:
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    rows = {r["number"]: r for r in result.report["trials"]}
    assert sorted(rows) == list(range(6))
    failed = rows[FaultySpace.diverge]
    assert failed["state"] == "FAIL" and failed["proxy_score"] == PENALTY and "diverged" in failed["error"]
    assert Path(faulty.marker).exists()  # trial 3's first worker died ...
    assert rows[FaultySpace.crash]["state"] in ("COMPLETE", "PRUNED")  # ... and the retry finished it
    assert all(r["state"] in ("COMPLETE", "PRUNED", "FAIL") for r in rows.values())
    for r in rows.values():
        if r["state"] == "PRUNED":  # stopped by ASHA at a rung before the last
            assert r["proxy_steps"] < 4
    assert result.report["best_trial"]["state"] == "COMPLETE"
    assert result.report["search"]["states"]["FAIL"] == 1


@pytest.mark.slow
def test_a_local_ray_runs_its_workers_at_the_driver_niceness(monkeypatch):
    """Ray adds 15 to its workers' niceness unless told otherwise: beside any busy process the
    trials would starve. The local Ray autoprune starts keeps them at the driver's."""
    import ray

    from autoprune.search.ray_tune import WORKER_NICENESS, ray_session

    if os.nice(0) + 15 >= 19:  # a worker at +15 would be capped at 19 too: nothing to tell apart
        pytest.skip(f"the suite itself runs at niceness {os.nice(0)}")
    monkeypatch.setenv(WORKER_NICENESS, "15")
    monkeypatch.delenv(WORKER_NICENESS)  # unset now; restored to what it was afterwards

    def niceness():
        return os.nice(0)

    with ray_session(None, num_cpus=1, progress=False) as info:
        worker = ray.get(ray.remote(niceness).remote())
    assert info["worker_niceness"] == "0" and worker == os.nice(0)


def test_trials_request_fractional_gpus_only_where_present():
    assert resources(2, 1, gpus=True) == {"cpu": 1, "gpu": 0.5}
    assert resources(4, 2, gpus=True) == {"cpu": 2, "gpu": 0.25}
    assert resources(1, 1, gpus=True) == {"cpu": 1, "gpu": 1.0}
    assert resources(2, 1, gpus=False) == {"cpu": 1, "gpu": 0.0}


@pytest.mark.slow
def test_multi_objective_search_with_selfgrouping_draws_a_pareto_front(tiny, trained, tmp_path):
    model, data = trained
    tiny.write_text(TINY.replace("sampler: {name: tpe, n_startup_trials: 4}",
                                 "sampler: {name: nsga2, population_size: 4}")
                    + "objective: accuracy_flops\nbudget_scale: [0.5, 1.0]\nselfgroup: {k: [2], cp: [0.2, 0.6]}\n")
    out = tmp_path / "run"
    report = search(model, data, "flops<=50%", space=tiny, trials=6, workers=2, finetune_epochs=0,
                       out=out, progress=False).report
    rows = report["trials"]
    target = report["budget"]["target"]
    assert len(rows) == 6 and all(r["flops"] <= target for r in rows)
    assert len({r["flops"] for r in rows}) >= 3  # the budget fraction is searched too
    front = pareto_front(rows)
    for r in front:  # no complete trial beats a front member on both objectives
        assert not any(o["proxy_score"] >= r["proxy_score"] and o["flops"] < r["flops"]
                       for o in rows if o["state"] == "COMPLETE")
    assert report["search"]["metrics"] == ["proxy_score", "flops"]
    assert (out / "pareto.png").stat().st_size > 1000
    # the self-grouping searched too: the report says it as method selfgroup's does, and the
    # saved model is grouped (its FLOPs recounted by fvcore, as the report's)
    assert report["selfgroup"] == report["candidate"]["selfgroup"] and report["selfgroup"]["k"] == 2
    assert 0.2 <= report["selfgroup"]["cp"] <= 0.6
    again = ap.load(out / "model.pt")
    assert any(isinstance(m, DiverseGroupLayer) for m in again.modules())
    assert report["pruned"]["flops"] == ap.fvcore_cost(again, torch.zeros(1, *data.input_shape)).flops
