"""Search runner hardening: a searcher that pickles with any sampler, the seeds-only search,
interrupts told apart from early ends, torn Tune state on resume, search.json checked and exact.

Fast tests drive the searcher and the resume helpers without Ray workers; the slow ones run
real local Ray searches on resnet20 / digits 8x8 (helpers shared with test_search.py).
"""

import json
import os
import pickle
import signal
from pathlib import Path

import pytest
import test_search

from autoprune import checkpoint, cli
from autoprune.budget import Budget
from autoprune.errors import AutopruneError
from autoprune.search.ray_tune import (WORKER_NICENESS, finished_result, ray_session, sigint_watch, tune_snapshot,
                                      tune_state_problem)
from autoprune.search.runner import SETTINGS_FILE, TUNE_DIR, _record, _Run, _settings, search
from autoprune.search.searcher import OptunaSearcher, read_searcher_state
from autoprune.search.space import load
from autoprune.search.trial import PENALTY

tiny = test_search.tiny  # the search tests' tiny space file, a fixture here too


def _define(trial):
    trial.suggest_float("ratio/x", 0.0, 1.0)
    trial.suggest_categorical("k/y", [2, 4])


def _searcher(sampler=None, points=(), max_trials=None, multi=False):
    import optuna

    metric, mode = (["proxy_score", "flops"], ["max", "min"]) if multi else ("proxy_score", "max")
    return OptunaSearcher(space=_define, metric=metric, mode=mode, seed=0, max_trials=max_trials,
                             points_to_evaluate=[dict(p) for p in points],
                             sampler=sampler or optuna.samplers.RandomSampler)


def _summary(searcher):
    return [(t.number, t.state.name, t.values, t.params, t.user_attrs, t.intermediate_values)
            for t in searcher.study.trials]


# --------------------------------------------------------------------------- the searcher


def test_searcher_pickles_with_a_sampler_holding_a_lock():
    """NSGA-II holds a lock in Optuna 5.1: the searcher must still pickle (Tune's tuner.pkl),
    before use and mid-search, and carry on with the same trials and numbers."""
    import optuna

    with pytest.raises(TypeError):  # the cause: Optuna's sampler itself does not pickle
        pickle.dumps(optuna.samplers.NSGAIISampler(seed=0))
    searcher = _searcher(optuna.samplers.NSGAIISampler, points=[{"ratio/x": 0.25, "k/y": 4}], max_trials=6,
                         multi=True)
    pickle.loads(pickle.dumps(searcher))  # as Tuner(...) does before fit
    configs = [searcher.suggest(t) for t in "abc"]
    assert configs[0] == {"ratio": {"x": 0.25}, "k": {"y": 4}, "_number": 0}
    searcher.on_trial_complete("a", {"proxy_score": 0.5, "flops": 10, "final": True})
    searcher.on_trial_complete("b", {"proxy_score": PENALTY, "flops": 7, "final": True, "diverged": True})
    again = pickle.loads(pickle.dumps(searcher))
    assert _summary(again) == _summary(searcher)
    assert [t.state.name for t in again.study.trials] == ["COMPLETE", "COMPLETE", "RUNNING"]
    assert again.study.trials[1].user_attrs == {"diverged": True}
    assert again.suggest("c") == configs[2]  # the running trial keeps its id, number and params
    again.on_trial_complete("c", {"proxy_score": 0.7, "flops": 5, "final": True})
    assert [again.suggest(t)["_number"] for t in "def"] == [3, 4, 5] and again.suggest("g") == "FINISHED"
    assert again.study.trials[2].values == [0.7, 5.0]


def test_two_trials_hand_out_both_seeds():
    """trials=2 (the documented minimum) is the two seeds: the cap counts trials handed out,
    not the seed points still queued (the cause of a search that ran no trial)."""
    seeds = [{"ratio/x": 0.0, "k/y": 2}, {"ratio/x": 0.5, "k/y": 4}]
    searcher = _searcher(points=seeds, max_trials=2)
    first, second = searcher.suggest("a"), searcher.suggest("b")
    assert first == {"ratio": {"x": 0.0}, "k": {"y": 2}, "_number": 0}
    assert second == {"ratio": {"x": 0.5}, "k": {"y": 4}, "_number": 1}
    assert searcher.suggest("c") == "FINISHED"


