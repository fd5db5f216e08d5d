"""jobs/gpu_smoke.py runs on CPU at size=tiny with the production batch sizes of its config, so it cannot rot
while no GPU is around: every stage of every backend, timings and the JSON it writes. `pytest tests/test_gpu_smoke.py`"""

from __future__ import annotations

import json

import pytest
import torch

from jobs.gpu_smoke import GpuSmokeConfig, main


@pytest.mark.slow
def test_gpu_smoke_runs_every_stage_at_tiny_size_on_cpu(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = GpuSmokeConfig(size="tiny", allow_cpu=True, dtype="float32", out=str(tmp_path / "run"),
                             results=str(tmp_path / "smoke.json"))  # every other setting: the production default
        summary = main(cfg)
    finally:
        torch.set_num_threads(threads)
    assert summary is not None and summary["errors"] == {}
    assert json.loads((tmp_path / "smoke.json").read_text())["stages"] == summary["stages"]
    stages = {(r["backend"], r["stage"]) for r in summary["stages"]}
    for backend in ("janus", "anole", "liquid"):
        for stage in ("build", "caption", "caption_scored (relabel)", "score", "sample n=8 cfg=1", "sample n=8 cfg=3",
                      "train step fdp (LoRA)"):
            assert (backend, stage) in stages, (backend, stage)
    assert all(r["tokens_per_s"] > 0 for r in summary["stages"] if "tokens" in r)
    assert all(r["loss"] > 0 for r in summary["stages"] if r["stage"].startswith("train"))
