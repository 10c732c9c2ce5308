"""Hostile input through the command line: every bad value is one line and exit 2, before work.

Each test feeds a class of malformed, extreme or malicious input to ``autoprune.cli.main``
and checks the contract of errors.py: exit status 2, exactly one stderr line starting
``autoprune: error:``, no traceback, and (where an --out folder already holds files)
nothing in it changed or half-written. Baselines are untrained resnet20s on 8x8
synthetic data (4 classes), saved without training, so every test is quick.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch

import autoprune as ap
from autoprune import checkpoint, criteria, limits
from autoprune.budget import Budget
from autoprune.cli import main
from autoprune.errors import CriterionError

SIZE = 8
DATA = ["--data", "synthetic", "--image-size", str(SIZE)]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line(code: int, err: str, *facts: str) -> str:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoprune: error: "), err
    assert "Traceback" not in err
    for fact in facts:
        assert fact in lines[0], (fact, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """An untrained resnet20 for 8x8 synthetic data, saved as 'autoprune train' would."""
    path = tmp_path_factory.mktemp("hostile") / "base.pt"
    torch.manual_seed(0)
    model = ap.models.create("resnet20", num_classes=4)
    checkpoint.save_baseline(path, model, accuracy=0.25, data={"name": "synthetic", "image_size": SIZE},
                             input_shape=[3, SIZE, SIZE], epochs=0, seed=0)
    return path


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """An --out folder already holding an earlier run's files."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"earlier model")
    (folder / "report.json").write_text('{"earlier": true}')
    return folder


def prune_argv(base: Path, out: Path, *extra: str) -> list[str]:
    return ["prune", "--checkpoint", str(base), "--out", str(out), "--epochs", "0", "--calib-images", "16",
            "--no-progress", *extra]


# --------------------------------------------------------------------------- 1. budgets


@pytest.mark.parametrize("flag, fact", [
    ("--flops=" + "9" * 300, "at most 1e+15"),
    ("--flops=inf", "finite"),
    ("--flops=nan", "finite"),
    ("--flops=1e999", "finite"),
    ("--flops=-5%", "positive"),
    ("--flops=0", "positive"),
    ("--params=0.0001k", "more than 1"),
    ("--flops=150%", "(0%, 100%]"),
    ("--flops=50%%", "malformed"),
])
def test_budget_values_are_refused_before_work(capsys, base: Path, out: Path, flag: str, fact: str) -> None:
    before = snapshot(out)
    code, _, err = run(capsys, *prune_argv(base, out, flag))
    line = assert_one_line(code, err, "budget", fact)
    assert len(line) < 300  # the 300-digit value is shortened
    assert snapshot(out) == before


@pytest.mark.parametrize("text, spelled", [
    ("flops<=50%", "flops<=50%"), ("params<=1234567", "params<=1234567"), ("flops<=62M", "flops<=62M"),
    ("params<=1.2M", "params<=1.2M"), ("flops<=0.5", "flops<=50%"), ("flops<=33.3%", "flops<=33.3%"),
    ("flops<=0.3333333333333333", None), ("flops<=1e-7", None), ("params<=272474", "params<=272474"),
    ("flops<=1.5", "flops<=1.5"), ("flops<=1e15", None), ("params<=123456789.25", None),
])
def test_budget_str_parses_back_exactly(text: str, spelled: str | None) -> None:
    budget = Budget.parse(text)
    assert Budget.parse(str(budget)) == budget  # exact: the same float, not an approximation
    if spelled is not None:
        assert str(budget) == spelled


def test_budget_str_round_trips_many_values() -> None:
    gen = torch.Generator().manual_seed(0)
    for u in torch.rand(500, generator=gen, dtype=torch.double).tolist():
        for budget in (Budget("flops", u or 1.0, True), Budget("params", float(round(2 + u * 1e12)), False),
                       Budget("flops", 1.0 + u * 1e9, False), Budget("flops", round(u, 3) or 1.0, True)):
            assert Budget.parse(str(budget)) == budget, (budget, str(budget))
    assert str(Budget("params", 1000, False)) == "params<=1K"  # an int value, built directly


