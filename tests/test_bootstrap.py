"""`dynboot bootstrap`: iterated rounds at the smallest sizes (real Ray, real Train, real relabel), the
back-translated pairs' provenance, the stop rule, resume; and the threshold calibration."""

import json

import numpy as np
import pytest

from dynboot.io.rundir import contract_problems


def test_calibrated_threshold_is_the_lowest_cut_at_the_precision():
    from dynboot.eval.back_translation import calibrate_threshold

    scores = [-0.01, -0.02, -0.03, -0.2, -0.3, -0.4, float("nan")]
    correct = [True, True, True, False, True, False, True]
    cal = calibrate_threshold(scores, correct, 0.75)
    assert cal["threshold"] == -0.3 and cal["kept"] == 5 and cal["kept_precision"] == 0.8  # 4 of 5 right
    assert calibrate_threshold(scores, correct, 1.0)["threshold"] == -0.03
    assert calibrate_threshold([-1.0, -2.0], [False, False], 0.5)["threshold"] == float("inf")
    # tied scores are kept or dropped together
    assert calibrate_threshold([-0.1, -0.1, -0.1], [True, True, False], 0.9)["kept"] == 0


def test_stop_rule():
    from jobs.bootstrap import should_stop

    assert not should_stop([0.3])  # round 0 has nothing to beat
    assert not should_stop([0.3, 0.35])
    assert should_stop([0.3, 0.3])  # not an improvement
    assert should_stop([0.3, 0.4, 0.38])  # worse than the best earlier round
    assert should_stop([0.3, 0.32], min_improvement=0.05)


def test_world_correct_and_prompts(small_world):
    from dynboot.eval.back_translation import prompt_actions, world_correct
    from dynboot.data.pairs import load_examples
    from dynboot.world.actions import parse_action
    from dynboot.world.generate import load_spec

    spec = load_spec(small_world)
    ex = load_examples(small_world / "test" / "test.json", limit=6)
    befores = [e.before for e in ex]
    ok = world_correct(spec, befores, [e.action for e in ex], [e.after for e in ex])
    assert ok.all()
    assert not world_correct(spec, befores, [e.action for e in ex], befores).any()  # nothing done
    prompts = prompt_actions(spec, befores, np.random.default_rng(0))
    assert all(p is not None and parse_action(spec, p) for p in prompts)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # four Ray Train runs and two relabel jobs: their start-up dominates on a loaded box
def test_bootstrap_rounds_small(tmp_path):
    from dynboot.data.pairs import read_pairs
    from jobs.bootstrap import BootstrapConfig, run

    out = tmp_path / "bs"
    # min_improvement=1: no round can beat round 0 by a whole exact-match point, so rounds=3 stops after round 1
    cfg = BootstrapConfig(out=str(out), rounds=3, gold=80, videos=4, test=30, val=12, idp_steps=10, fdp_steps=6,
                          batch_size=8, ns=[1, 2], min_score=-1e9, min_improvement=1.0, num_cpus=4,
                          back_translation={"frames": 8, "candidates": 2, "threshold": -1e9})
    # (a fixed threshold: an FDP this small gets no validation pair right, so the calibrated one keeps nothing)
    summary = run(cfg)
    assert summary["rounds_run"] == 2 and summary["stopped"] and summary["best_round"] == 0
    assert not (out / "round_2").exists() and not (out / "round_1" / "backtranslate").exists()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1]
    assert not contract_problems(out)
    for rec in summary["records"]:
        assert set(rec["idp"]["by_type"]) <= {"move", "remove", "add", "swap"} and rec["idp"]["by_type"]
        assert rec["pseudo_labels"]["pairs"] > 0 and "accuracy" in rec["pseudo_labels_kept"]
        assert 0 <= rec["fdp_test"]["exact"] <= 1 and set(rec["best_of_n"]) == {"1", "2"}
        assert rec["test_pairs"] == 18 and rec["val_pairs"] == 12

    # back-translation of round 0 fed round 1's IDP: every prompt is accounted for, kept rows carry provenance
    bt = json.loads((out / "round_0" / "backtranslate" / "summary.json").read_text())
    ledger = [json.loads(x) for x in (out / "round_0" / "backtranslate" / "prompts.jsonl").read_text().splitlines()]
    assert len(ledger) == 8 and bt["pairs_kept"] == sum(e["kept"] for e in ledger)
    assert all(e["kept"] or e["reason"] for e in ledger)
    table = read_pairs(out / "round_0" / "backtranslate").to_pylist()
    assert len(table) == bt["pairs_kept"]
    for row in table:
        prov = json.loads(row["provenance"])
        assert prov["kind"] == "back_translation" and prov["round"] == 0 and prov["prompt"] == row["action"]
        assert row["score"] >= prov["threshold"] == bt["threshold"] == -1e9 and row["dataset"] == "backtranslate"
        assert row["source"] == "pseudo" and row["video_id"].endswith("~bt0") and prov["source_pair"]
    assert bt["pairs_kept"] == bt["generated"] > 0 and bt["calibration"]["pairs"] == 12
    assert str(out / "round_0" / "backtranslate") in (out / "round_1" / "idp" / "config.yaml").read_text()
    assert summary["records"][1]["bt_pairs"] == bt["pairs_kept"]

    # resume: a rerun redoes nothing (no model is rewritten) and reports the same rounds
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("round_*/*/model/*")}
    again = run(cfg)
    assert {p: p.stat().st_mtime_ns for p in out.glob("round_*/*/model/*")} == stamp
    assert again["table"] == summary["table"] and again["seconds"]["round_0"] == summary["seconds"]["round_0"] > 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
