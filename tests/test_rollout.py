"""Multi-step rollouts (dynboot.eval.rollout, `dynboot rollout`): each step's chosen prediction is the next step's before,
chosen by the one prediction core and verifier; exact match per step read by the world's exact parser."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dynboot.method.predict import Item, PredictSettings, predict
from dynboot.eval.rollout import (Rollout, RolloutCase, exact_by_step, rollout, rollout_world_scores, step_seed,
                             training_transitions, world_cases)
from dynboot.io.rundir import contract_problems
from dynboot.method.verify import verification_scores
from dynboot.world.actions import apply_action, parse_action
from dynboot.world.episodes import pair_key
from dynboot.world.render import render

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_world_cases_are_true_episodes_avoiding_the_training_transitions(world_models):
    root, spec, _, _ = world_models
    avoid = training_transitions(spec, root / "world")
    assert len(avoid) >= 40 + 10 + 2 * 8 - 5  # gold + test + the videos' transitions (a few may coincide)
    cases = world_cases(spec, 12, 3, seed=0, avoid=avoid)
    assert [c.index for c in cases] == list(range(12)) and all(len(c.actions) == len(c.truth) == 3 for c in cases)
    for c in cases:
        before = spec_scene(spec, c.start)
        for action, after in zip(c.actions, c.truth):
            assert np.array_equal(apply_action(spec, before, parse_action(spec, action)), after)
            assert pair_key(before, after) not in avoid
            before = after
    again = world_cases(spec, 12, 3, seed=0, avoid=avoid)
    assert all(a.actions == b.actions for a, b in zip(cases, again))  # reproducible from the seed
    assert any(a.actions != b.actions for a, b in zip(cases, world_cases(spec, 12, 3, seed=1, avoid=avoid)))


def spec_scene(spec, image):
    from dynboot.world.render import parse

    return parse(spec, image[None])[0]


def test_each_step_is_the_verifiers_best_sampled_from_the_previous_choice(world_models):
    """Re-derive step by step through predict + verification_scores: the rollout feeds back its own choice."""
    _, spec, fdp, idp = world_models
    cases = world_cases(spec, 3, 3, seed=2)
    rolls = rollout(fdp, idp, cases, PredictSettings(n=4, seed=11))
    for c, r in zip(cases, rolls):
        assert not r.error and r.steps == 3 and len(r.scores) == 3 and all(len(s) == 4 for s in r.scores)
        before = c.start
        for t, action in enumerate(c.actions):
            p = predict(fdp, idp, [Item(c.index, before, action)],
                        PredictSettings(n=4, seed=step_seed(11, t), greedy=False, captions=False, decode=True))[0]
            direct = verification_scores("idp", fdp, idp, before[None], torch.as_tensor(p.candidates)[None], [action])
            np.testing.assert_allclose(r.scores[t], direct[0].numpy(), atol=1e-5)
            assert r.chosen[t] == int(np.argmax(r.scores[t]))
            np.testing.assert_array_equal(r.images[t], p.candidate_images[r.chosen[t]])
            before = r.images[t]
    assert len({tuple(r.chosen) for r in rolls}) > 1 or len({s for r in rolls for s in r.chosen}) > 1


def test_a_case_does_not_depend_on_the_others_and_a_bad_case_fails_alone(world_models):
    _, spec, fdp, idp = world_models
    cases = world_cases(spec, 4, 2, seed=3)
    full = rollout(fdp, idp, cases, PredictSettings(n=2, seed=0))
    broken = RolloutCase(99, np.zeros((7,), np.uint8), ["move the red circle up", "remove the red circle"])
    part = rollout(fdp, idp, [broken, cases[2]], PredictSettings(n=2, seed=0))
    assert part[0].error.startswith("step 1:") and part[0].steps == 0
    assert part[1].chosen == full[2].chosen and all(np.array_equal(a, b) for a, b in zip(part[1].images, full[2].images))
    unverified = rollout(fdp, None, cases[:2], PredictSettings(n=8, seed=0))  # no verifier: one sample, unranked
    assert all(r.chosen == [0, 0] and all(len(s) == 1 and np.isnan(s[0]) for s in r.scores) for r in unverified)


def test_world_scores_count_exact_steps_and_exact_prefixes(world_models):
    _, spec, _, _ = world_models
    cases = world_cases(spec, 3, 3, seed=4)
    truth_images = [[render(spec, s) for s in c.truth] for c in cases]
    wrong = render(spec, np.zeros(spec.cells, np.int64))
    rolls = [Rollout(0, truth_images[0]),  # all right
             Rollout(1, [wrong, *truth_images[1][1:]]),  # step 1 wrong, then right again
             Rollout(2, truth_images[2][:1], error="step 2: boom")]  # failed after step 1
    m = rollout_world_scores(spec, cases, rolls)
    assert m["per_case"] == [[1, 1, 1], [0, 1, 1], [1, 0, 0]] and m["errors"] == 1
    # followed: the action applied to the model's own previous state: on case 1's empty scene step 2 is impossible
    # (None), step 3 follows from step 2's (right) state; the steps case 2 did not reach count as not followed
    assert m["per_case_followed"] == [[1, 1, 1], [0, None, 1], [1, 0, 0]]
    assert m["by_step"]["1"] == {"n": 3, "exact": 2 / 3, "exact_so_far": 2 / 3, "followed": 2 / 3, "n_followed": 3}
    assert m["by_step"]["2"]["followed"] == 0.5 and m["by_step"]["2"]["n_followed"] == 2
    assert m["by_step"]["3"]["exact"] == 2 / 3 and m["by_step"]["3"]["exact_so_far"] == 1 / 3
    assert exact_by_step([[1, 0], [1]]) == {"1": {"n": 2, "exact": 1.0, "exact_so_far": 1.0},
                                            "2": {"n": 1, "exact": 0.0, "exact_so_far": 0.0}}


def test_rollout_job_writes_the_run_directory_and_resumes(world_models, tmp_path, capsys):
    from dynboot.cli import main

    root, spec, _, _ = world_models
    out = tmp_path / "run"
    args = ["rollout", f"world={root / 'world'}", f"fdp_path={root / 'fdp'}", f"idp_path={root / 'idp'}",
            "episodes=3", "steps=2", "n=[1,3]", "strips=2", f"out={out}", f"results={tmp_path / 'bench.json'}"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == [1, 3] and summary["episodes"] == 3 and summary["steps"] == 2
    assert set(summary["by_n"]["3"]["by_step"]) == {"1", "2"} and set(summary["paired"]) == {"1", "2"}
    assert json.loads((tmp_path / "bench.json").read_text())["table"] == summary["table"]
    assert not contract_problems(out) and len((out / "metrics.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in (out / "strips").iterdir()) == ["case0.png", "case1.png"]
    assert "![case](strips/case0.png)" in (out / "report.md").read_text()
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "rollouts" / "n3.parquet").to_pylist()
    assert len(rows) == 6 and all(len(r["scores"]) == 3 and r["png"] for r in rows)
    assert {"followed", "n_followed"} <= set(summary["by_n"]["1"]["by_step"]["1"])
    stamp = (out / "rollouts" / "n3.parquet").stat().st_mtime_ns
    (out / "rollouts" / "n1.parquet").unlink()  # as if the run had stopped after N=3
    assert main(args + ["strips=0"]) == 0  # a rerun may change strips; it redoes only N=1
    assert (out / "rollouts" / "n3.parquet").stat().st_mtime_ns == stamp and (out / "rollouts" / "n1.parquet").is_file()
    assert json.loads((out / "summary.json").read_text())["by_n"] == summary["by_n"]
    assert main([*args[:-2], "steps=3", f"out={out}"]) == 2 and "different config" in capsys.readouterr().err