# --------------------------------------------------------------------------- 2. criterion mixes


MIXES = [("di:0,hpse:0", "every weight is 0"), ("di:-1,hpse:2", "weight of 'di' is -1"),
         ("di:nan,hpse:1", "is nan"), ("di:inf,hpse:1", "is inf"), ("di:-1", "weight of 'di' is -1"),
         ("di:1,di:2", "twice"), ("foo:1", "unknown criterion 'foo'"), ("di:", "not a number"),
         ("di,hpse", "NAME:WEIGHT"), ("fparr", "unknown criterion 'fparr'; did you mean fpar?")]


@pytest.mark.parametrize("command", ["prune", "compare"])
@pytest.mark.parametrize("mix, fact", MIXES)
def test_criterion_mixes_are_refused_at_option_check(capsys, monkeypatch, base: Path, out: Path,
                                                     command: str, mix: str, fact: str) -> None:
    def no_work(*args, **kwargs):
        raise AssertionError("options must be refused before the baseline is loaded")

    monkeypatch.setattr(checkpoint, "load_baseline", no_work)
    before = snapshot(out)
    argv = (prune_argv(base, out, "--flops", "50%", "--criterion", mix) if command == "prune" else
            ["compare", "--checkpoint", str(base), "--out", str(out), "--flops", "50%", "--methods",
             "uniform", "--criterion", mix, "--seeds", "0", "--epochs", "0", "--no-progress"])
    assert_one_line(*run(capsys, *argv)[::2], "criterion", fact)
    assert snapshot(out) == before


@pytest.mark.parametrize("weights", [{"di": 0.0, "hpse": 0.0}, {"di": -1.0}, {"di": float("nan")},
                                     {"di": float("inf"), "l1": 1.0}, {}, {"di": True},
                                     {"di": 1e308, "l1": 1e308}])
def test_mix_api_applies_the_same_rule(weights: dict) -> None:
    scores = {n: {"u": torch.tensor([1.0, 2.0])} for n in ("di", "hpse", "l1")}
    with pytest.raises(CriterionError, match="criterion mix"):
        criteria.mix(weights, scores)
    from autoprune.prune import check_options
    with pytest.raises(CriterionError):  # the prune entry point refuses it too, before any work
        check_options("uniform", weights)


def test_valid_mixes_parse() -> None:
    assert criteria.parse_mix("di") == {"di": 1.0}
    assert criteria.parse_mix("di:2") == {"di": 2.0}
    assert criteria.parse_mix(" di : 0.6 , hpse:0.4 ") == {"di": 0.6, "hpse": 0.4}
    assert criteria.parse_mix("di:1,hpse:0") == {"di": 1.0, "hpse": 0.0}
    assert "fpar" in criteria.available() and "fpar" not in criteria.standalone()


# --------------------------------------------------------------------------- 3. checkpoints


