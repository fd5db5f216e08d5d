"""World metrics, text metrics, best-of-N bookkeeping and report files, on hand-computed examples.

    python -m pytest -q tests/test_metrics.py
"""

import math

import numpy as np
import pytest
from PIL import Image

from dynboot.eval.metrics import best_of_n_judged, best_of_n_world, fdp_world_metrics, group_choices, idp_world_metrics, mean_by
from dynboot.eval.report import candidates_grid, md_table, score_vs_n_plot, write_report
from dynboot.eval.textmetrics import bleu, exact_match, rouge_l, text_metrics
from dynboot.world import WorldSpec

# three 4-cell scenes: a move (cell 0 -> 1), a swap (cells 0, 1), a remove (cell 2)
BEFORE = [[1, 0, 0, 0], [2, 3, 0, 0], [0, 0, 5, 0]]
TARGET = [[0, 1, 0, 0], [3, 2, 0, 0], [0, 0, 0, 0]]
PRED = [[0, 1, 0, 0],  # exact
        [2, 3, 0, 0],  # a copy of the before: both changed cells wrong
        [0, 0, 0, 7]]  # the changed cell right, an unchanged cell wrong
TYPES = ["move", "swap", "remove"]


def test_fdp_world_metrics_exact_values():
    m = fdp_world_metrics(PRED, BEFORE, TARGET, TYPES)
    # changed cells: 2 + 2 + 1 = 5, of which 2 + 0 + 1 = 3 predicted right
    assert m["n"] == 3 and m["changed_cells"] == 5
    assert m["exact"] == pytest.approx(1 / 3)
    assert m["changed_cell_acc"] == pytest.approx(3 / 5)
    assert m["copy_rate"] == pytest.approx(1 / 3)
    bt = m["by_type"]
    assert (bt["move"]["exact"], bt["move"]["changed_cell_acc"], bt["move"]["copy_rate"]) == (1.0, 1.0, 0.0)
    assert (bt["swap"]["exact"], bt["swap"]["changed_cell_acc"], bt["swap"]["copy_rate"]) == (0.0, 0.0, 1.0)
    assert (bt["remove"]["exact"], bt["remove"]["changed_cell_acc"], bt["remove"]["copy_rate"]) == (0.0, 1.0, 0.0)
    with pytest.raises(ValueError, match="shapes differ"):
        fdp_world_metrics(PRED[:2], BEFORE, TARGET)
    with pytest.raises(ValueError, match="action types"):
        fdp_world_metrics(PRED, BEFORE, TARGET, TYPES[:2])


def test_idp_world_metrics_exact_structured_and_unparsable():
    spec = WorldSpec()
    gold = ["move the red square up", "remove the blue circle", "add a green triangle left of the red square",
            "swap the red square and the blue circle", "remove the yellow circle"]
    captions = ["move the red square up",  # exact
                "Remove  the blue CIRCLE ",  # exact after normalisation
                "add a green triangle right of the red square",  # type, obj, ref right; direction wrong: 3/4
                "gibberish that is no action",  # unparsable: wrong everywhere, no crash
                None]  # not even a string: wrong, no crash
    m = idp_world_metrics(spec, captions, gold)
    assert m["n"] == 5
    assert m["exact"] == pytest.approx(2 / 5)
    assert m["structured"] == pytest.approx(2 / 5)
    assert m["parse_rate"] == pytest.approx(3 / 5)
    assert m["field_acc"] == pytest.approx((1 + 1 + 0.75 + 0 + 0) / 5)
    assert m["type_acc"] == pytest.approx(3 / 5)
    assert m["direction_acc"] == pytest.approx(1 / 2)  # defined for the move and the add only
    assert m["ref_acc"] == 1.0 and m["other_acc"] == 0.0
    assert m["by_type"]["remove"]["exact"] == pytest.approx(1 / 2)
    assert m["by_type"]["add"]["field_acc"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="gold action 0"):
        idp_world_metrics(spec, ["x"], ["fly the red square"])


def test_text_metrics_hand_values():
    # 4 of 5 unigrams, 3/4 bigrams, 2/3 trigrams, 1/2 4-grams; same length -> no brevity penalty
    hyp, ref = ["move the red circle up"], ["move the red circle left"]
    assert bleu(hyp, ref) == pytest.approx((0.8 * 0.75 * (2 / 3) * 0.5) ** 0.25)
    assert rouge_l(hyp, ref) == pytest.approx(0.8)  # LCS 4 of 5 both ways
    assert exact_match(["A  b"], ["a b"]) == 1.0
    t = text_metrics(["remove the red square", "x"], ["remove the red square", "y"])
    assert t["n"] == 2 and t["exact"] == 0.5 and t["rouge_l"] == pytest.approx(0.5)
    assert text_metrics([], []) == {"n": 0, "exact": 0.0, "bleu": 0.0, "rouge_l": 0.0}
    with pytest.raises(ValueError):
        bleu(["a"], [])


