"""A run's outputs are replaced as one set (manifest last), and Ctrl-C anywhere exits 130.

The interruption tests raise KeyboardInterrupt from ``os.replace`` at every call of a
write in turn and require the old complete set or the new complete set afterwards; the
manifest's SHA-256s are recomputed here with hashlib.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from autoprune.checkpoint import atomic_write_text
from autoprune.outputs import MANIFEST, STAGING_PREFIX, check_output_set, output_set, read_manifest

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit\.script.*:FutureWarning")  # via torch_pruning

NAMES = ("model.pt", "plan.json", "report.json", "widths.png")
REPO = Path(__file__).resolve().parents[1]


def write_set(out: Path, tag: str, names=NAMES) -> dict:
    """A set whose files say ``tag:NAME``; each file is itself written atomically (os.replace)."""
    with output_set(out, names) as files:
        for name in names:
            atomic_write_text(files.path(name), f"{tag}:{name}")
    return files.manifest


def tags(out: Path, names) -> set[str]:
    return {(out / n).read_text().split(":")[0] if (out / n).exists() else "missing" for n in names}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name.startswith("."))


class Interrupting:
    """os.replace raising KeyboardInterrupt at the given calls (before or after renaming)."""

    def __init__(self, at, after: bool):
        self.at, self.after, self.calls, self.real = set(at), after, 0, os.replace

    def __call__(self, src, dst):
        self.calls += 1
        if self.calls in self.at and not self.after:
            raise KeyboardInterrupt
        self.real(src, dst)
        if self.calls in self.at:
            raise KeyboardInterrupt


def count_replaces(tmp_path: Path, monkeypatch) -> int:
    write_set(tmp_path / "count", "old")
    counter = Interrupting((), after=False)
    with monkeypatch.context() as m:
        m.setattr(os, "replace", counter)
        write_set(tmp_path / "count", "new", NAMES[:3])
    return counter.calls


@pytest.mark.parametrize("after", [False, True], ids=["before-rename", "after-rename"])
def test_ctrl_c_at_each_rename_leaves_the_old_or_the_new_set(tmp_path, monkeypatch, after):
    calls = count_replaces(tmp_path, monkeypatch)
    assert calls == 3 + 4  # 3 staged atomic writes, then 3 files and the manifest into place
    outcomes = []
    for k in range(1, calls + 1):
        out = tmp_path / f"out{k}"
        old = write_set(out, "old")  # the old set has widths.png, the new one does not
        with monkeypatch.context() as m:
            m.setattr(os, "replace", Interrupting({k}, after))
            with pytest.raises(KeyboardInterrupt):
                write_set(out, "new", NAMES[:3])
        assert check_output_set(out) == [], k
        assert leftovers(out) == [], k  # no staging folder, no temporary file
        manifest = read_manifest(out)
        if manifest == old:
            assert tags(out, NAMES) == {"old"}, k
            outcomes.append("old")
        else:
            assert tags(out, NAMES[:3]) == {"new"} and not (out / "widths.png").exists(), k
            assert sorted(manifest["files"]) == sorted(NAMES[:3])
            outcomes.append("new")
    # staging interrupted: the old set stays; renames interrupted: they finish, the new set
    assert outcomes == ["old"] * 3 + ["new"] * 4


def test_second_ctrl_c_during_the_renames_leaves_an_incomplete_set(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_set(out, "old")
    with monkeypatch.context() as m:
        m.setattr(os, "replace", Interrupting({6, 7}, after=False))  # the 2nd file, then its retry
        with pytest.raises(KeyboardInterrupt):
            write_set(out, "new")
    assert tags(out, NAMES) == {"old", "new"}  # a mix on disk ...
    assert check_output_set(out) and not (out / MANIFEST).exists()  # ... never called complete
    assert leftovers(out) == []
    write_set(out, "next")
    assert check_output_set(out) == [] and tags(out, NAMES) == {"next"}


def test_real_sigints_during_the_renames_wait_for_them(tmp_path, monkeypatch):
    out = tmp_path / "out"
    write_set(out, "old")
    real, calls = os.replace, []

    def replace(src, dst):
        real(src, dst)
        calls.append(dst)
        if len(calls) in (6, 7):  # two Ctrl-C after the 2nd and 3rd file are in place
            os.kill(os.getpid(), signal.SIGINT)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", replace)
        with pytest.raises(KeyboardInterrupt):
            write_set(out, "new")
    assert check_output_set(out) == [] and tags(out, NAMES) == {"new"} and leftovers(out) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_an_error_while_staging_keeps_the_old_set(tmp_path):
    out = tmp_path / "out"
    old = write_set(out, "old")
    with pytest.raises(RuntimeError), output_set(out, NAMES) as files:
        files.path("model.pt").write_text("new")
        raise RuntimeError("fine-tune failed")
    assert read_manifest(out) == old and check_output_set(out) == [] and leftovers(out) == []


def test_manifest_sha256_and_sizes_recomputed(tmp_path):
    out = tmp_path / "out"
    with output_set(out) as files:  # no names given: the set is what was written
        files.path("model.pt").write_bytes(os.urandom(3000))
        files.path("report.json").write_text(json.dumps({"a": 1}))
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest == files.manifest and len(manifest["run_id"]) == 32
    assert manifest["files"] == {
        name: {"size": len((out / name).read_bytes()),
               "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest()}
        for name in ("model.pt", "report.json")}
    assert check_output_set(out) == []
    (out / "report.json").write_text(json.dumps({"a": 2}))  # same size, other bytes
    assert check_output_set(out) == [f"report.json is not the file of run {manifest['run_id']} "
                                     "(size or SHA-256 differs)"]
    (out / "model.pt").unlink()
    assert "model.pt is missing" in check_output_set(out)
    (out / MANIFEST).unlink()
    assert "no manifest.json" in check_output_set(out)[0]


def test_bad_names_are_refused(tmp_path):
    for name in ("", "a/b", "../x", ".hidden", MANIFEST):
        with pytest.raises(ValueError), output_set(tmp_path, [name]):
            pass
    with pytest.raises(ValueError, match="not one of"), output_set(tmp_path, ["a"]) as files:
        files.path("b")
    with pytest.raises(Exception, match="lack b"), output_set(tmp_path, ["a", "b"]) as files:
        files.path("a").write_text("a")
    assert leftovers(tmp_path) == [] and not (tmp_path / MANIFEST).exists()


KILLED_WRITER = """
import sys, time
from autoprune.outputs import output_set
with output_set(sys.argv[1], ["model.pt", "plan.json"]) as files:
    files.path("model.pt").write_text("killed")
    print("staged", flush=True)
    time.sleep(120)
