"""Tests for the ``autoprune`` command line (info, train, error handling)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import autoprune as ap
from autoprune import checkpoint, data, train
from autoprune.cli import main

SIZE = 8


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def totals(out: str) -> ap.Cost:
    flops = re.search(r"^total FLOPs\s+([\d,]+)", out, re.M).group(1)
    params = re.search(r"^total params\s+([\d,]+)", out, re.M).group(1)
    return ap.Cost(int(flops.replace(",", "")), int(params.replace(",", "")))


def unit_rows(out: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split() for line in out.splitlines()[1:]
            if line and not line.startswith("total")}


def assert_usage_error(code: int, err: str, *facts: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoprune: error: "), err
    assert "Traceback" not in err
    for fact in facts:
        assert fact in lines[0], (fact, lines[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A resnet20 baseline trained for one short epoch on 8x8 digits through the CLI."""
    out = tmp_path_factory.mktemp("cli") / "base.pt"
    code = main(["train", "--model", "resnet20", "--data", "digits", "--image-size", str(SIZE),
                 "--epochs", "1", "--batch-size", "128", "--seed", "3", "--out", str(out),
                 "--no-progress"])
    assert code == 0 and out.is_file()
    return out


# --------------------------------------------------------------------------- info


def test_info_lists_every_unit_and_fvcore_totals(capsys) -> None:
    code, out, err = run(capsys, "info", "--model", "resnet20", "--input-size", str(SIZE))
    assert code == 0, err
    model = ap.models.create("resnet20", num_classes=10)
    x = torch.zeros(1, 3, SIZE, SIZE)
    space = ap.Space(model.eval(), x)
    rows = unit_rows(out)
    assert list(rows) == ["unit"] + space.unit_names
    for unit in space.units:
        assert rows[unit.name][1:4] == [str(unit.width), str(unit.min_width), str(unit.step)]
        shares = [float(v.rstrip("%")) for v in rows[unit.name][4:6]]
        assert all(0 < s <= 100 for s in shares)
    assert totals(out) == ap.fvcore_cost(model, x) == space.cost()


def test_info_from_checkpoint_uses_its_input_shape(capsys, trained: Path) -> None:
    code, out, err = run(capsys, "info", "--checkpoint", str(trained))
    assert code == 0, err
    model, meta = checkpoint.load_baseline(trained)
    assert meta["input_shape"] == [3, SIZE, SIZE]
    assert f"input 1x3x{SIZE}x{SIZE}" in out
    assert totals(out) == ap.fvcore_cost(model, torch.zeros(1, 3, SIZE, SIZE))