CHECKPOINTS = {
    "arch is a string": (lambda d: d.__setitem__("arch", "resnet20"), "names no architecture"),
    "arch without name": (lambda d: d["arch"].pop("name"), "names no architecture"),
    "arch name not a string": (lambda d: d["arch"].__setitem__("name", ["resnet20"]), "names no architecture"),
    "arch unknown key": (lambda d: d["arch"].__setitem__("depth", 20), "unknown key 'depth'"),
    "arch kwargs a list": (lambda d: d["arch"].__setitem__("kwargs", [1]), "kwargs must be a dict"),
    "huge num_classes": (lambda d: d["arch"].__setitem__("num_classes", 10**9), "from 1 to 100000"),
    "huge model kwargs": (lambda d: d["arch"].update(name="resnet50", kwargs={"width_per_group": 10**6}),
                          "parameters needs about"),
    "long model name": (lambda d: d["arch"].__setitem__("name", "x" * 100_000), "unknown model"),
    "meta is a list": (lambda d: d.__setitem__("meta", [1, 2]), "meta must be a dict"),
    "meta.data is a string": (lambda d: d["meta"].__setitem__("data", "synthetic"), "meta.data must be a dict"),
    "meta.data.name a number": (lambda d: d["meta"]["data"].__setitem__("name", 7), "meta.data.name"),
    "huge input_shape": (lambda d: d["meta"].__setitem__("input_shape", [3, 100000, 100000]), "meta.input_shape"),
    "input_shape a string": (lambda d: d["meta"].__setitem__("input_shape", "abc"), "meta.input_shape"),
    "input_shape of floats": (lambda d: d["meta"].__setitem__("input_shape", [3.0, 8.0, 8.0]), "meta.input_shape"),
    "state_dict of strings": (lambda d: d.__setitem__("state_dict", {"conv1.weight": "x"}), "state_dict must map"),
    "state_dict a list": (lambda d: d.__setitem__("state_dict", [1]), "state_dict must map"),
}


@pytest.mark.parametrize("command", ["info", "prune"])
@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_hostile_checkpoints(capsys, base: Path, out: Path, tmp_path: Path, command: str, case: str) -> None:
    mutate, fact = CHECKPOINTS[case]
    saved = copy.deepcopy(torch.load(base, weights_only=True))
    mutate(saved)
    path = tmp_path / "hostile.pt"
    torch.save(saved, path)
    before = snapshot(out)
    argv = (["info", "--checkpoint", str(path)] if command == "info" else
            prune_argv(path, out, "--flops", "50%", "--method", "uniform"))
    line = assert_one_line(*run(capsys, *argv)[::2], fact)
    assert len(line) < 450
    assert snapshot(out) == before


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", ["info", "prune"])
def test_malicious_pickle_never_runs(capsys, base: Path, out: Path, tmp_path: Path, command: str) -> None:
    marker = tmp_path / "pwned"
    saved = torch.load(base, weights_only=True)
    saved["meta"]["note"] = _Payload(marker)
    path = tmp_path / "evil.pt"
    torch.save(saved, path)
    argv = (["info", "--checkpoint", str(path)] if command == "info" else
            prune_argv(path, out, "--flops", "50%"))
    assert_one_line(*run(capsys, *argv)[::2], "evil.pt", "refused")
    assert not marker.exists()


# --------------------------------------------------------------------------- 4. sizes


@pytest.mark.parametrize("argv, fact", [
    (["info", "--model", "resnet20", "--input-size", "100000"], "--input-size: expected a positive int at most 4096"),
    (["info", "--model", "resnet20", "--num-classes", "1000000000"],
     "--num-classes: expected a positive int at most 100000"),
    (["info", "--model", "resnet20", "--channels", "100000"], "--channels"),
    (["train", "--model", "resnet20", "--data", "synthetic", "--image-size", "100000"], "--image-size"),
    (["prune", "--model", "resnet20", "--data", "synthetic", "--image-size", "100000", "--flops", "50%"],
     "--image-size"),
    (["prune", "--model", "resnet20", "--data", "synthetic", "--flops", "50%", "--calib-images", "0"],
     "--calib-images"),
    (["train", "--model", "resnet20", "--data", "synthetic", "--batch-size", "9" * 400], "--batch-size"),
])
def test_sizes_beyond_the_caps(capsys, tmp_path: Path, argv: list[str], fact: str) -> None:
    line = assert_one_line(*run(capsys, *argv, "--out", str(tmp_path / "x"))[::2]
                           if argv[0] != "info" else run(capsys, *argv)[::2], fact)
    assert len(line) < 300


@pytest.fixture
def one_gigabyte(monkeypatch) -> None:
    """Pretend 1 GB of memory is free, so the memory estimates decide the same everywhere."""
    monkeypatch.setattr(limits, "available_memory", lambda device=None: 10**9)


