"""The one prediction core: the same models and seed give the same numbers through every evaluation path (the
library's world evaluation and `dynboot eval`), whatever the batching; `dynboot eval` resumes from its parts."""

from __future__ import annotations


import numpy as np
import pytest

from dynboot.data.pairs import load_examples
from dynboot.method.predict import PredictSettings, predict
from dynboot.method.verify import verifier_sees_codes
from dynboot.eval.world_eval import best_of_n_eval, fdp_eval, idp_eval, items_of
from dynboot.io.rundir import contract_problems
from jobs.evaluate import EvalConfig, run

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_predictions_do_not_depend_on_batching_or_order(world_models):
    root, spec, fdp, idp = world_models
    items = items_of(load_examples(root / "world" / "test" / "test.json"))
    s = PredictSettings(n=4, seed=7)
    full = {p.index: p for p in predict(fdp, idp, items, s)}
    part = {p.index: p for p in predict(fdp, idp, list(reversed(items[2:5])), s)}
    for i, p in part.items():
        assert np.array_equal(p.candidates, full[i].candidates) and np.allclose(p.scores, full[i].scores)
        assert np.array_equal(p.greedy, full[i].greedy) and p.caption == full[i].caption
    other_seed = predict(fdp, idp, items[:3], PredictSettings(n=4, seed=8))
    assert any(not np.array_equal(a.candidates, full[a.index].candidates) for a in other_seed)
    assert verifier_sees_codes(fdp, idp)


def test_library_and_eval_job_give_the_same_numbers(world_models, tmp_path):
    root, spec, fdp, idp = world_models
    examples = load_examples(root / "world" / "test" / "test.json")
    ns = [1, 2, 4]
    lib = best_of_n_eval(fdp, idp, examples, spec, ns, seed=3)
    greedy = fdp_eval(fdp, examples, spec)
    captions = idp_eval(idp, examples, spec)
    cfg = EvalConfig(data=str(root / "world" / "test"), fdp_path=str(root / "fdp"), idp_path=str(root / "idp"),
                     out=str(tmp_path / "eval"), n=ns, seed=3, use_ray=False)
    summary = run(cfg)
    import json

    job = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for n in map(str, ns):
        assert job["fdp"]["by_n"][n]["exact"] == lib["by_n"][n]["exact"]
        assert job["fdp"]["by_n"][n]["changed_cell_acc"] == lib["by_n"][n]["changed_cell_acc"]
        assert job["fdp"]["by_n"][n]["oracle"] == lib["by_n"][n]["oracle"]
    assert job["fdp"]["greedy"]["changed_cell_acc"] == greedy["changed_cell_acc"]
    assert job["idp"]["field_acc"] == captions["field_acc"]
    assert summary["items"] == len(examples) and not contract_problems(tmp_path / "eval")


def test_eval_resumes_from_committed_prediction_parts(world_models, tmp_path, capsys):
    root, *_ = world_models
    cfg = EvalConfig(data=str(root / "world" / "test"), fdp_path=str(root / "fdp"), idp_path=str(root / "idp"),
                     out=str(tmp_path / "eval"), n=[1, 2], use_ray=False, batch_size=2, limit=4)
    run(cfg)
    parts = sorted((tmp_path / "eval" / "predictions").glob("part-*.parquet"))
    assert parts
    before = [p.read_bytes() for p in parts]
    capsys.readouterr()
    run(cfg.model_copy(update={"limit": 6}))  # 4 items done: only the 2 new ones are predicted
    assert "4 items already predicted, 2 to do" in capsys.readouterr().out
    assert [p.read_bytes() for p in parts] == before