def test_console_script_runs_info() -> None:
    exe = shutil.which("autoprune")
    cmd = [exe] if exe else [sys.executable, "-m", "autoprune.cli"]
    proc = subprocess.run(cmd + ["info", "--model", "resnet20", "--input-size", str(SIZE)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "layer3.2.conv1" in proc.stdout
    assert totals(proc.stdout).params == 272474


# --------------------------------------------------------------------------- train


def test_train_writes_a_checkpoint_that_reloads_identically(capsys, trained: Path) -> None:
    model, meta = checkpoint.load_baseline(trained)
    bundle = data.load("digits", image_size=SIZE, seed=3)
    assert meta["accuracy"] == train.accuracy(model, bundle.test)
    assert meta["data"]["name"] == "digits" and meta["epochs"] == 1 and meta["seed"] == 3
    again, _ = checkpoint.load_baseline(trained)
    x = bundle.test.images[:16]
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again.eval()(x))


def test_train_module_history_and_repeatability() -> None:
    bundle = data.load("synthetic", image_size=SIZE, n_per_class=16, seed=1)
    histories, states = [], []
    for _ in range(2):
        torch.manual_seed(0)
        model = ap.models.create("resnet20", num_classes=bundle.num_classes)
        histories.append(train.train(model, bundle, epochs=2, batch_size=16, progress=False))
        states.append(model.state_dict())
    h = histories[0]
    assert len(h["train_loss"]) == len(h["val_acc"]) == 2 and 0 <= h["test_acc"] <= 1
    assert histories[0] == histories[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert train.default_device().type in ("cpu", "cuda")


# --------------------------------------------------------------------------- errors


def test_unknown_model_names_close_matches(capsys) -> None:
    code, _, err = run(capsys, "info", "--model", "resnet21")
    assert_usage_error(code, err, "unknown model 'resnet21'", "resnet20")


def test_unknown_dataset(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "train", "--model", "resnet20", "--data", "digitz",
                       "--out", str(tmp_path / "x.pt"))
    assert_usage_error(code, err, "unknown dataset 'digitz'", "digits")
    assert not (tmp_path / "x.pt").exists()


def test_checkpoint_of_another_architecture(capsys, trained: Path, tmp_path: Path) -> None:
    saved = torch.load(trained, weights_only=True)
    saved["arch"]["name"] = "resnet32"
    torch.save(saved, tmp_path / "wrong.pt")
    code, _, err = run(capsys, "info", "--checkpoint", str(tmp_path / "wrong.pt"))
    assert_usage_error(code, err, "does not fit resnet32")


def test_checkpoint_of_other_model_than_named(capsys, trained: Path) -> None:
    code, _, err = run(capsys, "info", "--checkpoint", str(trained), "--model", "resnet56")
    assert_usage_error(code, err, "holds resnet20, not resnet56")


def test_truncated_checkpoint(capsys, trained: Path, tmp_path: Path) -> None:
    blob = trained.read_bytes()
    (tmp_path / "half.pt").write_bytes(blob[: len(blob) // 2])
    code, _, err = run(capsys, "info", "--checkpoint", str(tmp_path / "half.pt"))
    assert_usage_error(code, err, "half.pt", "truncated")


def test_missing_checkpoint(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "info", "--checkpoint", str(tmp_path / "nope.pt"))
    assert_usage_error(code, err, "nope.pt", "does not exist")


@pytest.mark.parametrize("argv, fact", [
    ([], "COMMAND"),
    (["bogus"], "invalid choice: 'bogus'"),
    (["info"], "--model NAME or --checkpoint FILE"),
    (["info", "--model", "resnet20", "--input-size", "0"], "--input-size"),
    (["train", "--model", "resnet20", "--data", "digits", "--epochs", "x"], "--epochs"),
    (["train", "--data", "digits"], "--model"),
])
def test_usage_errors_are_one_line(capsys, argv: list[str], fact: str) -> None:
    code, _, err = run(capsys, *argv)
    assert_usage_error(code, err, fact)


def test_keyboard_interrupt(capsys, monkeypatch) -> None:
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ap.models, "create", interrupt)
    code, _, err = run(capsys, "info", "--model", "resnet20")
    assert code == 130 and err.strip() == "autoprune: interrupted"


# --------------------------------------------------------------------------- data options


def test_data_help_lists_every_dataset_and_where_files_come_from(capsys) -> None:
    from autoprune.idx import ENV_VAR

    code, out, _ = run(capsys, "train", "--help")
    train_help = " ".join(out.split())
    assert code == 0
    for name in data.DATASET_NAMES:
        assert name in train_help
    for flag in ("--data-root DIR folder holding the cifar10/cifar100 or fashion-mnist files",
                 "--download download cifar10/cifar100 or fashion-mnist", f"${ENV_VAR}"):
        assert flag in train_help


def test_train_size_reaches_the_loader_and_a_checkpoints_runs(capsys, tmp_path: Path, monkeypatch) -> None:
    import importlib

    from conftest import write_fake_fashion_mnist

    root = tmp_path / "fm"
    write_fake_fashion_mnist(root, n_train=5100, n_test=40)  # the loader keeps 5000 for validation
    out = tmp_path / "fm.pt"
    code, _, err = run(capsys, "train", "--model", "resnet20", "--data", "fashion-mnist", "--data-root", str(root),
                       "--image-size", "8", "--train-size", "50", "--epochs", "1", "--out", str(out),
                       "--no-progress")
    assert code == 0, err
    _, meta = checkpoint.load_baseline(out)
    assert meta["data"]["train_size"] == 50
    assert meta["data"]["sizes"] == {"train": 50, "val": 5000, "test": 40}

    seen = {}

    class Seen(ap.AutopruneError):
        pass

    def capture(model, bundle, *args, **kwargs):  # what prune would run on, then stop
        seen["train"] = len(bundle.train)
        raise Seen("captured")

    monkeypatch.setattr(importlib.import_module("autoprune.prune"), "prune", capture)
    for extra, expected in (([], 50), (["--train-size", "60"], 60)):  # the checkpoint's, unless given
        code, _, err = run(capsys, "prune", "--checkpoint", str(out), "--data-root", str(root), "--flops", "50%",
                           "--out", str(tmp_path / "p"), "--no-progress", *extra)
        assert code == 2 and "captured" in err and seen["train"] == expected


def test_train_size_is_refused_for_a_dataset_without_it(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "train", "--model", "resnet20", "--data", "digits", "--train-size", "100",
                       "--out", str(tmp_path / "x.pt"), "--no-progress")
    assert_usage_error(code, err, "'digits'", "train_size")
    assert not (tmp_path / "x.pt").exists()
