"""Training: the mixture plan, the data index, checkpoint trust, the config, and the Ray Train + DeepSpeed job on a
local Ray cluster (recipe tests: the job's per-step losses are the plain loop's, to 1e-4).

    python -m pytest -q tests/test_train.py                  # 5 Ray Train runs, 2 restarts: 17 min on 2 shared cores at load ~50
    python -m pytest -q tests/test_train.py -m "not slow"    # plan, index, manifests, config: seconds

The first DeepSpeed use on a machine JIT-builds its shm comm op (~1 min, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dynboot.io import storage
from dynboot.io.checkpoint_manifest import KEY_ENV, UntrustedCheckpoint, verify_checkpoint, write_manifest
from dynboot.config import ConfigError, load_config
from dynboot.data.data_index import EmptySource, build_index, changes, record_index
from dynboot.io.images import ImagePolicy
from dynboot.data.ingest import RankStream
from dynboot.data.mixture import MixturePlan, Source
from dynboot.data.pairs import gold_rows, to_table
from dynboot.io.rundir import contract_problems, read_jsonl
from jobs.train import InputError, TrainConfig, unknown_tags

AURORA = Path(__file__).parent / "data" / "aurora"
GRID = ImagePolicy(kind="squash", size=40, resample="nearest")  # the small world's frames, as they are


# ---- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pseudo_shards(small_world, tmp_path_factory) -> Path:
    """20 pseudo rows (from the test split) in one Parquet file (row 3's `before` is not a PNG) and a file that is
    no Parquet at all."""
    rows = list(gold_rows(small_world / "test" / "test.json"))[:20]
    for r in rows:
        r["source"], r["id"], r["model_id"] = "pseudo", "ep9:" + r["id"], "tiny:idp"
    rows[3]["before"] = b"this is not a png"
    out = tmp_path_factory.mktemp("shards")
    pq.write_table(to_table(rows), out / "ep9.parquet", row_group_size=8)
    (out / "broken.parquet").write_bytes(b"PAR1 truncated upload")
    (out / ".ep10.parquet.tmp").write_bytes(b"a temp file of a writer")
    return out


@pytest.fixture(scope="module")
def base_model(small_world, tmp_path_factory) -> Path:
    """An untrained xxs tiny model saved as a checkpoint: model_path for the LoRA runs."""
    from dynboot.models.tiny import TinyWorldModel
    from dynboot.world.generate import load_spec

    path = tmp_path_factory.mktemp("base")
    TinyWorldModel.create(load_spec(small_world), "xxs", seed=1).save(path)
    return path


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """A local Ray cluster started after the loopback S3 server, so that its workers inherit the AWS_* variables."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def quick(**kw) -> TrainConfig:
    """A few tiny steps: 2 workers x 1 thread, no periodic evaluation."""
    base = dict(size="xxs", steps=8, batch_size=8, warmup=1, num_workers=2, threads=1, eval_every=0, eval_limit=16,
                checkpoint_every=0, max_failures=1, shuffle_window=32)
    return TrainConfig(**(base | kw))


def losses(out) -> list[float]:
    return [r["loss"] for r in read_jsonl(storage.join(str(out), "metrics.jsonl")) if "loss" in r]


def plain_losses(cfg: TrainConfig) -> list[float]:
    from jobs.train_worker import plain_reference

    return [r["loss"] for r in plain_reference(cfg)]


def check_export(out: Path, dtype=torch.float32) -> None:
    """out/model loads with `load_model` and gives the trained engine's loss on the probe batch the job recorded."""
    from dynboot.models.registry import load_model

    probe = torch.load(out / "export_probe.pt", weights_only=True)
    model = load_model(out / "model", dtype=dtype)
    with torch.no_grad():
        got = float(model.loss(probe["batch"]))
    assert abs(got - float(probe["engine_loss"])) < 1e-4


# ---- the mixture plan (no Ray) -------------------------------------------------------------------------------
def test_plan_shares_epochs_ranks_and_resume():
    plan = MixturePlan([np.array([64, 64, 10]), np.array([5])], weights=[3, 1], seed=0, window=40)
    # every window: source 0 gives 30 rows, source 1 10 (the weights are shares, whatever the sizes)
    for j in range(5):
        got = np.bincount([p.src for p in plan.window_pieces(j) for _ in range(p.hi - p.lo)], minlength=2)
        assert got.tolist() == [30, 10]
    # an epoch of source 0 (138 rows) visits every row once, whichever rank's window holds it
    seen = [(p.chunk, r) for j in range(20) for p in plan.window_pieces(j) if p.src == 0 for r in range(p.lo, p.hi)]
    first_epoch = seen[:138]
    assert len(set(first_epoch)) == 138 and set(seen[138:276]) == set(first_epoch)
    # a rank's stream resumed at its position continues exactly where it was
    idx = build_index([Source(path=str(AURORA / "data" / "something")), Source(path=str(AURORA / "data" / "kubric"))])
    policy = ImagePolicy(kind="center_crop", size=16)
    whole = RankStream(idx, 1, 3, policy, seed=5, window=7)
    ids = [e.meta["id"] for e in whole.next(30)]
    part = RankStream(idx, 1, 3, policy, seed=5, window=7)
    head = [e.meta["id"] for e in part.next(11)]
    resumed = RankStream(idx, 1, 3, policy, seed=5, window=7, start=part.position)
    assert head + [e.meta["id"] for e in resumed.next(19)] == ids
    early = RankStream(idx, 1, 3, policy, seed=5, window=7)
    early.start()  # reading begins in a thread before the first `next`: the same rows
    assert [e.meta["id"] for e in early.next(30)] == ids
    # fewer rows (5) than ranks x batch: every rank still gets full batches (rows repeat)
    for rank in range(3):
        assert len(RankStream(idx, rank, 3, policy, seed=0, window=4).next(16)) == 16


def test_a_small_data_set_is_decoded_once_and_streams_the_same_rows(small_world, pseudo_shards, tmp_path):
    """decode_cache_mb: an index whose decoded images fit is decoded once per process, not once per epoch: the same
    examples in the same order as without the cache, malformed rows still skipped, and the second epoch reads no
    image file (they are deleted after the first here: without the cache every row of it would be malformed)."""
    import shutil

    gold = tmp_path / "gold"
    shutil.copytree(small_world / "gold", gold)
    sources = [Source(path=str(gold)), Source(path=str(pseudo_shards), weight=0.1)]

    def stream(cache_mb: float) -> RankStream:
        return RankStream(build_index(sources), 0, 1, GRID, seed=3, window=64, cache_mb=cache_mb)

    plain, cached = stream(0), stream(256)
    epoch = 230  # > one epoch of the 200 gold rows (+ the pseudo rows, one of them malformed)
    want, got = plain.next(epoch), cached.next(epoch)
    assert [e.meta["id"] for e in got] == [e.meta["id"] for e in want]
    assert all(np.array_equal(a.before, b.before) and np.array_equal(a.after, b.after) and a.action == b.action
               for a, b in zip(got, want))
    assert set(cached.malformed) == set(plain.malformed) and len(cached.malformed) == 1
    too_small = stream(0.001)  # 1 KiB: the data set does not fit, nothing is kept
    too_small.next(8)
    assert not too_small.index.decoded and cached.index.decoded
    shutil.rmtree(gold / "images")
    again = cached.next(epoch)
    assert len(again) == epoch and not any("missing image" in r for r in cached.malformed.values())
    plain.next(epoch)  # without it the second epoch reads the files again: its gold rows are malformed now
    assert sum("missing image" in r for r in plain.malformed.values()) == 200


def test_index_counts_bad_files_and_rows_and_reports_changes(small_world, pseudo_shards, tmp_path):
    index = build_index([Source(path=str(small_world)), Source(path=str(pseudo_shards), weight=3)])
    gold, pseudo = index.sources
    assert (gold.rows, pseudo.rows) == (200, 20) and gold.kind == "records" and pseudo.kind == "pairs"
    assert [b["file"] for b in pseudo.report["bad_files"]] == [str(pseudo_shards / "broken.parquet")]
    stream = RankStream(index, 0, 1, GRID, seed=0, window=64)
    ex = stream.next(200)
    assert abs(np.mean([e.meta["src"] for e in ex]) - 0.75) < 0.03  # weights are ratios
    assert list(stream.malformed) == ["ep9:test:3:3"] and "not a decodable image" in stream.malformed["ep9:test:3:3"]

    shards = tmp_path / "shards"  # the data changes under a recorded run
    shards.mkdir()
    for name in ("a", "b"):
        pq.write_table(to_table(list(gold_rows(small_world / "test" / "test.json"))[:10]), shards / f"{name}.parquet")
    recorded = record_index(build_index([Source(path=str(shards))]), str(tmp_path / "run" / "data"))
    assert changes(recorded) == []
    pq.write_table(to_table(list(gold_rows(small_world / "test" / "test.json"))[:3]), shards / "a.parquet")
    (shards / "b.parquet").unlink()
    pq.write_table(to_table(list(gold_rows(small_world / "test" / "test.json"))[:4]), shards / "c.parquet")
    notes = changes(recorded)
    assert len(notes) == 3 and "added" in notes[0] and "removed" in notes[1] and "changed" in notes[2]
    after = RankStream(recorded, 0, 1, GRID, seed=0, window=20)
    with pytest.raises(RuntimeError, match="no usable row.*(changed since|removed since)"):
        after.next(1)  # every recorded row is gone or changed: a clear error, not an endless loop
    with pytest.raises(EmptySource, match="no AURORA train.json and no Parquet files"):
        build_index([Source(path=str(tmp_path / "run"))])


def test_checkpoints_are_unpickled_only_when_this_run_wrote_them(tmp_path, monkeypatch):
    ckpt = tmp_path / "step_000004"
    (ckpt / "ds").mkdir(parents=True)
    (ckpt / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"rank 0 state")
    write_manifest(ckpt, "run-1", "rank0")
    (ckpt / "ds" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"rank 1 state")
    write_manifest(ckpt, "run-1", "rank1")  # each rank lists what it wrote; the union covers the directory
    verify_checkpoint(ckpt, "run-1")
    with pytest.raises(UntrustedCheckpoint, match="another run"):
        verify_checkpoint(ckpt, "run-2")
    (ckpt / "ds" / "extra.pt").write_bytes(b"dropped in later")
    with pytest.raises(UntrustedCheckpoint, match="extra.pt is listed in no manifest"):
        verify_checkpoint(ckpt, "run-1")
    (ckpt / "ds" / "extra.pt").unlink()
    (ckpt / "ds" / "mp_rank_00_model_states.pt").write_bytes(b"rank 0 state, edited")
    with pytest.raises(UntrustedCheckpoint, match="differs from what this run saved"):
        verify_checkpoint(ckpt, "run-1")
    # with a key, a manifest rewritten by someone without it is refused
    monkeypatch.setenv(KEY_ENV, "s3cret")
    signed = tmp_path / "signed"
    signed.mkdir()
    (signed / "latest").write_text("ds")
    write_manifest(signed, "run-1", "rank0")
    verify_checkpoint(signed, "run-1")
    monkeypatch.setenv(KEY_ENV, "another key")
    with pytest.raises(UntrustedCheckpoint, match="not signed"):
        verify_checkpoint(signed, "run-1")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "latest").write_text("ds")
    with pytest.raises(UntrustedCheckpoint, match="no manifest"):
        verify_checkpoint(tmp_path / "foreign", "run-1")