@pytest.mark.parametrize("argv, fact", [
    (["info", "--model", "resnet20", "--input-size", "4096"], "a forward pass of resnet20"),
    (["info", "--model", "vgg16_bn", "--input-size", "2048", "--channels", "64"], "a forward pass of vgg16_bn"),
    (["train", "--model", "resnet20", "--data", "synthetic", "--image-size", "2048"], "synthetic at image size 2048"),
    (["train", "--model", "resnet20", "--data", "synthetic", "--image-size", "256"],
     "training resnet20 on 64 input(s)"),
    (["prune", "--checkpoint", "BASE", "--image-size", "2048", "--flops", "50%"], "synthetic at image size 2048"),
    (["prune", "--checkpoint", "BASE", "--image-size", "256", "--flops", "50%"], "training resnet20 on 64"),
])
def test_sizes_that_do_not_fit_in_memory(capsys, one_gigabyte, base: Path, out: Path, argv: list[str],
                                         fact: str) -> None:
    argv = [str(base) if a == "BASE" else a for a in argv]
    if argv[0] != "info":
        argv += ["--out", str(out / "base.pt") if argv[0] == "train" else str(out), "--no-progress"]
    before = snapshot(out)
    assert_one_line(*run(capsys, *argv)[::2], fact, "more than the 1 GB of", "memory free")
    assert snapshot(out) == before


def test_tiny_calibration_sets(capsys, base: Path, out: Path, tmp_path: Path) -> None:
    """DI compares classes: 1 calibration image is refused naming the minimum (2), and 2 images
    of two classes work; criteria that need no labels work with 1 (see test_calibrate)."""
    assert_one_line(*run(capsys, *prune_argv(base, out, "--flops", "50%", "--calib-images", "1"))[::2],
                    "--calib-images 1", "at least 2")
    target = tmp_path / "tiny"
    code, _, err = run(capsys, "prune", "--checkpoint", str(base), "--out", str(target), "--epochs", "0",
                       "--method", "uniform", "--calib-images", "2", "--flops", "50%", "--no-progress")
    assert code == 0, err
    assert json.loads((target / "report.json").read_text())["criterion"] == {"di": 1.0}


# --------------------------------------------------------------------------- 5. training


@pytest.mark.parametrize("argv, fact", [
    (["train", "--model", "resnet20", *DATA, "--lr", "1e308"], "--lr: expected a positive float at most 1000"),
    (["train", "--model", "resnet20", *DATA, "--lr", "nan"], "--lr"),
    (["train", "--model", "resnet20", *DATA, "--epochs", "1", "--batch-size", "8", "--lr", "1000"],
     "training diverged"),
    (["prune", "--checkpoint", "BASE", "--flops", "50%", "--method", "uniform", "--criterion", "l1",
      "--epochs", "1", "--lr", "1000"], "training diverged"),
])
def test_learning_rates_that_diverge(capsys, tmp_path: Path, out: Path, argv: list[str], fact: str) -> None:
    base = tmp_path / "digits.pt"  # digits: enough batches of 64 for the fine-tune to blow up
    checkpoint.save_baseline(base, ap.models.create("resnet20", num_classes=10),
                             data={"name": "digits", "image_size": SIZE}, input_shape=[3, SIZE, SIZE])
    argv = [str(base) if a == "BASE" else a for a in argv]
    argv += ["--out", str(out / "new.pt") if argv[0] == "train" else str(out), "--no-progress"]
    before = snapshot(out)
    line = assert_one_line(*run(capsys, *argv)[::2], fact)
    if "diverged" in fact:
        assert "lower learning rate (--lr)" in line
    assert snapshot(out) == before


# --------------------------------------------------------------------------- 6. checks that came too late


