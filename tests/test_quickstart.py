"""The whole loop at a small size: every stage (real Ray, real Train, real relabel, real serve) produces its
outputs and the report has the four effect rows. `pytest tests/test_quickstart.py` (slow: minutes)."""

import json

import pytest


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the loop, then one more bootstrapping round: six Ray Train runs, two relabel jobs
def test_quickstart_small(tmp_path, capfd):
    """Run as `dynboot quickstart` runs it (job_main with its console), with the port the serve app used to take held
    by someone else: the run serves on a free port, and the console shows stages, progress and the table only.
    With rounds=2 it goes on with one bootstrapping round, and its report shows the rounds and a rollout strip."""
    import socket

    from dynboot.cli import job_main
    from jobs.quickstart import QuickstartConfig, run
    from jobs.train_progress import PROGRESS_LINE

    out = tmp_path / "qs"
    args = dict(out=str(out), gold=120, videos=8, test=24, idp_steps=20, fdp_steps=12, batch_size=8, ns="[1,2]",
                num_cpus=4, min_score=-1e9, progress_every_s=0.5,  # an IDP this small is never sure
                rounds=2, rollout_episodes=3, rollout_steps=2, **{"back_translation.frames": 6,
                "back_translation.candidates": 2, "back_translation.threshold": -1e9})  # keeps every generated pair
    with socket.socket() as taken:
        try:  # 8000, the old fixed port, in use (when something else holds it already, so much the better)
            taken.bind(("127.0.0.1", 8000))
            taken.listen()
        except OSError:
            pass
        assert job_main(QuickstartConfig, run, [f"{k}={v}" for k, v in args.items()], console=True) == 0
    console = [line for line in capfd.readouterr().out.splitlines() if line.strip()]
    cfg = QuickstartConfig(**{**{k: v for k, v in args.items() if "." not in k}, "ns": [1, 2]})
    summary = json.loads((out / "summary.json").read_text())
    for stage in ("1/7", "2/7", "3/7", "4/7", "5/7", "6/7", "7/7"):
        assert sum(line.startswith("[") and f"] {stage} " in line for line in console) == 1, (stage, console)
    progress = {m["name"] for m in map(PROGRESS_LINE.match, console) if m}
    assert progress >= {"idp"} and progress & {"fdp_gold", "fdp_boot", "fdp_ablation"}, console
    assert any(line.startswith("report: ") for line in console)
    assert not [line for line in console if "pid=" in line or "WARNING" in line or "DeepSpeed" in line]
    log = (out / "log.txt").read_text()
    assert "RayTrainWorker" in log and "report: " in log
    served = json.loads((out / "eval" / "metrics.json").read_text())["best_of_n"]["served_at"]
    assert served.startswith("http://127.0.0.1:") and not served.endswith(":8000")
    for stage in ("world", "idp", "relabel", "filter", "fdp_gold", "fdp_boot", "fdp_ablation"):
        assert (out / stage / "summary.json").is_file(), stage
    import yaml

    assert yaml.safe_load((out / "fdp_boot" / "config.yaml").read_text())["weighting"] == cfg.weighting == "none"
    assert yaml.safe_load((out / "fdp_ablation" / "config.yaml").read_text())["weighting"] == cfg.ablation_weighting
    # gold + pseudo is class-balanced: the gold source split per action class, the pseudo source last as it was
    boot_data = yaml.safe_load((out / "fdp_boot" / "config.yaml").read_text())["data"]
    assert len(boot_data) > 2 and all(len(d["classes"]) == 1 for d in boot_data[:-1])
    assert boot_data[-1]["path"].endswith("filter/shards") and not boot_data[-1]["classes"]
    for model in ("idp", "fdp_gold", "fdp_boot", "fdp_ablation"):
        assert (out / model / "model" / "dynboot.json").is_file(), model
    assert list((out / "relabel" / "shards").glob("*.parquet"))
    report = (out / "report.md").read_text()
    for row in ("1 asymmetry", "2 bootstrapping", "3 weighting", "4 verification"):
        assert row in report
    assert (out / "eval" / "best_of_n_grid.png").stat().st_size > 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert set(metrics["best_of_n"]["by_n"]) == {"1", "2"} and metrics["test_pairs"] == 24
    assert summary["seconds"]["total"] > 0 and set(summary["seconds"]) >= {"idp", "relabel", "fdp", "eval", "rounds"}
    # rounds=2: round 0 is this run's stages (not trained again), round 1 trained its own IDP and FDP
    rounds = json.loads((out / "rounds" / "summary.json").read_text())
    assert rounds["rounds_run"] == 2 and [r["round"] for r in rounds["table"]] == [0, 1]
    assert not (out / "rounds" / "round_0" / "idp").exists() and (out / "rounds" / "round_1" / "fdp" / "model").is_dir()
    assert json.loads((out / "rounds" / "round_0" / "backtranslate" / "summary.json").read_text())["pairs_kept"] > 0
    assert summary["results"]["rounds"]["table"] == rounds["table"]
    rollout = json.loads((out / "rollout" / "summary.json").read_text())
    assert rollout["episodes"] == 3 and rollout["n"] == [1, 2] and rollout["fdp_path"] == str(out / "fdp_boot" / "model")
    for section in ("Bootstrapping rounds", "Rollouts", "rounds/rounds.png", "rollout/strips/"):
        assert section in report, section
    assert all((out / "rollout" / s).stat().st_size > 0 for s in rollout["strips"]) and rollout["strips"]
    from dynboot.io.rundir import contract_problems

    for run_dir in ("", "world", "idp", "relabel", "filter", "fdp_gold", "fdp_boot", "fdp_ablation", "rollout", "rounds"):
        assert not contract_problems(str(out / run_dir)), (run_dir, contract_problems(str(out / run_dir)))
    assert [r["stage"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [
        "world", "idp", "relabel", "fdp", "eval", "rounds"]
    # the weighting benchmark reads this run (its gold + pseudo mixture as the FDPs trained on it)
    from jobs.bench_weighting import BenchWeightingConfig, run as bench_weighting

    bench = bench_weighting(BenchWeightingConfig(
        run=str(out), out=str(tmp_path / "bench"), result=str(tmp_path / "bench.json"), variants=["none", "predicted_change"],
        unbalanced_variants=["none"], seeds=[0], steps=3, batch_size=4, size="xxs", save_models=False))
    assert [r["variant"] for r in bench["rows"]] == ["none", "predicted_change"]
    assert {"gold_only_exact", "unbalanced_exact"} <= set(bench["rows"][0])


def test_paired_verdict_counts_only_the_pairs_where_the_models_differ():
    """Two FDPs scored on the same pairs: 36 pairs only A gets right, 16 only B, the rest agree. The unpaired
    binomial test calls the 0.067 gap noise; the paired one (what the report uses for rows 2 and 3) does not."""
    from dynboot.eval.stats import verdict

    a = [1] * 36 + [0] * 16 + [1] * 127 + [0] * 121
    b = [0] * 36 + [1] * 16 + [1] * 127 + [0] * 121
    pa, pb = sum(a) / len(a), sum(b) / len(b)
    assert verdict(pa, pb, len(a)) == "within noise"
    assert verdict(pa, pb, len(a), (a, b)) == "yes"
    assert verdict(pb, pa, len(a), (b, a)) == "no (reversed)"
    same = [1] * 150 + [0] * 150
    assert verdict(0.5, 0.5, 300, (same, same)) == "within noise"