def test_group_choices_disjoint_groups_ties_and_nan():
    s = np.array([[0.1, 0.5, 0.3, 0.2]])
    assert group_choices(s, 1).tolist() == [[0, 1, 2, 3]]
    assert group_choices(s, 2).tolist() == [[1, 2]]
    assert group_choices(s, 4).tolist() == [[1]]
    assert group_choices(np.array([[1.0, 1.0, 0.0, 0.0]]), 2).tolist() == [[0, 2]]  # ties: lowest index
    assert group_choices(np.array([[np.nan, 0.2, np.nan, np.nan]]), 2).tolist() == [[1, 2]]
    assert group_choices(np.array([[0.1, 0.5, 0.3]]), 2).tolist() == [[1]]  # 3 // 2 = 1 group
    with pytest.raises(ValueError):
        group_choices(s, 5)


def test_best_of_n_world_and_judged():
    before, target = np.array([[1, 0]]), np.array([[0, 1]])
    cand = np.array([[[1, 0], [0, 1], [0, 0], [0, 1]]])  # copy, exact, wrong, exact
    scores = np.array([[0.9, 0.1, 0.5, 0.2]])  # the verifier prefers the copy in group 0, the exact one in group 1
    m = best_of_n_world(cand, scores, before, target, ["move"], [1, 2, 4])
    assert m["by_n"]["1"]["exact"] == pytest.approx(0.5) and m["by_n"]["1"]["oracle"] == pytest.approx(0.5)
    assert m["by_n"]["2"]["exact"] == pytest.approx(0.0) and m["by_n"]["2"]["groups"] == 2  # chooses #0, #2
    assert m["by_n"]["2"]["copy_rate"] == pytest.approx(0.5) and m["by_n"]["2"]["oracle"] == 1.0
    assert m["by_n"]["4"]["exact"] == 0.0 and m["by_n"]["4"]["copy_rate"] == 1.0
    assert m["oracle_all"] == 1.0
    judged = np.array([[2.0, np.nan, 8.0, 6.0], [1.0, 3.0, np.nan, np.nan]])
    j = best_of_n_judged(judged, np.array([[0.9, 0.1, 0.5, 0.2], [0.0, 1.0, 0.0, 0.0]]), ["a", "b"], [1, 2])
    assert j["by_n"]["1"]["a"]["mean"] == pytest.approx(16 / 3)  # NaN left out
    assert j["by_n"]["2"]["a"]["mean"] == pytest.approx(5.0)  # chosen #0 (2) and #2 (8)
    assert j["by_n"]["2"]["b"]["mean"] == pytest.approx(3.0)  # group 1 of b is all NaN: left out
    assert j["oracle"]["a"]["mean"] == 8.0 and j["oracle"]["overall"]["mean"] == pytest.approx(5.5)


def test_mean_by_macro_pooled_missing():
    m = mean_by([2.0, 4.0, 9.0, None, float("nan")], ["a", "a", "b", "b", "c"])
    assert m["a"] == {"mean": 3.0, "n": 2, "missing": 0}
    assert m["b"]["missing"] == 1 and math.isnan(m["c"]["mean"])
    assert m["overall"]["mean"] == pytest.approx(6.0)  # mean of subset means (the paper's Avg)
    assert m["overall"]["pooled"] == pytest.approx(5.0) and m["overall"]["missing"] == 2


def test_report_files(tmp_path):
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)  # noqa: E731
    ex = [{"title": "move the red square up", "before": img(), "candidates": [img(), img(), img()],
           "labels": ["-1.0", "-0.5", "-2.0"], "good": [False, True, False], "chosen": 1, "target": img()},
          {"title": "no target", "before": img(), "candidates": [img()], "labels": ["0.1"], "chosen": 0, "target": None}]
    grid = candidates_grid(tmp_path / "grid.png", ex)
    plot = score_vs_n_plot(tmp_path / "plot.png", {"best": {1: 0.1, 2: 0.2, 4: float("nan")}, "oracle": {"1": 0.3, "2": 0.5}}, "exact")
    for p in (grid, plot):
        with Image.open(p) as im:
            im.verify()
    with Image.open(grid) as im:
        assert im.size[0] > im.size[1] > 100  # two rows of six columns
    table = md_table([{"N": 1, "exact": 0.25, "note": "a|b"}, {"N": 8, "exact": None}])
    assert table.splitlines()[2] == "| 1 | 0.250 | a\\|b |" and "| 8 | – | – |" in table
    md = write_report(tmp_path / "report.md", "t", [("s", table)]).read_text()
    assert md.startswith("# t\n") and "## s" in md
