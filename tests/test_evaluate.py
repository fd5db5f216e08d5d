"""The eval job end to end on a tiny world with untrained tiny checkpoints: world mode on Ray Data and in
process (same predictions), and Aurora mode through `dynboot eval` with the judge on a local server.

    python -m pytest -q tests/test_evaluate.py
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dynboot.data.aurora import read_aurora
from dynboot.io.images import decode_image, load_image
from dynboot.cli import job_main
from dynboot.models.registry import load_model
from dynboot.models.tiny import TinyWorldModel
from dynboot.io.rundir import contract_problems, read_jsonl
from dynboot.world import parse
from dynboot.world.generate import WorldConfig, generate_world, load_spec
from jobs.evaluate import EvalConfig, run

sys.path.insert(0, str(Path(__file__).parent))
from openai_stub_server import StubJudgeServer  # noqa: E402

SECRET = "sk-test-evaluate-Hk29Lw-secret"
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    generate_world(WorldConfig(out=str(root / "world"), gold=0, videos=0, test=8, seed=3, workers=1))
    spec = load_spec(root / "world")
    TinyWorldModel.create(spec, size="xxs", seed=0).save(root / "fdp")
    TinyWorldModel.create(spec, size="xxs", seed=1).save(root / "idp")
    return root


def _cfg(tiny: Path, out: str, **kw) -> EvalConfig:
    return EvalConfig(data=str(tiny / "world" / "test"), fdp_path=str(tiny / "fdp"), idp_path=str(tiny / "idp"),
                      out=str(tiny / out), n=[1, 2, 4], **kw)


def _check_png(path: Path) -> None:
    with Image.open(path) as im:
        im.verify()


@pytest.mark.slow  # a Ray cluster start plus two runs: 35-90 s on 2 busy cores
def test_world_eval_ray_and_local_agree(tiny):
    import ray

    local = run(_cfg(tiny, "local", use_ray=False, batch_size=3))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        on_ray = run(_cfg(tiny, "ray", use_ray=True, batch_size=5, actor_cpus=0.5))
    finally:
        ray.shutdown()
    assert local["items"] == on_ray["items"] == 8 and local["quarantined"] == 0 and local["predict_errors"] == 0
    assert not contract_problems(tiny / "local") and not contract_problems(tiny / "ray")
    assert set(local["headline"]["fdp_exact"]) == {"1", "2", "4"} and "structured" in local["headline"]["idp"]
    a = pq.read_table(tiny / "local" / "predictions.parquet").to_pylist()
    b = pq.read_table(tiny / "ray" / "predictions.parquet").to_pylist()
    # per-item seeds: the same samples whatever the batching and wherever they ran
    assert [r["candidates"] for r in a] == [r["candidates"] for r in b]
    assert np.allclose([r["scores"] for r in a], [r["scores"] for r in b], atol=1e-5)
    assert [r["caption"] for r in a] == [r["caption"] for r in b]

    # the samples are the FDP's own: item i sampled with seed + index
    fdp = load_model(tiny / "fdp")
    recs = read_aurora(tiny / "world" / "test" / "test.json")
    r0 = a[0]
    codes = fdp.sample(load_image(tiny / "world" / "test" / recs[0].input)[None], [recs[0].instruction], n=4, seed=r0["index"])
    assert [decode_image(c).tobytes() for c in r0["candidates"]] == [im.tobytes() for im in fdp.tokenizer.decode(codes[0])]

    # per-candidate correctness against the truth, recomputed here with the world's parser
    spec = load_spec(tiny / "world")
    truth = {t["index"]: t for t in read_jsonl(tiny / "world" / "test" / "truth.jsonl")}
    correct = np.array([[np.array_equal(parse(spec, decode_image(c)[None])[0], truth[r["index"]]["after"])
                         for c in r["candidates"]] for r in a])
    assert correct.tolist() == [r["correct"] for r in a]
    m = json.loads((tiny / "local" / "metrics.json").read_text())
    assert m["fdp"]["by_n"]["1"]["exact"] == pytest.approx(correct.mean())
    assert m["fdp"]["by_n"]["1"]["n"] == 32 and m["fdp"]["by_n"]["4"]["n"] == 8 and m["fdp"]["candidates"] == 4
    chosen4 = [json.loads(r["chosen"])["4"][0] for r in a]
    assert chosen4 == [int(np.argmax(r["scores"])) for r in a]
    assert m["fdp"]["by_n"]["4"]["exact"] == pytest.approx(np.mean([correct[i, c] for i, c in enumerate(chosen4)]))
    assert m["fdp"]["oracle_all"] == pytest.approx(correct.any(1).mean())
    assert set(m["fdp"]["by_n"]["1"]["by_type"]) <= {"move", "remove", "add", "swap"}
    assert "greedy" in m["fdp"] and m["idp"]["n"] == 8 and 0 <= m["idp"]["text"]["rouge_l"] <= 1
    for name in ("config.yaml", "metrics.jsonl", "summary.json"):
        assert (tiny / "local" / name).is_file()
    _check_png(tiny / "local" / "grid.png")
    _check_png(tiny / "local" / "score_vs_n.png")
    report = (tiny / "local" / "report.md").read_text()
    assert "best-of-N" in report and "| 4 | 1 |" in report and "IDP" in report and "grid.png" in report


def _aurora_fixture(tiny: Path) -> Path:
    """An AURORA-layout test.json built from world images, with the ways real data goes wrong."""
    src = tiny / "world" / "test"
    recs = read_aurora(src / "test.json")
    root = tiny / "aurora"
    shutil.rmtree(root, ignore_errors=True)
    plan = ["magicbrush", "magicbrush", "ag", "something", "something", "whatsup", "kubric", "clevr"]
    out = []
    for i, (task, rec) in enumerate(zip(plan, recs)):
        d = root / "data" / task / "images" / str(i)
        d.mkdir(parents=True)
        shutil.copy(src / rec.input, d / "first.png")
        shutil.copy(src / rec.output, d / "last.png")
        row = {"input": f"data/{task}/images/{i}/first.png", "output": f"data/{task}/images/{i}/last.png",
               "instruction": rec.instruction, "task": task}
        if i == 4:
            (d / "last.png").unlink()  # a missing target (as 2 Something targets upstream): judged anyway
        if i == 5:
            (d / "first.png").unlink()  # a missing input: skipped
        if i == 6:
            (d / "first.png").write_bytes(b"not an image")  # an unreadable input: skipped
        if task == "clevr":
            del row["output"]  # no target, and not one of the 5 default subsets
        out.append(row)
    (root / "test.json").write_text(json.dumps(out))
    return root / "test.json"


def test_aurora_eval_with_local_judge(tiny):
    data = _aurora_fixture(tiny)
    out = tiny / "aurora_run"
    env = {**os.environ, "DYNBOOT_TEST_JUDGE_KEY": SECRET}
    with StubJudgeServer(api_key=SECRET) as server:
        args = [f"data={data}", f"fdp_path={tiny / 'fdp'}", f"idp_path={tiny / 'idp'}", "n=[1,2]", f"out={out}",
                "use_ray=false", "judge_model=stub-judge", f"judge_base_url={server.base_url}",
                "judge_api_key_env=DYNBOOT_TEST_JUDGE_KEY", "judge_backoff_s=0.01"]
        proc = subprocess.run([sys.executable, "-m", "dynboot.cli", "eval", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert SECRET not in proc.stdout + proc.stderr
        first = server.count()
        m = json.loads((out / "metrics.json").read_text())
        score = m["judge"]["score"]["by_n"]
        assert {k: v["n"] for k, v in score["1"].items()} == {"ag": 1, "magicbrush": 2, "something": 2, "overall": 5}
        assert m["judge"]["stats"]["requests"] == first > 0 and m["judge"]["stats"]["failed"] == 0
        assert set(m["idp"]["by_task"]) == {"magicbrush", "ag", "something"} and m["idp"]["overall"]["n"] == 4

        # the judged images are (before, candidate): check one score against the stub's formula
        rows = pq.read_table(out / "predictions.parquet").to_pylist()
        r = rows[0]
        before, cand = decode_image(r["before"]), decode_image(r["candidates"][0])
        expect = min(0 if np.array_equal(before, cand) else 7, round(10 * float((before == cand).all(-1).mean())))
        assert r["judge_scores"][0] == expect
        no_target = next(x for x in rows if x["index"] == 4)
        assert no_target["target"] == b"" and no_target["caption"] == "" and None not in no_target["judge_scores"]
        skipped = read_jsonl(out / "quarantine" / "inputs.jsonl")
        assert sorted((s["input"], s["stage"]) for s in skipped) == [(4, "load target"), (5, "load input"), (6, "load input")]
        assert {s["reason"] for s in skipped} == {"unreadable_image"} and not contract_problems(out)
        report = (out / "report.md").read_text()
        assert "| magicbrush |" in report and "| overall |" in report and "Skipped inputs (3)" in report
        _check_png(out / "grid.png")
        _check_png(out / "score_vs_n.png")

        # a rerun pays nothing: every judged edit comes from the cache
        os.environ["DYNBOOT_TEST_JUDGE_KEY"] = SECRET
        try:
            summary = run(EvalConfig(**{a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if not a.startswith("n=")}, n=[1, 2]))
        finally:
            del os.environ["DYNBOOT_TEST_JUDGE_KEY"]
        assert server.count() == first and summary["judge"]["requests"] == 0 and summary["judge"]["cache_hits"] == first
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


def test_bad_config_and_data_are_clear_errors(tiny, capsys):
    assert job_main(EvalConfig, run, ["n=[0]"]) == 2
    assert "n must be" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="no such file"):
        run(EvalConfig(data=str(tiny / "nowhere"), out=str(tiny / "bad")))
    # a hosted judge without its key fails before any model runs
    os.environ.pop("DYNBOOT_NO_SUCH_KEY", None)
    with pytest.raises(SystemExit, match="DYNBOOT_NO_SUCH_KEY"):
        run(EvalConfig(data=str(_aurora_fixture(tiny)), fdp_path=str(tiny / "fdp"), judge_api_key_env="DYNBOOT_NO_SUCH_KEY",
                       out=str(tiny / "nokey"), use_ray=False))
    assert not (tiny / "nokey" / "predictions.parquet").exists()


def test_pseudo_label_accuracy_of_a_relabel_output(tiny):
    """relabel_dir= + truth=: the relabel output's labels scored against the videos' true actions."""
    import pyarrow.parquet as pq_

    from dynboot.data.pairs import make_row, to_table

    img = np.zeros((40, 40, 3), dtype=np.uint8)
    truth = tiny / "videos_truth.jsonl"
    truth.write_text(json.dumps({"video_id": "ep0", "segments": [[0, 4], [8, 12], [16, 20]],
                                 "actions": ["move the red square up", "remove the blue circle"], "scenes": []}) + "\n")
    rows = [make_row("ep0", 1, 9, img, img, "move the red square up", "pseudo", "idp"),  # right
            make_row("ep0", 9, 17, img, img, "remove the red square", "pseudo", "idp")]  # wrong object
    (tiny / "relabel" / "shards").mkdir(parents=True, exist_ok=True)
    pq_.write_table(to_table(rows), tiny / "relabel" / "shards" / "ep0.parquet")
    run(EvalConfig(data=str(tiny / "world" / "test"), relabel_dir=str(tiny / "relabel"), truth=str(truth),
                   out=str(tiny / "pl"), use_ray=False))
    m = json.loads((tiny / "pl" / "metrics.json").read_text())
    assert m["pseudo_labels"]["accuracy"] == 0.5 and m["pseudo_labels"]["matched"] == 2
    assert "Pseudo-label accuracy" in (tiny / "pl" / "report.md").read_text()
