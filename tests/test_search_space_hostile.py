"""Hostile search-space files: each one loads, or fails at load with one SearchSpaceError
line naming the file — before any heavy work, and without formatting an unbounded value
(an alias bomb, a 10**300 count, a 100,000-item list, a catastrophic regex, bad sampler
arguments, an unknown criterion)."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml

import autoprune as ap
from autoprune import criteria
from autoprune.cli import main
from autoprune.errors import AutopruneError
from autoprune.search import SearchSpace, SearchSpaceError, load
from autoprune.search.samplers import sampler_args, sampler_class
from autoprune.search.space import MAX_FILE_BYTES, SAMPLERS, WEIGHT_LOW, show

optuna.logging.set_verbosity(optuna.logging.WARNING)
pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

GOOD = """ratios:
  - {match: '.*', low: 0.0, high: 0.8, tie: stage}
criteria: [di, l1]
"""
BIG = "9" * 300  # an integer of 300 digits
ROOT = Path(__file__).resolve().parents[1]


def bomb(levels: int = 10) -> str:
    """A YAML alias bomb of about 600 bytes that expands to 9**levels strings."""
    lines = ["description:", "  k0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"  k{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return GOOD + "\n".join(lines) + "\n"


def write(tmp_path: Path, text: "str | bytes", name: str = "hostile.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def refused(path: Path) -> str:
    """The one-line SearchSpaceError message for ``path`` (fails if it loads)."""
    with pytest.raises(SearchSpaceError) as err:
        load(path)
    message = str(err.value)
    assert isinstance(err.value, AutopruneError)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message and len(message) < 500, message
    return message


def cli(path: Path, tmp_path: Path, capsys) -> str:
    """Run ``autoprune search`` on ``path``: exit 2 and one stderr line, no traceback."""
    status = main(["search", "--model", "resnet20", "--data", "digits", "--flops", "50%",
                   "--space", str(path), "--out", str(tmp_path / "out")])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert status == 2, captured
    assert len(lines) == 1 and lines[0].startswith("autoprune: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "out").exists()  # refused before any work
    return lines[0]


# ----------------------------------------------------------------------------- 1. alias bomb

def test_show_never_builds_a_full_repr():
    assert show([7] * 10_000_000) == "[7, 7, 7, 7, 7, 7, ...]"
    assert show(10 ** 300) == "<an integer of about 301 digits>"
    assert len(show("x" * 10_000_000)) <= 60 and len(show(b"y" * 10_000_000)) <= 60
    nested = [[[[[[1]]]]]] * 1000
    assert len(show({"a": nested, "b": {"c": nested}})) <= 60
    assert show({"lr": 0.1}) == "{'lr': 0.1}"


def test_alias_bomb_and_anchors_are_refused(tmp_path):
    message = refused(write(tmp_path, bomb()))
    assert "anchors and aliases (&name, *name) are not allowed" in message and "line 5" in message
    # an anchor alone (no alias) is refused too: the rule is simple to state
    assert "anchors and aliases" in refused(write(tmp_path, GOOD + "proxy: &p {lr: 0.1}\n"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs RLIMIT_AS and /proc")
def test_alias_bomb_ends_quickly_under_an_address_space_limit(tmp_path):
    """Through the real CLI in a child process whose address space is capped at 2 GiB above
    what the imports (torch, Ray) take: the bomb, expanded, needs about 17 GB."""
    path = write(tmp_path, bomb())
    child = textwrap.dedent(f"""
        import resource, sys
        from autoprune.cli import main
        import autoprune.search.runner  # noqa: F401 - imported by `search`; mapped before the cap
        size = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize:"))
        cap = size + (2 << 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        sys.exit(main(["search", "--model", "resnet20", "--data", "digits", "--flops", "50%",
                       "--space", {str(path)!r}, "--out", {str(tmp_path / "out")!r}]))
        """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60,
                          env=env, cwd=tmp_path)
    took = time.monotonic() - start
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f"autoprune: error: {path}: line 5"), proc.stderr
    assert "anchors and aliases" in lines[0] and "Traceback" not in proc.stderr
    assert took < 60


# ----------------------------------------------------------------------------- 2. file level

def test_too_large_file_is_refused_before_it_is_parsed(tmp_path):
    path = write(tmp_path, GOOD + "#" * MAX_FILE_BYTES + "\n")
    assert "is larger than 1 MiB" in refused(path)
    assert load(write(tmp_path, GOOD + "# " + "x" * 1000 + "\n", "fine.yaml")).criteria == ["di", "l1"]


@pytest.mark.parametrize("data", [bytes(range(256)) * 4, b"\x89PNG\r\n\x1a\n" + bytes(64),
                                  GOOD.encode("latin-1") + b"description: caf\xe9\n",
                                  GOOD.encode() + b"\x00\x00\x00"])
def test_binary_or_non_utf8_file_is_one_line(tmp_path, data):
    assert "is not a UTF-8 text YAML file" in refused(write(tmp_path, data))


@pytest.mark.parametrize("text, expected", [
    (GOOD + "proxy: {lr: 0.1\n", "line 5, column 1: not valid YAML"),
    (GOOD + "\tproxy: {}\n", "line 4, column 1: not valid YAML"),
    (GOOD + "---\n" + GOOD, "line 4, column 1: not valid YAML (but found another document)"),
    (GOOD + "criteria: [l1]\n", "line 4, column 1: key 'criteria' appears twice"),
    ("[1, 2, 3]\n", "top level: must be a mapping (key: value lines), got [1, 2, 3]"),
    ("just text\n", "top level: must be a mapping (key: value lines), got 'just text'"),
    (GOOD + "description: !!python/object/apply:os.system ['true']\n",
     "line 4, column 14: not valid YAML (could not determine a constructor"),
    (GOOD + "description: 2020-13-45\n", "a value is not valid YAML (ValueError: month must be in 1..12)"),
    (GOOD.replace("high: 0.8", "high: " + "9" * 5000), "a value is not valid YAML (ValueError: Exceeds"),
])
def test_syntax_errors_and_non_mapping_top_level_are_one_line(tmp_path, text, expected):
    assert expected in refused(write(tmp_path, text))


# ----------------------------------------------------------------------------- 3. sampler arguments

@pytest.mark.parametrize("sampler, key, expected", [
    ("{name: tpe, n_startup_trials: eight}", "sampler.n_startup_trials",
     "must be an integer (TPESampler's n_startup_trials), got 'eight'"),
    ("{name: tpe, n_startup_trials: 8.0}", "sampler.n_startup_trials", "must be an integer"),
    ("{name: tpe, n_startup_trials: true}", "sampler.n_startup_trials", "must be an integer"),
    ("{name: tpe, n_startup_trials: -3}", "sampler.n_startup_trials", "must be in [0, 100000]"),
    ("{name: tpe, n_ei_candidates: 0}", "sampler.n_ei_candidates", "must be in [1, 100000]"),
    (f"{{name: tpe, n_ei_candidates: {BIG}}}", "sampler.n_ei_candidates", "about 301 digits"),
    ("{name: tpe, multivariate: 1}", "sampler.multivariate", "must be true or false or null"),
    ("{name: tpe, prior_weight: .nan}", "sampler.prior_weight", "must be a number or null"),
    ("{name: tpe, n_start: 3}", "sampler.n_start",
     "unknown argument of optuna's TPESampler; did you mean 'n_startup_trials'? (allowed: name,"),
    ("{name: tpe, gamma: 3}", "sampler.gamma", "takes a Python object (Callable"),
    ("{name: nsga2, population_size: 1}", "sampler.population_size", "must be in [2, 100000]"),
    ("{name: nsga2, crossover_prob: 2}", "sampler.crossover_prob", "must be in [0, 1]"),
    ("{name: random, n_startup_trials: 3}", "sampler.n_startup_trials", "(allowed: name)"),
    ("{name: cmaes, x0: {a: 1}}", "sampler.x0", "takes a Python object"),
    ("{name: cmaes, restart_strategy: " + "x" * 500 + "}", "sampler.restart_strategy",
     "a string (at most 100 characters)"),
])
def test_sampler_arguments_are_typed_at_load(tmp_path, sampler, key, expected):
    message = refused(write(tmp_path, GOOD + f"sampler: {sampler}\n"))
    assert message.startswith(f"{tmp_path / 'hostile.yaml'}: {key}: "), message
    assert expected in message, message


def test_valid_sampler_arguments_load_and_build():
    s = SearchSpace.from_dict({"ratios": [{"high": 0.5}], "criteria": ["l1"],
                               "sampler": {"name": "tpe", "n_startup_trials": 8, "multivariate": True,
                                           "n_ei_candidates": 12, "consider_magic_clip": None}})
    assert s.sampler == {"name": "tpe", "n_startup_trials": 8, "multivariate": True,
                         "n_ei_candidates": 12, "consider_magic_clip": None}
    assert isinstance(s.make_sampler(0), optuna.samplers.TPESampler)
    s = SearchSpace.from_dict({"ratios": [{"high": 0.5}], "criteria": ["l1"],
                               "sampler": {"name": "nsga2", "crossover_prob": 1, "population_size": 4}})
    assert isinstance(s.make_sampler(0), optuna.samplers.NSGAIISampler)  # an int where a float goes


@pytest.mark.parametrize("name", SAMPLERS)
def test_every_settable_sampler_argument_accepts_its_own_default(name):
    """Recount from optuna's side: each argument YAML can write, set to the default value
    the sampler's signature declares, must load and build."""
    import inspect
    cls = sampler_class(name)
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
    settable = {k: v for k, v in sampler_args(cls).items() if isinstance(v, tuple)}
    assert name == "random" or settable  # every sampler but random has some
    for arg in settable:
        spec = {"name": name, arg: defaults[arg]}
        s = SearchSpace.from_dict({"ratios": [{"high": 0.5}], "criteria": ["l1"], "sampler": spec})
        assert s.make_sampler(1) is not None


# ----------------------------------------------------------------------------- 4. criteria

def test_every_criterion_loads_fpar_included_and_an_unknown_one_is_refused(tmp_path):
    message = refused(write(tmp_path, GOOD.replace("[di, l1]", "[di, fparr]")))
    assert "criteria[1]: unknown criterion" in message and message.endswith("got 'fparr'")
    assert f"(available: {', '.join(criteria.available())})" in message
    assert "fpar" in criteria.available()
    for name in criteria.available():
        assert load(write(tmp_path, GOOD.replace("[di, l1]", f"[{name}]"), f"{name}.yaml")).criteria == [name]


# ----------------------------------------------------------------------------- 5. mix weights

@pytest.fixture(scope="module")
def space():
    torch.manual_seed(0)
    return ap.Space(ap.models.create("resnet20", num_classes=10), torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("weights", [(0.0, 0.0, 0.0), (5e-324, 0.0, 0.0), (5e-324, 5e-324, 5e-324),
                                     (1.0, 1.0, 1.0), (-1.0, 2.0, 0.0), (0.05, 1.0, 0.3)])
def test_any_handed_in_weights_give_a_mix_criteria_mix_accepts(space, weights):
    """Weights are sampled in [WEIGHT_LOW, 1] (never 0); a value handed in outside that
    range is clipped into it like every variable's, so the mix is the clipped weights over
    their sum (no special all-zero rule), sums to 1 and criteria.mix never refuses it."""
    s = SearchSpace.from_dict({"ratios": [{"high": 0.5, "tie": "all"}], "criteria": ["di", "l1", "hrank"]})
    params = {"ratio/all": 0.3, **{f"w/{c}": w for c, w in zip(s.criteria, weights)}}
    mix = s.candidate(params, space).mix
    clipped = [min(1.0, max(WEIGHT_LOW, w)) for w in weights]
    assert mix == pytest.approx({c: w / sum(clipped) for c, w in zip(s.criteria, clipped)})
    assert sum(mix.values()) == pytest.approx(1.0) and min(mix.values()) > 0
    scores = {c: {"u": torch.arange(4.0) * (i + 1)} for i, c in enumerate(s.criteria)}
    assert criteria.mix(mix, scores)["u"].shape == (4,)


# ----------------------------------------------------------------------------- 6. fuzz

HOSTILE = {
    "inf ratio": GOOD.replace("high: 0.8", "high: .inf"),
    "nan ratio": GOOD.replace("high: 0.8", "high: .nan"),
    "huge int ratio": GOOD.replace("high: 0.8", f"high: {BIG}"),
    "string 1e400": GOOD.replace("high: 0.8", "high: 1e400"),
    "huge max_ratio": GOOD + f"max_ratio: {BIG}\n",
    "huge cluster k": GOOD + f"clusters: {{method: sg, k: [{BIG}]}}\n",
    "cluster k as bool": GOOD + "clusters: {method: sg, k: [true]}\n",
    "100k cluster choices": GOOD + f"clusters: {{method: sg, k: [{', '.join(map(str, range(1, 100_000)))}]}}\n",
    "65 cluster choices": GOOD + f"clusters: {{method: fchp, k: [{', '.join(map(str, range(1, 66)))}]}}\n",
    "method is a mapping": GOOD + "clusters: {method: {a: 1}, k: [2]}\n",
    "huge selfgroup k": GOOD + f"selfgroup: {{k: [{BIG}], cp: [0, 1]}}\n",
    "huge proxy steps": GOOD + f"proxy: {{finetune_steps: {BIG}}}\n",
    "huge proxy lr": GOOD + f"proxy: {{lr: {'9' * 400}}}\n",
    "negative eval batches": GOOD + "proxy: {eval_batches: -1}\n",
    "asha factor 1e300": GOOD + "asha: {grace_period: 1, reduction_factor: 1.0e+300}\n",
    "asha grace above steps": GOOD + "proxy: {finetune_steps: 10}\nasha: {grace_period: 11}\n",
    "budget scale nan": GOOD + "objective: accuracy_flops\nbudget_scale: [.nan, 1]\n",
    "budget scale of 3": GOOD + "objective: accuracy_flops\nbudget_scale: [0.5, 0.6, 1]\n",
    "objective a list": GOOD + "objective: [1, 2]\n",
    "criteria of lists": GOOD.replace("[di, l1]", "[[di], {a: 1}]"),
    "100k criteria": GOOD.replace("[di, l1]", "[" + ", ".join(["di"] * 100_000) + "]"),
    "1000 rules": "ratios:\n" + "  - {high: 0.5}\n" * 1000 + "criteria: [l1]\n",
    "deep list": GOOD + "description: " + "[" * 5000 + "]" * 5000 + "\n",
    "deep mapping": GOOD + "sampler: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n",
    "huge key": GOOD + "proxy: {" + "k" * 100_000 + ": 1}\n",
    "huge unknown top key": GOOD + "z" * 100_000 + ": 1\n",
    "huge description list": GOOD + "description: [" + ", ".join(["x"] * 20_000) + "]\n",
    "binary description": GOOD + "description: !!binary " + "QUFB" * 10_000 + "\n",
    "custom tag": GOOD + "description: !" + "t" * 3000 + " x\n",
    "nested quantifier": GOOD.replace("'.*'", "'(a+)+$'"),
    "repeated group": GOOD.replace("'.*'", "'(.*a){20}'"),
    "many repeats": GOOD.replace("'.*'", "'.*.*.*.*.*.*.*x'"),
    "long regex": GOOD.replace("'.*'", "'" + "a" * 5000 + "'"),
    "repeat too large": GOOD.replace("'.*'", "'a{99999999999}'"),
    "bad tie regex": GOOD.replace("tie: stage", "tie: '(('"),
    "catastrophic tie": GOOD.replace("tie: stage", r"tie: '(\w+)+x(\d)'"),
    "null everywhere": "ratios: [{match: null, high: null}]\ncriteria: [null]\n",
    "empty ratio rule": "ratios: [{}]\ncriteria: [l1]\n",
    # these load
    "fine regex": GOOD.replace("'.*'", r"'^layer(\d+)\.(\d+)\.conv\d+$'"),
    "fine tie": GOOD.replace("'.*'", "'^layer'").replace("tie: stage", r"tie: 'layer(\d+)'"),
    "merge key": GOOD.replace("{match: '.*', low: 0.0, high: 0.8, tie: stage}",
                              "{<<: {match: '.*', high: 0.5}, high: 0.8}"),
    "byte order mark": "\ufeff" + GOOD,
    "null description": GOOD + "description:\n",
}
LOADS = {"fine regex", "fine tie", "merge key", "byte order mark", "null description"}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_loads_or_fails_with_one_line(tmp_path, space, case):
    path = write(tmp_path, HOSTILE[case])
    start = time.monotonic()
    try:
        s = load(path)
    except SearchSpaceError as exc:
        message = str(exc)
        assert case not in LOADS, message
        assert message.startswith(f"{path}: ") and "\n" not in message and len(message) < 500, message
    else:
        assert case in LOADS, s
        assert s.variables(space) and s.make_sampler(0) is not None
    assert time.monotonic() - start < 20  # the 100,000-value lists stop at 10,000 values


def test_the_space_tune_writes_for_resume_reloads(tmp_path):
    """The runner saves the validated space with yaml.safe_dump and --resume loads it back:
    the dump must pass the loader's rules (no anchors, no repeated keys)."""
    spec = SearchSpace.from_dict({
        "description": "all sections", "ratios": [{"match": "^layer", "high": 0.5, "tie": r"layer(\d)"},
                                                  {"high": 0.4}],
        "criteria": ["di", "l1"], "clusters": {"method": "sg", "k": [2, 4]},
        "selfgroup": {"k": [2, 4], "cp": [0.2, 0.2]}, "objective": "accuracy_flops",
        "sampler": {"name": "nsga2", "population_size": 4}, "asha": {"grace_period": 2}})
    for s in (spec, load("resnet_cifar"), load("vgg_cifar"), load("generic")):
        data = {k: v for k, v in s.as_dict().items() if k not in ("name", "path") and v is not None}
        again = load(write(tmp_path, yaml.safe_dump(data, sort_keys=False), "space.yaml"))
        assert again.as_dict() | {"name": s.name, "path": None} == s.as_dict() | {"path": None}


# ----------------------------------------------------------------------------- the CLI, one per class

@pytest.mark.parametrize("text, expected", [
    (bomb(), "anchors and aliases"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe" + bytes(64), "is not a UTF-8 text YAML file"),
    (GOOD + "proxy: {lr: 0.1\n", "line 5, column 1: not valid YAML"),
    (GOOD + "sampler: {name: tpe, n_startup_trials: eight}\n", "sampler.n_startup_trials: must be an integer"),
    (GOOD.replace("[di, l1]", "[fparr]"), "criteria[0]: unknown criterion"),
    (GOOD + f"clusters: {{method: sg, k: [{BIG}]}}\n", "clusters.k[0]: must be an integer >= 1"),
    (GOOD + "description: " + "[" * 100 + "]" * 100 + "\n", "nested more than 8 levels deep"),
    (GOOD.replace("'.*'", "'(a+)+$'"), "could take exponential time"),
    (GOOD + "#" * MAX_FILE_BYTES, "is larger than 1 MiB"),
], ids=["alias", "binary", "syntax", "sampler", "criterion", "huge-k", "deep", "regex", "size"])
def test_cli_search_refuses_each_class_with_exit_2_and_one_line(tmp_path, capsys, text, expected):
    path = write(tmp_path, text)
    line = cli(path, tmp_path, capsys)
    assert line.startswith(f"autoprune: error: {path}: ") and expected in line, line