@pytest.mark.parametrize("argv, fact", [
    (["compare", "--flops", "50%", "--methods", "uniform,foo"], "unknown method 'foo'; choose from uniform, greedy"),
    (["compare", "--flops", "50%", "--methods", "uniform,uniform"], "given twice"),
    (["compare", "--flops", "50%", "--methods", ","], "non-empty"),
    (["compare", "--flops", "50%", "--methods", "uniform,search", "--space", "nope"], "nope"),
    (["compare", "--flops", "50%", "--methods", "greedy", "--criterion", "fpar:nan"], "fpar"),
    (["prune", "--flops", "50%", "--method", "foo"], "unknown method 'foo'"),
])
def test_options_checked_before_any_work(capsys, monkeypatch, base: Path, out: Path, argv: list[str],
                                         fact: str) -> None:
    def no_work(*args, **kwargs):
        raise AssertionError("options must be refused before the baseline is loaded")

    monkeypatch.setattr(checkpoint, "load_baseline", no_work)
    before = snapshot(out)
    code, _, err = run(capsys, *argv, "--checkpoint", str(base), "--out", str(out), "--no-progress")
    assert_one_line(code, err, fact)
    assert snapshot(out) == before


@pytest.mark.parametrize("where", ["folder", "under a file"])
def test_train_out_checked_before_training(capsys, monkeypatch, out: Path, where: str) -> None:
    from autoprune import data

    def no_work(*args, **kwargs):
        raise AssertionError("--out must be refused before the data is loaded")

    monkeypatch.setattr(data, "load", no_work)
    target = out if where == "folder" else out / "model.pt" / "base.pt"
    before = snapshot(out)
    code, _, err = run(capsys, "train", "--model", "resnet20", *DATA, "--out", str(target), "--no-progress")
    assert_one_line(code, err, "--out")
    assert snapshot(out) == before


# --------------------------------------------------------------------------- 7. compare's finished runs


@pytest.fixture(scope="module")
def compared(tmp_path_factory, base: Path) -> tuple[list[str], Path]:
    out = tmp_path_factory.mktemp("compare") / "out"
    argv = ["compare", "--checkpoint", str(base), "--flops", "50%", "--methods", "uniform", "--criterion",
            "l1", "--seeds", "0", "--epochs", "0", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    return argv, out


@pytest.mark.parametrize("damage", [
    lambda text: text[: len(text) // 2],                     # truncated (not JSON)
    lambda text: "[1, 2, 3]",                                # JSON of the wrong shape
    lambda text: json.dumps({**json.loads(text), "pruned": {**json.loads(text)["pruned"], "accuracy": "high"}}),
], ids=["truncated", "list", "field-types"])
def test_compare_reruns_a_corrupted_run(capsys, compared, damage) -> None:
    argv, out = compared
    capsys.readouterr()
    [report] = list((out / "runs").glob("*/report.json"))
    report.write_text(damage(report.read_text()))
    code, _, err = run(capsys, *argv)
    assert code == 0, err
    name = f"runs/{report.parent.name}/report.json"
    assert err.strip().splitlines() == [f"{name} is unreadable; rerunning"]
    again = json.loads(report.read_text())
    assert again["method"] == "uniform" and again["pruned"]["flops"] > 0
    code, _, err = run(capsys, *argv)  # the repaired run is reused, silently
    assert code == 0 and err.strip() == ""


# --------------------------------------------------------------------------- 8. Ctrl-C while tracing


def test_ctrl_c_while_tracing_is_an_interrupt_not_a_model_error(capsys, monkeypatch) -> None:
    """Torch-Pruning retries a failed forward with other arguments; the retry's error must not
    hide the Ctrl-C behind 'cannot trace'."""
    from autoprune.models import cifar

    original = cifar.CifarResNet.forward

    def forward(self, x):
        if torch.is_grad_enabled() and isinstance(x, torch.Tensor):  # tracing, not the no-grad probe
            raise KeyboardInterrupt
        return original(self, x)  # the retry passes a tuple: a TypeError chained to the interrupt

    monkeypatch.setattr(cifar.CifarResNet, "forward", forward)
    code, _, err = run(capsys, "info", "--model", "resnet20", "--input-size", str(SIZE))
    assert code == 130
    assert err.strip().splitlines() == ["autoprune: interrupted"]
