"""The console contract of a job run as a person runs it (`python -m jobs.train …` in its own process): a line
per stage / result, progress lines that parse, none of Ray's or DeepSpeed's output on the terminal and all of it in
`<out>/log.txt`; `--verbose` shows it. The same run reports its metrics to a local MLflow file store, and another to
an offline W&B run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# lines only Ray / DeepSpeed / warnings write: an actor's prefix "(TrainController pid=…)", log records, warnings
NOISE = ("pid=", "WARNING", "INFO", "Warning:", "DeepSpeed", "PlacementGroup", "[36m")


def _have_mlflow() -> bool:
    try:
        import mlflow  # noqa: F401
    except ModuleNotFoundError:
        return False
    return True


def _train(small_world: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_TMPDIR=tempfile.mkdtemp(prefix="ray-console-"),
               MLFLOW_ALLOW_FILE_STORE="true", **(env or {}))  # MLflow 3 opens a file store only when told to
    cmd = [sys.executable, "-m", "jobs.train", "task=idp", f"data={small_world}", f"eval_data={small_world}",
           f"out={out}", "steps=30", "batch_size=8", "size=xxs", "num_workers=1", "cpus_per_worker=1", "zero_stage=0",
           "eval_every=15", "eval_limit=16", "checkpoint_every=0", "progress_every_s=0.5", *extra]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def train_run(small_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("console") / "idp"
    store = out.parent / "mlruns"
    extra = ["tracking=mlflow", f"tracking_uri={store.as_uri()}", "tracking_project=console-test"] if _have_mlflow() else []
    proc = _train(small_world, out, *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, store, proc


@pytest.mark.slow
def test_console_shows_progress_and_results_and_the_log_holds_the_rest(train_run):
    from jobs.train_progress import PROGRESS_LINE

    out, _, proc = train_run
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    progress = [m for m in map(PROGRESS_LINE.match, lines) if m]
    assert progress, lines
    steps = [int(m["step"]) for m in progress]
    assert steps == sorted(steps) and all(int(m["steps"]) == 30 for m in progress)
    assert all(float(m["loss"]) > 0 and float(m["rate"]) > 0 for m in progress)
    assert any("done: 30 steps" in line for line in lines), lines
    noisy = [line for line in lines if any(n in line for n in NOISE)]
    assert not noisy, noisy
    log = (out / "log.txt").read_text()
    assert "RayTrainWorker" in log and "TrainController" in log  # the workers' output, forwarded by Ray
    assert "done: 30 steps" in log  # the console's lines are in the log too, in their place
    # every progress line is backed by the metrics the rank wrote
    logged = {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert all(abs(logged[int(m["step"])]["loss"] - float(m["loss"])) < 1e-4 for m in progress)


@pytest.mark.parametrize("verbose", [False, True])
def test_captured_sends_every_writer_to_the_log_and_say_to_the_terminal(tmp_path, capfd, verbose):
    """What libraries write — Python prints (warnings print to sys.stderr), a child process's stdout and a C-level
    write to fd 2 — goes to the log; `say` lines to the terminal as well. `verbose` shows the log on the terminal
    as it grows."""
    from dynboot.io.console import captured, say

    log = tmp_path / "log.txt"
    with captured(log, verbose=verbose):
        say("1/2 stage one")
        print("library print")
        print("a deprecation warning", file=sys.stderr)
        subprocess.run([sys.executable, "-c", "print('child process line')"], check=True)
        os.write(2, b"raw fd2 line\n")
        say("2/2 stage two")
    terminal = capfd.readouterr()
    text = log.read_text()
    noise = ("library print", "a deprecation", "child process line", "raw fd2 line")
    assert all(n in text for n in noise) and text.index("1/2 stage one") < text.index("2/2 stage two")
    shown = terminal.out + terminal.err
    assert "1/2 stage one" in shown and "2/2 stage two" in shown
    assert all((n in shown) == verbose for n in noise), shown
    assert shown.count("2/2 stage two") == 1
    say("after")  # outside: a plain print
    assert capfd.readouterr().out == "after\n"


@pytest.mark.slow
def test_metrics_reach_a_local_mlflow_file_store(train_run, monkeypatch):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    out, store, _ = train_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=store.as_uri())
    exp = client.get_experiment_by_name("console-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "idp"
    assert run.data.params["task"] == "idp" and run.data.params["steps"] == "30"
    history = client.get_metric_history(run.info.run_id, "loss")
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(m.step for m in history) == [r["step"] for r in logged]  # every step, once
    assert {m.step: m.value for m in history}[30] == pytest.approx(logged[-1]["loss"])
    assert client.get_metric_history(run.info.run_id, "eval_loss")  # the evaluations too
    assert "summary/samples_per_s" in run.data.metrics


def test_tracking_is_typed_and_a_missing_package_names_the_extra(monkeypatch):
    from dynboot.config import ConfigError, load_config
    from dynboot.io.tracking import open_tracker
    from jobs.train import TrainConfig

    with pytest.raises(ConfigError, match="tracking"):
        load_config(TrainConfig, ["tracking=tensorboard"])
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: `import wandb` raises ModuleNotFoundError
    with pytest.raises(ValueError, match="tracking=wandb needs wandb"):
        open_tracker("wandb", "idp", {})


def _wandb_offline_runs(root: Path) -> list[dict]:
    """Each offline W&B run under `root`: its name, config, history rows, summary and exit code, read from its
    transaction log (`run-<id>.wandb`). wandb 0.31 ships no Python reader of that file (its reader moved into the Go
    core), so this reads the format itself: a 7-byte header, then LevelDB-log records (crc32 4 bytes, length 2, type
    1: FULL=1 FIRST=2 MIDDLE=3 LAST=4) in 32 KiB blocks, each record a wandb_internal_pb2.Record."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    def key(item) -> str:
        return item.key or "/".join(item.nested_key)

    runs = []
    for path in sorted(root.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, buf = path.read_bytes(), 7, b""
        assert data[:4] == b":W&B", path
        run = {"history": [], "summary": {}, "config": {}, "exit": None}
        while pos + 7 <= len(data):
            if 32768 - pos % 32768 < 7:  # a block's trailer too short for a header is padding
                pos += 32768 - pos % 32768
                continue
            _crc, n, kind = struct.unpack("<IHB", data[pos: pos + 7])
            if kind == 0:
                break
            buf, pos = buf + data[pos + 7: pos + 7 + n], pos + 7 + n
            if kind not in (1, 4):
                continue
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            which = record.WhichOneof("record_type")
            if which == "run":
                run["name"] = record.run.display_name
                run["project"] = record.run.project
                run["config"] |= {key(i): json.loads(i.value_json) for i in record.run.config.update}
            elif which == "history":
                run["history"].append({key(i): json.loads(i.value_json) for i in record.history.item})
            elif which == "summary":
                run["summary"] |= {key(i): json.loads(i.value_json) for i in record.summary.update}
            elif which == "exit":
                run["exit"] = record.exit.exit_code
        runs.append(run)
    return runs


def test_wandb_runs_opened_in_turn_and_at_once_each_keep_their_metrics(tmp_path, monkeypatch):
    """A driver tracks several jobs (the quickstart: IDP, then the FDP runs, then its results): opening the next
    run must not end the one still open, and each run's history and summary stay its own."""
    pytest.importorskip("wandb")
    from dynboot.io.tracking import open_tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    idp = open_tracker("wandb", "idp", {"task": "idp", "lora": {"rank": 16}}, project="t")
    idp.log({"loss": 1.0}, step=1)
    fdp = open_tracker("wandb", "fdp", {"task": "fdp"}, project="t")  # opened while idp is still open
    fdp.log({"loss": 3.0}, step=1)
    idp.log({"loss": 0.5}, step=2)
    fdp.finish({"eval": {"exact": 0.25}})
    idp.finish({"eval": {"exact": 0.75}}, ok=False)
    runs = {r["name"]: r for r in _wandb_offline_runs(tmp_path)}
    assert set(runs) == {"idp", "fdp"} and {r["project"] for r in runs.values()} == {"t"}
    assert [h["loss"] for h in runs["idp"]["history"]] == [1.0, 0.5]
    assert [h["loss"] for h in runs["fdp"]["history"]] == [3.0]
    assert runs["idp"]["config"]["lora"] == {"rank": 16}
    assert runs["idp"]["summary"]["eval/exact"] == 0.75 and runs["fdp"]["summary"]["eval/exact"] == 0.25
    assert runs["idp"]["exit"] == 1 and runs["fdp"]["exit"] == 0


@pytest.mark.slow
def test_a_train_run_reports_to_an_offline_wandb_run(small_world, tmp_path):
    """`tracking=wandb` through the train job as a person runs it: every logged step reaches the W&B run."""
    pytest.importorskip("wandb")
    out = tmp_path / "idp"
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    proc = _train(small_world, out, "tracking=wandb", "tracking_project=console-test", "steps=10", "eval_every=5",
                  env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = _wandb_offline_runs(tmp_path)
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {h["_step"]: h["loss"] for h in run["history"] if "loss" in h}
    assert sorted(losses) == [r["step"] for r in logged] and losses[10] == pytest.approx(logged[-1]["loss"])
    assert any("eval_loss" in h for h in run["history"])
    assert run["name"] == "idp" and run["config"]["steps"] == 10 and run["exit"] == 0
    assert "samples_per_s" in run["summary"]