def test_train_config_typed_choices_and_sources():
    cfg = load_config(TrainConfig, ["data=[a, {path: b, weight: 2, tag: pseudo, max_items: 10}]", "task=fdp", "lora.rank=8"])
    assert [(s.path, s.weight, s.tag, s.max_items) for s in cfg.data] == [("a", 1.0, "", None), ("b", 2.0, "pseudo", 10)]
    assert load_config(TrainConfig, ["data=runs/x"]).data[0].path == "runs/x"
    assert not TrainConfig().use_lora and TrainConfig(model_path="ckpt").use_lora  # auto: LoRA on checkpoints
    for bad, field in [("weighting=foo", "weighting"), ("task=vqa", "task"), ("size=xl", "size"),
                       ("resume=maybe", "resume"), ("zero_stage=4", "zero_stage"), ("data=[{path: b, weight: 0}]", "weight"),
                       ("gradient_checkpointing=sometimes", "gradient_checkpointing")]:
        with pytest.raises(ConfigError, match=field):
            load_config(TrainConfig, [bad])
    with pytest.raises(ConfigError, match="tag"):
        load_config(TrainConfig, ["data=[{path: b, tag: pseudo}]", "task=idp"])
    assert load_config(TrainConfig, ["resume=off"]).resume == "off"  # YAML reads off as false
    assert load_config(TrainConfig, ["resume=true"]).resume == "auto" and TrainConfig(resume="force").resume == "force"
    assert "cpus_per_worker" in TrainConfig.rerun_may_change and "lr" not in TrainConfig.rerun_may_change
    # the tiny word-level tokenizer knows action words only: any other tag would be <unk>
    assert unknown_tags(TrainConfig(task="fdp", data=[{"path": "b", "tag": "pseudo"}])) == ["pseudo"]
    assert unknown_tags(TrainConfig(task="fdp", data=[{"path": "b", "tag": "red"}])) == []