def test_save_restore_round_trip_and_a_torn_state_file(tmp_path):
    searcher = _searcher(max_trials=5)
    for t in "abc":
        searcher.suggest(t)
    searcher.on_trial_result("a", {"proxy_score": 0.3, "training_iteration": 1})
    searcher.on_trial_complete("a", {"proxy_score": 0.3, "final": False})  # ASHA stopped it: PRUNED
    searcher.on_trial_result("b", {"proxy_score": 0.6, "training_iteration": 1})
    older = tmp_path / "searcher-state-2020-01-01_00-00-00.pkl"
    searcher.save(str(older))
    assert [p.name for p in tmp_path.iterdir()] == [older.name]  # written atomically: no temp left
    fresh = _searcher(max_trials=5)
    fresh.restore(str(older))
    assert _summary(fresh) == _summary(searcher)
    assert fresh.study.trials[1].intermediate_values == {1: 0.6}  # a running trial keeps its reports
    assert fresh.suggest("b")["_number"] == 1 and fresh.suggest("d")["_number"] == 3
    newer = tmp_path / "searcher-state-2020-01-02_00-00-00.pkl"
    newer.write_bytes(older.read_bytes()[: len(older.read_bytes()) // 2])  # torn
    other = _searcher(max_trials=5)
    other.restore(str(newer))  # falls back to the older readable state in the same folder
    assert _summary(other) == _summary(searcher)


def test_restart_hands_out_every_trial_again_in_order(tmp_path):
    searcher = _searcher(points=[{"ratio/x": 0.1, "k/y": 2}], max_trials=4)
    configs = {t: searcher.suggest(t) for t in "abc"}
    searcher.on_trial_complete("a", {"proxy_score": 0.4, "final": True})
    searcher.save(str(tmp_path / "s.pkl"))
    state = read_searcher_state(tmp_path / "s.pkl")
    fresh = _searcher(points=[{"ratio/x": 0.1, "k/y": 2}], max_trials=4)
    fresh.restart(state)
    assert [fresh.suggest(t) for t in "xyz"] == [configs[t] for t in "abc"]  # new Tune ids, same trials
    fresh.on_trial_complete("x", {"proxy_score": 0.9, "final": True})  # replayed: told once only
    assert fresh.study.trials[0].values == [0.4]
    assert fresh.suggest("w")["_number"] == 3 and fresh.suggest("v") == "FINISHED"


def test_a_trial_handed_out_again_replays_the_result_saved_for_its_number(tmp_path):
    config = {"ratio": {"x": 0.5}, "_number": 3}
    old = tmp_path / "trial_old"
    old.mkdir()
    row = {"proxy_score": 0.7, "final": True, "proxy_steps": 4, "number": 3, "config": config}
    (old / "result.json").write_text(json.dumps(row) + "\n")
    assert finished_result(str(tmp_path), "new", config) == {"proxy_score": 0.7, "final": True,
                                                                 "proxy_steps": 4, "number": 3}
    assert finished_result(str(tmp_path), "new", {"ratio": {"x": 0.6}, "_number": 3}) is None
    assert finished_result(str(tmp_path), "new", {"ratio": {"x": 0.5}, "_number": 4}) is None
    assert finished_result(str(tmp_path), "new") is None  # without a config: its own folder only


# --------------------------------------------------------------------------- driver helpers


def test_tune_state_problem_moves_a_torn_or_empty_state_aside(tmp_path):
    trial = json.dumps({"trial_id": "t1", "config": {"_number": 0}, "status": "TERMINATED"})
    good = {"trial_data": [[trial, json.dumps({"last_result": {"proxy_score": 0.5}})]]}
    path = tmp_path / "experiment_state-2020-01-01_00-00-00.json"
    path.write_text(json.dumps(good))
    assert tune_state_problem(tmp_path) is None
    assert tune_snapshot(tmp_path)["t1"]["status"] == "TERMINATED"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])  # the driver died while Tune wrote it
    problem = tune_state_problem(tmp_path)
    assert "truncated" in problem and not path.exists()
    assert (tmp_path / (path.name + ".unusable")).exists() and tune_snapshot(tmp_path) is None
    path.write_text(json.dumps({"trial_data": []}))
    assert "records no trial" in tune_state_problem(tmp_path)
    assert "holds no Tune experiment state" in tune_state_problem(tmp_path)


def test_sigint_watch_tells_a_real_ctrl_c_from_an_early_end():
    """Tune's own handler catches the first Ctrl-C and puts back the one it found."""
    def tune_like_fit(send: bool):
        found = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, lambda s, f: signal.signal(signal.SIGINT, found))
        if send:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)
    for send in (False, True):
        with sigint_watch() as interrupted:
            tune_like_fit(send)
            assert interrupted() is send
        assert signal.getsignal(signal.SIGINT) is before
    with pytest.raises(KeyboardInterrupt), sigint_watch() as interrupted:  # reaching ours: as before
        try:
            os.kill(os.getpid(), signal.SIGINT)
        finally:
            assert interrupted()


def test_local_ray_is_its_own(monkeypatch):
    """Without --address, ray.init(address="local"): a Ray already running here is not joined."""
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    monkeypatch.setenv(WORKER_NICENESS, "")
    monkeypatch.delenv(WORKER_NICENESS)  # unset here, restored afterwards
    seen = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw) or seen.append(os.environ.get(WORKER_NICENESS)))
    with ray_session(None, num_cpus=2, progress=False) as info:
        # its workers at the driver's niceness: set while ray.init starts the raylet, not after
        assert info == {"address": "local", "started": True, "worker_niceness": "0"}
        assert seen == ["0"] and WORKER_NICENESS not in os.environ
    init = calls[0]
    assert init["address"] == "local" and init["num_cpus"] == 2
    assert init["include_dashboard"] is False and init["_node_ip_address"] == "127.0.0.1"
    assert calls[1] == "shutdown"
    monkeypatch.setenv(WORKER_NICENESS, "5")  # the user's own setting is kept
    with ray_session(None, num_cpus=2, progress=False) as info:
        assert info["worker_niceness"] == "5" and seen[-1] == "5" and os.environ[WORKER_NICENESS] == "5"


