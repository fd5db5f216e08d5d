"""The whole loop at a small size: every stage (real Ray, real Train, real relabel, real serve) produces its
outputs and the report has the four effect rows. `pytest tests/test_quickstart.py` (slow: minutes)."""

import json

import pytest


@pytest.mark.slow
def test_quickstart_small(tmp_path):
    from jobs.quickstart import QuickstartConfig, run

    out = tmp_path / "qs"
    cfg = QuickstartConfig(out=str(out), gold=120, videos=8, test=24, idp_steps=20, fdp_steps=12, batch_size=8,
                           ns=[1, 2], port=8123, num_cpus=4)
    summary = run(cfg)
    for stage in ("world", "idp", "relabel", "filter", "fdp_gold", "fdp_boot", "fdp_plain"):
        assert (out / stage / "summary.json").is_file(), stage
    for model in ("idp", "fdp_gold", "fdp_boot", "fdp_plain"):
        assert (out / model / "model" / "dynboot.json").is_file(), model
    assert list((out / "relabel" / "shards").glob("*.parquet"))
    report = (out / "report.md").read_text()
    for row in ("1 asymmetry", "2 bootstrapping", "3 weighting", "4 verification"):
        assert row in report
    assert (out / "eval" / "best_of_n_grid.png").stat().st_size > 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(metrics["best_of_n"]["by_n"]) == {"1", "2"} and metrics["test_pairs"] == 24
    assert summary["seconds"]["total"] > 0