"""


def test_sigkilled_writer_leaves_staging_that_the_next_write_removes(tmp_path):
    out = tmp_path / "out"
    write_set(out, "old", ("model.pt", "plan.json"))
    child = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE,
                             text=True, cwd=REPO)
    try:
        assert child.stdout.readline().strip() == "staged"
    finally:
        child.kill()  # SIGKILL: no finally, no cleanup
        child.wait()
    killed = [p for p in out.iterdir() if p.name.startswith(f"{STAGING_PREFIX}{child.pid}-")]
    assert len(killed) == 1 and (killed[0] / "model.pt").read_text() == "killed"
    assert check_output_set(out) == []  # the old set was never touched

    # a temporary file of the old, file-by-file writer from before this process, and a fresh one
    stale, fresh = out / ".plan.json.ab12cd34", out / ".model.pt.zz99yy88"
    stale.write_text("x"), fresh.write_text("y")
    hour_ago = time.time() - 3600
    os.utime(stale, (hour_ago, hour_ago))
    # a live writer's staging folder (its lock held here) must survive
    with output_set(out, ["model.pt"]) as live:
        write_set(out, "new", ("model.pt", "plan.json"))
        assert not killed[0].exists() and not stale.exists() and fresh.exists()
        assert live.staging.exists()
        live.path("model.pt").write_text("live")
    assert check_output_set(out) == [] and (out / "model.pt").read_text() == "live"
    assert not (out / "plan.json").exists()  # the live set replaced the set holding plan.json


def test_write_outputs_writes_one_set_and_says_what_it_replaced(tmp_path, caplog):
    import torch

    import autoprune as ap
    from autoprune.pipeline import write_outputs

    model = ap.models.create("resnet20", num_classes=10)
    space = ap.Space(model, torch.randn(1, 3, 8, 8))
    widths = {u.name: max(u.min_width, u.width // 2) for u in space.units}
    plan = ap.select(space, widths)
    small = plan.apply(model)
    report = {"method": "uniform", "budget": {"spec": "flops<=50%"},
              "widths": {u.name: (widths[u.name], u.width) for u in space.units}}
    out = tmp_path / "out"
    first = write_outputs(out, plan, small, report, extra={"history.png": lambda p: p.write_bytes(b"h")})
    assert first.replaced is None
    assert sorted(first.manifest["files"]) == sorted([*NAMES, "history.png"])
    with caplog.at_level(logging.INFO, logger="autoprune"):
        second = write_outputs(out, plan, small, report)
    assert second.replaced == first.manifest["created"][:16].replace("T", " ")
    assert [r.getMessage() for r in caplog.records] == [
        f"replacing the model in {out} (from a run of {second.replaced})"]
    assert check_output_set(out) == [] and not (out / "history.png").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted([*NAMES, MANIFEST])
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(ap.load(out / "model.pt").eval()(x), small.eval()(x), atol=1e-6)


# --------------------------------------------------------------------------- Ctrl-C during imports

INTERRUPT_ON_TORCH = """
import sys
class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
sys.meta_path.insert(0, Interrupt())
import autoprune
assert "torch" not in sys.modules, "import autoprune must stay light"
from autoprune.__main__ import main
sys.exit(main(["info", "--model", "resnet20"]))
"""


def test_ctrl_c_while_importing_torch_exits_130_with_one_line():
    done = subprocess.run([sys.executable, "-c", INTERRUPT_ON_TORCH], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert (done.returncode, done.stderr) == (130, "autoprune: interrupted\n")


def test_sigint_to_the_console_script_during_imports():
    script = Path(sys.executable).with_name("autoprune")
    if not script.is_file() or "autoprune.__main__" not in script.read_text():
        pytest.skip("console script not installed from this pyproject (pip install -e .)")
    env = dict(os.environ, PYTHONPROFILEIMPORTTIME="1")  # stderr lines mark import progress
    child = subprocess.Popen([str(script), "info", "--model", "resnet20"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        for line in child.stderr:  # Python is running and importing torch: interrupt it there
            if "torch" in line:
                child.send_signal(signal.SIGINT)
                break
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    messages = [ln for ln in err.splitlines() if not ln.startswith("import time:")]
    assert (child.returncode, messages) == (130, ["autoprune: interrupted"])


# --------------------------------------------------------------------------- real signals (strace)

STRACED_WRITE = """
import sys
from pathlib import Path
from autoprune.checkpoint import atomic_write_text
from autoprune.outputs import output_set
names = ("model.pt", "plan.json", "report.json", "widths.png")
with output_set(Path(sys.argv[1]), names) as files:
    for name in names:
        atomic_write_text(files.path(name), f"{sys.argv[2]}:{name}")
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_sigint_injected_after_each_rename_syscall(tmp_path):
    """The original report: ``strace -e inject=rename:signal=SIGINT:when=N`` between renames."""
    seen = set()
    subprocess.run([sys.executable, "-c", STRACED_WRITE, str(tmp_path / "old"), "old"], check=True, cwd=REPO)
    old = read_manifest(tmp_path / "old")
    for when in range(1, 9):  # 4 staged files, then 4 files and the manifest into place
        out = shutil.copytree(tmp_path / "old", tmp_path / f"out{when}")
        calls = "rename,renameat,renameat2"
        done = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "-e", f"trace={calls}",
                               "-e", f"inject={calls}:signal=SIGINT:when={when}",
                               sys.executable, "-c", STRACED_WRITE, str(out), "new"],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert check_output_set(out) == [], (when, done.stderr)
        assert leftovers(out) == [], when
        state = "old" if read_manifest(out) == old else "new"
        assert tags(out, NAMES) == {state}, when
        seen.add((state, done.returncode))
    assert {state for state, _ in seen} == {"old", "new"}


def test_two_writers_of_one_plot_at_once_do_not_collide(tmp_path, monkeypatch):
    """Two comparisons in one folder (the experiment scripts run two side by side) may write the
    same plot at once: a save begun while another is half-written must not remove or overwrite
    the other's temporary file (a shared temporary name made the first rename fail)."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    from autoprune import report

    path = tmp_path / "accuracy_vs_flops.png"
    original, nested = Figure.savefig, []

    def savefig(fig, f, **kw):
        original(fig, f, **kw)
        if not nested:  # the outer save is half done: another writer saves the same plot now
            nested.append(1)
            inner, ax = plt.subplots()
            ax.plot([0, 1], [1, 0])
            report._save(inner, path)

    monkeypatch.setattr(Figure, "savefig", savefig)
    outer, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    report._save(outer, path)
    assert nested and path.read_bytes().startswith(b"\x89PNG") and path.stat().st_size > 1000
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