# --------------------------------------------------------------------------- search.json


def _settings_file(out: Path, **changes) -> None:
    saved = {"format": "autoprune-search/1", "budget": {"kind": "flops", "value": 0.5, "relative": True},
             "space": "tiny", "trials": 4, "workers": 2, "seed": 0, "seeds": {"uniform": {}, "greedy": {}},
             "inputs": {}}
    saved.update(changes)
    out.mkdir(parents=True, exist_ok=True)
    (out / SETTINGS_FILE).write_text(json.dumps({k: v for k, v in saved.items() if v is not ...}))


def test_search_json_keeps_the_budget_exactly(tiny, tmp_path):
    out = tmp_path / "run"
    run = _Run(out, False, load(tiny), Budget.parse("params<=1234567"), 4, 2, 0,
                  {"uniform": {"ratio/layer1": 0.5}, "greedy": {"ratio/layer1": 0.4}})
    _record(run, {"checkpoint": "base.pt"})
    assert json.loads((out / SETTINGS_FILE).read_text())["budget"] == {
        "kind": "params", "value": 1234567.0, "relative": False}
    (out / TUNE_DIR).mkdir()
    (out / TUNE_DIR / "tuner.pkl").write_bytes(b"")  # what Tuner.can_restore looks for
    again = _settings(out.resolve(), True, None, None, 0, 0, 0)
    assert again.budget == Budget("params", 1234567.0, False) == run.budget
    assert (again.trials, again.workers, again.seed, again.seeds) == (4, 2, 0, run.seeds)
    _settings_file(out, budget="flops<=50%")  # written by an older autoprune: text
    assert _settings(out.resolve(), True, None, None, 0, 0, 0).budget == Budget("flops", 0.5, True)


@pytest.mark.parametrize("content, needle", [
    ([1, 2, 3], "must hold a JSON object"),
    ({"trials": "many"}, "'trials' must be an int >= 2, got 'many'"),
    ({"budget": ...}, "'budget' is missing"),
    ({"budget": "x" * 500}, "'budget' must be a budget"),
    ({"seed": -1}, "'seed' must be an int >= 0"),
    ({"seeds": None}, "'seeds' must be a mapping"),
])
def test_resume_with_a_malformed_search_json_says_which_key(tmp_path, content, needle):
    out = tmp_path / "run"
    if isinstance(content, list):
        out.mkdir()
        (out / SETTINGS_FILE).write_text(json.dumps(content))
    else:
        _settings_file(out, **content)
    with pytest.raises(AutopruneError) as info:
        search(None, None, out=out, resume=True, progress=False)
    message = str(info.value)
    assert needle in message and "cannot be continued" in message and "--out" in message
    assert "\n" not in message and len(message) < 400  # one line; a long value is cut short


def test_cli_resume_with_a_malformed_search_json_is_one_line(tmp_path, capsys, trained):
    model, data = trained
    base = tmp_path / "base.pt"
    checkpoint.save_baseline(base, model, data={"name": "digits", "image_size": 8},
                             input_shape=list(data.input_shape))
    out = tmp_path / "run"
    _settings_file(out, workers=0, inputs={"checkpoint": str(base)})
    assert cli.main(["search", "--resume", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "'workers' must be an int >= 1" in err, err


# --------------------------------------------------------------------------- slow: Ray end to end


@pytest.mark.slow
def test_search_with_two_trials_runs_both_seeds(tiny, trained, tmp_path):
    model, data = trained
    report = search(model, data, "flops<=50%", space=tiny, trials=2, workers=2, finetune_epochs=0,
                       out=tmp_path / "run", progress=False).report
    rows = report["trials"]
    assert [r["number"] for r in rows] == [0, 1] and all(r["state"] == "COMPLETE" for r in rows)
    assert [r.get("seed_of") for r in rows] == ["uniform", "greedy"]
    assert report["best_trial"]["number"] in (0, 1)


@pytest.mark.slow
def test_local_ray_starts_beside_a_running_cluster(monkeypatch):
    """Another Ray on this machine (and RAY_ADDRESS pointing at it): a local search starts its own."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)
        with ray_session(None, num_cpus=2, progress=False) as info:
            assert info["started"]
            assert ray.get_runtime_context().gcs_address != cluster.address
            assert ray.cluster_resources()["CPU"] == 2  # ours, not the other cluster's single CPU
        assert not ray.is_initialized()
    finally:
        ray.shutdown()
        cluster.shutdown()
