"""The accuracy-mode greedy's screening (issue 12, speed): every candidate scored on one
validation batch, only the best K on all of them. Constructed scores, answers recomputed."""

import numpy as np
import pytest
import torch

import autoprune as ap
from autoprune.errors import AutopruneError
from autoprune.greedy import SCREEN_BATCHES, greedy_widths
from autoprune.greedy_masks import MaskedEvaluator
from autoprune.prune import prune_settings
from test_greedy_authors import _chain_space  # the three-unit chain (tests/ is on sys.path)


class Table:
    """An evaluator whose accuracies are fixed per cut unit: a structure's screening score is
    ``quick[u]`` and its full score ``full[u]`` for the unit ``u`` it cuts beyond the last
    committed structure (which it learns from the masks); counts its calls per kind."""

    def __init__(self, quick, full, n_batches=8):
        self.quick, self.full, self.n_batches = quick, full, n_batches
        self.evaluations, self.calls, self.finetuned = 0, {"quick": 0, "full": 0}, False
        self.committed: dict[str, int] = {}

    def __call__(self, masks, batches=None):
        self.evaluations += 1
        kept = {name: int(m.sum()) for name, m in masks.items()}
        changed = [n for n, k in kept.items() if k != self.committed.get(n, -1)]
        unit = changed[0] if len(changed) == 1 else None
        kind = "quick" if batches is not None else "full"
        assert batches in (None, SCREEN_BATCHES)
        self.calls[kind] += 1
        return (self.quick if kind == "quick" else self.full).get(unit, 0.0)

    def many(self, base, candidates, batches=None):
        return [self(masks, batches) for _, masks in candidates]


def _space():
    return _chain_space()[1]


def _walk(screen, quick, full, budget="flops<=97%", n_batches=8):
    space = _space()
    scores = {u.name: torch.arange(u.width, dtype=torch.float64) for u in space.units}
    table = Table(quick, full, n_batches)
    result = greedy_widths(space, scores, budget, step=0.01, mode="accuracy", evaluator=table,
                           progress=False, screen=screen)
    return result, table


def test_screening_keeps_the_best_k_and_commits_the_best_of_them_on_all_batches():
    """Units a, b, c: the screen ranks c > a > b, all batches rank b > a > c. Unscreened, b is
    committed; K=1 keeps c alone; K=2 keeps c and a and commits a; K>=3 equals no screening."""
    quick, full = {"a": 0.8, "b": 0.5, "c": 0.9}, {"a": 0.7, "b": 0.95, "c": 0.6}
    first = {}
    for screen in (0, 1, 2, 3, 5):
        result, table = _walk(screen, quick, full)
        step = result.trajectory[0]
        first[screen] = step["unit"]
        if 0 < screen < 3:
            assert sorted(step["candidates"]) == sorted(sorted(quick, key=quick.get, reverse=True)[:screen])
            assert step["screened"] == quick and step["screen"] == screen
            assert step["proxy"] == full[step["unit"]]
        else:
            assert "screened" not in step and sorted(step["candidates"]) == ["a", "b", "c"]
    assert first == {0: "b", 1: "c", 2: "a", 3: "b", 5: "b"}


def test_screening_costs_one_quick_call_per_candidate_and_k_full_calls_per_step():
    quick, full = {"a": 0.8, "b": 0.5, "c": 0.9}, {"a": 0.7, "b": 0.95, "c": 0.6}
    result, table = _walk(2, quick, full, budget="flops<=99%")
    steps = result.info["steps"]
    candidates = sum(len(t["screened"]) for t in result.trajectory)
    assert table.calls == {"quick": candidates, "full": 2 * steps}
    assert result.info["proxy_evaluations"] == candidates + 2 * steps


def test_no_screening_where_it_saves_nothing():
    """One validation batch: the screen would score every candidate on all of it twice."""
    quick, full = {"a": 0.8, "b": 0.5, "c": 0.9}, {"a": 0.7, "b": 0.95, "c": 0.6}
    result, table = _walk(2, quick, full, n_batches=SCREEN_BATCHES)
    assert table.calls["quick"] == 0 and result.trajectory[0]["unit"] == "b"
    assert all("screened" not in t for t in result.trajectory)


def test_screen_ties_are_broken_by_the_criterion_rule_then_unit_order():
    """Equal screening scores everywhere: the finalists are the cheapest by score lost per FLOP
    (here: equal, so the first units in order), and the commit among equal full scores is the
    first in unit order, as without screening."""
    flat = {"a": 0.5, "b": 0.5, "c": 0.5}
    screened, _ = _walk(2, flat, flat)
    plain, _ = _walk(0, flat, flat)
    assert [t["unit"] for t in screened.trajectory] == [t["unit"] for t in plain.trajectory]


@pytest.mark.parametrize("screen", [-1, 1.5, True, "2"])
def test_a_bad_screen_is_refused(screen):
    with pytest.raises(AutopruneError, match="screen"):
        _walk(screen, {}, {})


def test_masked_evaluator_scores_the_first_batches_only():
    """``batches=1`` equals an evaluator holding only the first validation batch."""
    model, space = _chain_space()
    g = torch.Generator().manual_seed(0)
    val = [(torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(3)]
    masks = {space.units[0].name: (torch.arange(space.units[0].width) % 2).float()}
    whole, first = MaskedEvaluator(model, space, val), MaskedEvaluator(model, space, val[:1])
    assert whole(masks, batches=1) == first(masks)
    assert whole(masks) == pytest.approx(np.mean([MaskedEvaluator(model, space, [b])(masks) for b in val]))


def test_the_screen_reaches_the_greedy_from_prune_and_the_cli(prune_call, tmp_path):
    from autoprune.methods.greedy import DEFAULTS
    assert DEFAULTS["greedy_screen"] == 4
    argv = ["prune", "--model", "resnet20", "--data", "synthetic", "--flops", "50%", "--out", str(tmp_path / "x")]
    assert prune_call([*argv, "--greedy-screen", "0"])["greedy_screen"] == 0
    assert "greedy_screen" not in prune_call(argv)  # prune's default (4) applies


def test_prune_refuses_a_bad_screen_before_any_work():
    with pytest.raises(AutopruneError, match="greedy_screen"):  # no model or data needed
        ap.prune(None, None, "flops<=50%", method="greedy", greedy_screen=-1)


def test_prune_settings_record_the_screen():
    """A comparison reuses a run only when its settings match: the screen is one of them."""
    model, _ = _chain_space()
    data = ap.data.load("synthetic", image_size=16)
    default, off = (prune_settings(model, data, "flops<=50%", "greedy", **kw) for kw in ({}, {"greedy_screen": 0}))
    assert (default["options"]["greedy_screen"], off["options"]["greedy_screen"]) == (4, 0)