def test_bad_sources_fail_before_any_cluster_work(tmp_path):
    from jobs.train import run

    with pytest.raises(InputError, match="does not exist"):
        run(TrainConfig(data=[str(tmp_path / "nowhere")], eval_data="", out=str(tmp_path / "run")))
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "test.json").write_text((AURORA / "test.json").read_text())
    with pytest.raises(InputError, match="benchmark"):
        run(TrainConfig(data=[str(bench)], eval_data="", out=str(tmp_path / "run")))
    with pytest.raises(InputError, match="0 pairs"):  # test.json named, but its images are not beside it
        run(TrainConfig(data=[str(bench / "test.json")], eval_data="", out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_cli_help_lists_train_fields():
    res = subprocess.run([sys.executable, "-m", "dynboot.cli", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for name in ("zero_stage", "lora.rank", "cpus_per_worker", "shuffle_window", "export_merged", "gradient_checkpointing"):
        assert name in res.stdout


# ---- the Ray Train + DeepSpeed job ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_one_worker_zero2_lora_matches_the_plain_loop(ray_cluster, small_world, base_model, tmp_path):
    """Same base, LoRA init, data plan, seed, augmentation and dropout draws: the Ray job's per-step losses (1 worker,
    ZeRO-2, LoRA, batches streamed through Ray Data) are the plain loop's, recipe-test style."""
    from jobs.train import run

    cfg = quick(task="idp", model_path=str(base_model), data=[Source(path=str(small_world))], eval_data="",
                num_workers=1, zero_stage=2, out=str(tmp_path / "ray"), steps=6)
    summary = run(cfg)
    assert summary["lora"] and summary["zero_stage"] == 2
    plain = plain_losses(cfg)
    ray_losses = losses(tmp_path / "ray")
    assert len(ray_losses) == len(plain) == 6
    assert np.max(np.abs(np.array(ray_losses) - plain)) < 1e-4
    assert ray_losses[-1] < ray_losses[0]
    ckpt = Path(summary["checkpoint"])  # LoRA checkpoints hold the trainable parameters only
    states = torch.load(ckpt / "ds" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert states and all("lora_" in k for k in states)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["idp", "fdp"])
def test_zero3_lora_exports_real_adapter_and_skips_malformed_rows(task, ray_cluster, small_world, pseudo_shards, base_model, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    from dynboot.models.tiny import TinyWorldModel
    from jobs.train import run

    out = tmp_path / task
    summary = run(quick(task=task, model_path=str(base_model), zero_stage=3, out=str(out),
                        data=[Source(path=str(small_world)), Source(path=str(pseudo_shards), weight=0.5)],
                        eval_data=str(small_world / "test")))
    assert summary["lora"] and summary["zero_stage"] == 3
    assert summary["rows"] == 220 and summary["malformed_rows"] == 1 and summary["examples"] == 219
    assert summary["data"][1]["bad_files"][0]["file"].endswith("broken.parquet")
    quarantined = [json.loads(line) for f in sorted((out / "quarantine").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert {q["input"] for q in quarantined} == {"ep9:test:3:3"} and not contract_problems(out)
    loss = losses(out)
    assert len(loss) == 8 and np.mean(loss[-2:]) < np.mean(loss[:2])
    assert "eval_loss" in summary["eval"] and "eval_exact" in summary["eval"]  # evaluated on every ZeRO-3 rank
    assert (out / "loss_curve.png").stat().st_size > 0
    export = summary["export"]
    assert export["merged"] and export["check"]["rel_diff"] < 1e-5  # the tiny backend saves no adapter-only dirs
    check_export(out)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())  # not the empty ZeRO-3 adapter
    assert all(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)  # B starts at 0: trained values
    assert export["adapter_params"] == export["trainable_params"] > 0
    # base + adapter, as PEFT loads them, gives the trained engine's loss too
    probe = torch.load(out / "export_probe.pt", weights_only=True)
    base = TinyWorldModel.load(base_model)
    base.net = PeftModel.from_pretrained(base.net, out / "adapter").eval()
    with torch.no_grad():
        assert abs(float(base.loss(probe["batch"])) - float(probe["engine_loss"])) < 1e-4


@pytest.mark.slow
def test_zero2_fdp_resumes_after_a_worker_dies(ray_cluster, small_world, tmp_path):
    """Full training (no LoRA), ZeRO-2, 2 workers: rank 1 dies hard after step 3; the group restarts from the step-2
    checkpoint (verified before it is unpickled) with each rank's data position restored, and finishes."""
    from jobs.train import run

    out = tmp_path / "fdp"
    cfg = quick(task="fdp", zero_stage=2, out=str(out), checkpoint_every=2, fault_step=3, fault_rank=1,
                data=[Source(path=str(small_world))], eval_data=str(small_world / "test"), eval_every=4)
    summary = run(cfg)
    assert (out / ".fault_injected").exists()
    assert summary["attempts"] == [0, 2]  # the second worker group started from the step-2 checkpoint
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert steps == list(range(1, 9))  # the steps redone after the crash replace the lost ones
    loss = losses(out)
    assert np.mean(loss[-2:]) < np.mean(loss[:2])
    assert "eval_changed_cell_acc" in summary["eval"]
    check_export(out)
    # a rerun with a changed setting that is not operational stops, naming it (before any cluster work)
    from dynboot.io.rundir import ConfigChanged

    with pytest.raises(ConfigChanged, match="lr"):
        run(cfg.model_copy(update={"lr": 1e-3}))


@pytest.mark.slow
def test_real_backend_on_aurora_sample_everything_on_s3(ray_cluster, bucket, tmp_path):
    """A real backend (tiny random Liquid: VQ-GAN tokens) fine-tuned with LoRA on the AURORA sample's mixed sizes,
    with data, model_path and out all on the loopback S3 server, a worker killed mid-run: the restart restores from
    the bucket, and the per-step losses are the plain loop's on the local copies."""
    from dynboot.models.liquid import LiquidModel
    from jobs.train import run

    LiquidModel.create("tiny", seed=0).save(tmp_path / "liquid")
    storage.copy_dir(str(tmp_path / "liquid"), f"{bucket}/models/liquid")
    storage.copy_dir(str(AURORA), f"{bucket}/AURORA")
    out = f"{bucket}/runs/fdp"
    kw = dict(task="fdp", num_workers=1, zero_stage=2, steps=6, batch_size=4, checkpoint_every=2, fault_step=3,
              fault_rank=0, weighting="relative", eval_data=f"{bucket}/AURORA/test.json", eval_limit=4, lr=1e-3)
    cfg = quick(**kw, model_path=f"{bucket}/models/liquid", out=out,
                data=[Source(path=f"{bucket}/AURORA"), Source(path=f"{bucket}/AURORA/data/kubric/train.json", weight=0.5)])
    summary = run(cfg)
    assert summary["attempts"] == [0, 2] and summary["lora"]
    assert summary["data"][0]["missing_images"] == 4 and summary["eval"]["eval_loss"] > 0
    assert storage.is_file(f"{out}/checkpoints/step_000006/manifest_rank0.json")
    assert storage.is_file(f"{out}/model/dynboot.json") and storage.is_file(f"{out}/adapter/adapter_model.safetensors")
    assert storage.is_file(f"{out}/summary.json") and not (tmp_path / "s3:").exists()
    local = quick(**kw, model_path=str(tmp_path / "liquid"), out=str(tmp_path / "unused"),
                  data=[Source(path=str(AURORA)), Source(path=str(AURORA / "data" / "kubric" / "train.json"), weight=0.5)])
    assert np.max(np.abs(np.array(losses(out)) - plain_losses(local))) < 1e-4
    from dynboot.models.registry import load_model

    exported = load_model(storage.local_model_dir(f"{out}/model"))
    assert exported.backend == "liquid"


def test_gradient_checkpointing_recomputes_without_changing_the_step(small_world):
    """gradient_checkpointing=true trades memory for recomputation: same losses as off, on the plain core."""
    from dynboot.training.trainer import TrainLoop
    from jobs.train_model import build_model, set_gradient_checkpointing

    cfg = TrainConfig(task="fdp", size="xxs", steps=3, batch_size=4, warmup=1, eval_every=0, threads=1, augment=False,
                      data=[Source(path=str(small_world))])
    runs = {}
    for setting in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model_copy(update={"gradient_checkpointing": setting}), lora=False)
        assert set_gradient_checkpointing(model, "auto") is False  # auto: off for a model this small
        model = build_model(cfg.model_copy(update={"gradient_checkpointing": setting}), lora=False)
        assert bool(getattr(model.net, "is_activation_checkpointing", False)) is setting
        stream = RankStream(build_index(cfg.data), 0, 1, GRID, seed=0, window=16)
        runs[setting] = [r["loss"] for r in TrainLoop(model, cfg, batches=stream).run()]
    assert np.allclose(runs[True], runs[False], atol=1e-6)
