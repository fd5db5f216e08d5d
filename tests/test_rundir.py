"""The run-directory contract: one job per directory (a lock a crashed job cannot leave stuck), a rerun with a
different config stops naming the fields, resume=force / off, metrics on local and object storage, and the contract
checker (`contract_problems`) on a directory that holds the contract and on each way one can break it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from pydantic import Field

from dynboot.io import storage
from dynboot.config import Config
from dynboot.io.rundir import (QUARANTINE_FIELDS, ConfigChanged, RunDir, RunDirBusy, append_jsonl, config_differences,
                               contract_problems, quarantine_row)


class JobConfig(Config):
    steps: int = Field(10, description="steps")
    lr: float = Field(0.1, description="lr")
    progress_s: float = Field(5.0, description="operational")
    resume: str = Field("auto", description="resume")
    rerun_may_change = frozenset({"progress_s"})


def test_lock_excludes_a_second_job_and_is_released(tmp_path):
    with RunDir(tmp_path / "run").open(JobConfig()):
        with pytest.raises(RunDirBusy, match=r"in use by pid \d+"):
            RunDir(tmp_path / "run").open(JobConfig())
    with RunDir(tmp_path / "run").open(JobConfig()) as rd:  # released on exit
        rd.log(step=1)


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    run = tmp_path / "run"
    code = ("import sys, time; from dynboot.io.rundir import RunDir; from dynboot.config import Config; "
            f"rd = RunDir({str(run)!r}); rd.lock(); print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirBusy, match=f"pid {proc.pid}"):
            RunDir(run).lock()
        os.kill(proc.pid, signal.SIGKILL)  # a crash: no cleanup code runs
        proc.wait(10)
        rd = RunDir(run)
        rd.lock()
        rd.close()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_rerun_with_a_different_config_names_the_fields(tmp_path):
    with RunDir(tmp_path).open(JobConfig(steps=10, lr=0.1)):
        pass
    with RunDir(tmp_path).open(JobConfig(steps=10, lr=0.1, progress_s=1.0)):  # operational change: fine
        pass
    with pytest.raises(ConfigChanged, match=r"lr: 0.1 -> 0.2; steps: 10 -> 20.*resume=force"):
        RunDir(tmp_path).open(JobConfig(steps=20, lr=0.2))
    with RunDir(tmp_path).open(JobConfig(steps=20, lr=0.2), resume="force"):
        pass
    assert "steps: 20" in (tmp_path / "config.yaml").read_text()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with RunDir(tmp_path).open(JobConfig(steps=5), resume="off", set_aside=("checkpoints",)):
        pass
    assert list(tmp_path.glob("metrics.jsonl.old-*")) and not (tmp_path / "metrics.jsonl").exists()
    assert config_differences({"a": {"b": 1}, "c": 2}, {"a": {"b": 2}, "c": 2}) == {"a.b": (1, 2)}
    assert config_differences({"a": {"b": 1}}, {"a": {"b": 2}}, frozenset({"a"})) == {}


def test_object_storage_run_dir_lease_and_metrics(bucket):
    out = f"{bucket}/runs/job one"
    with RunDir(out).open(JobConfig()) as rd:
        assert storage.exists(rd.uri("_lock.json"))
        with pytest.raises(RunDirBusy, match="lease refreshed"):
            RunDir(out).open(JobConfig())
        for step in range(3):
            rd.log(step=step)
        rd.write_summary({"ok": True})
        storage.write_text(rd.uri("quarantine", "inputs.jsonl"), json.dumps(quarantine_row("v1", "decode", "missing")) + "\n")
    assert not contract_problems(out)
    assert not storage.exists(f"{out}/_lock.json")
    assert [r["step"] for r in RunDir(out).metrics()] == [0, 1, 2]
    assert "steps: 10" in storage.read_text(f"{out}/config.yaml")
    with pytest.raises(ConfigChanged, match="steps"):
        RunDir(out).open(JobConfig(steps=11))
    storage.write_text(f"{out}/_lock.json", '{"id": "dead", "owner": "a crashed job", "heartbeat": %f}'
                       % (time.time() - 10_000))
    with RunDir(out).open(JobConfig()):  # a stale lease is taken over
        pass


def test_the_contract_checker_names_each_way_a_run_directory_breaks_it(tmp_path):
    with RunDir(tmp_path).open(JobConfig()) as rd:
        rd.log(step=1)
        rd.write_summary({"steps": 1})
        try:
            raise FileNotFoundError("no such file: v2.mp4")
        except FileNotFoundError as err:
            append_jsonl(rd.quarantine / "videos.jsonl", quarantine_row("v2", "decode", "missing", err, path="v2.mp4"))
        append_jsonl(rd.quarantine / "videos.jsonl", quarantine_row(7, "load", "unreadable_image", attempts=2))
    assert contract_problems(tmp_path) == []
    rows = [json.loads(line) for line in (tmp_path / "quarantine" / "videos.jsonl").read_text().splitlines()]
    assert tuple(rows[0]) == QUARANTINE_FIELDS and rows[0]["error_class"] == "FileNotFoundError"
    assert rows[0]["error"] == "FileNotFoundError: no such file: v2.mp4" and rows[0]["path"] == "v2.mp4"
    assert rows[1] == {"input": 7, "path": "", "stage": "load", "reason": "unreadable_image", "error_class": "",
                       "error": "unreadable_image", "attempts": 2}  # with no message, the reason is the message

    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "summary.json").write_text("{not json")
    (tmp_path / "config.yaml").unlink()
    append_jsonl(tmp_path / "quarantine" / "old.jsonl", {"row": 3, "video": "a.mp4", "reason": "empty_span",
                                                         "error": "end before start", "stage": "clip_pairs"})
    append_jsonl(tmp_path / "quarantine" / "old.jsonl", quarantine_row("v3", "decode", ""))
    problems = contract_problems(tmp_path)
    assert problems[:3] == ["no config.yaml", "metrics.jsonl has no rows", problems[2]]
    assert problems[2].startswith("summary.json does not parse")
    assert problems[3].startswith("quarantine/old.jsonl:1 has fields ['error', 'reason', 'row', 'stage', 'video']")
    assert problems[4] == "quarantine/old.jsonl:2 gives no reason" and len(problems) == 5
