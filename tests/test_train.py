"""Training: the data mixture, the config, and the Ray Train + DeepSpeed job on a local Ray cluster.

    python -m pytest -q tests/test_train.py                  # ~6 min on 2 cores (4 Ray Train runs, 1 restart)
    python -m pytest -q tests/test_train.py -m "not slow"    # mixture + config only, seconds

The first DeepSpeed use on a machine JIT-builds its shm comm op (~1 min, cached in ~/.cache/torch_extensions).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from dynboot.config import ConfigError, load_config
from dynboot.mixture import Source, gold_only, load_mixture, source_table
from dynboot.pairs import to_table
from dynboot.rundir import read_jsonl
from dynboot.trainer import Batcher
from jobs.train import TrainConfig, unknown_tags


# ---- fixtures --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pseudo_shards(small_world, tmp_path_factory) -> Path:
    """20 pseudo rows (from the test split) in one Parquet shard; row 3's `before` is not a PNG."""
    rows = source_table(Source(path=str(small_world / "test"))).slice(0, 20).to_pylist()
    for r in rows:
        r["source"], r["id"], r["model_id"] = "pseudo", "ep9:" + r["id"], "tiny:idp"
    rows[3]["before"] = b"this is not a png"
    out = tmp_path_factory.mktemp("shards")
    pq.write_table(to_table(rows), out / "ep9.parquet")
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
def ray_cluster():
    import ray

    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def quick(**kw) -> TrainConfig:
    """A few tiny steps: 2 workers x 1 thread, no periodic evaluation."""
    base = dict(size="xxs", steps=8, batch_size=8, warmup=1, num_workers=2, threads=1, eval_every=0, eval_limit=16,
                checkpoint_every=0, max_failures=1)
    return TrainConfig(**(base | kw))


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


def check_export(out: Path) -> None:
    """The exported dir loads with `load_model` and with `from_pretrained(local_files_only=True)`, and gives the
    trained engine's logits on the probe batch the job recorded."""
    from dynboot.models.registry import load_model
    from dynboot.models.world_lm import WorldLM

    probe = torch.load(out / "export_probe.pt", weights_only=False)
    b = probe["batch"]
    net = WorldLM.from_pretrained(out / "model", local_files_only=True).eval()
    with torch.no_grad():
        logits = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                     cell_ids=b["cell_in"], diff_flags=b["diff_flags"], before_codes=b.get("before_codes")).logits
    assert logits.shape == probe["engine_outputs"].shape
    assert (logits - probe["engine_outputs"]).abs().max().item() < 1e-4
    assert load_model(out / "model").backend == "tiny"


# ---- the mixture (no Ray) --------------------------------------------------------------------------------------
def test_mixture_counts_malformed_rows_and_weights_sources(small_world, pseudo_shards, tmp_path):
    # a gold set whose second record's image file is missing
    records = json.loads((small_world / "gold" / "train.json").read_text())[:5]
    gold = tmp_path / "gold"
    shutil.copytree(small_world / "gold" / "images", gold / "images")
    records[1]["output"] = "images/missing.png"
    (gold / "train.json").write_text(json.dumps(records))
    sources = [Source(path=str(gold), weight=1), Source(path=str(pseudo_shards), weight=3)]

    pool = load_mixture(sources, "idp")
    assert pool.counts(2) == [4, 19]
    reasons = {m["id"]: m["error"] for m in pool.malformed}
    assert "missing.png" in reasons["gold:1:1"] and "not a decodable image" in reasons["ep9:test:3:3"]

    # weights are ratios: a quarter of the draws from gold (4 rows), three quarters from pseudo (19 rows)
    batcher = Batcher(pool.examples, 50, seed=0, weights=pool.sampling_weights(sources))
    drawn = [e.meta["src"] for _ in range(80) for e in batcher.next()]
    assert abs(np.mean(drawn) - 0.75) < 0.03
    assert load_mixture(sources[:1], "idp").sampling_weights(sources[:1]) is None  # one source: plain sampling


def test_mixture_tags_fdp_prompts_and_augments_gold_only(small_world, pseudo_shards):
    sources = [Source(path=str(small_world)), Source(path=str(pseudo_shards), tag="pseudo")]
    pool = load_mixture(sources, "fdp")
    tagged = [e for e in pool.examples if e.meta["src"] == 1]
    assert tagged and all(e.action.startswith("pseudo ") for e in tagged)
    assert not any(e.action.startswith("pseudo ") for e in pool.examples if e.meta["src"] == 0)
    with pytest.raises(ValueError, match="FDP prompt"):
        load_mixture(sources, "idp")

    seen = []
    aug = gold_only(lambda ex, rng: seen.extend(ex) or [e.__class__(e.before, e.after, "augmented", e.meta) for e in ex])
    mixed = [pool.examples[0], tagged[0]]
    out = aug(mixed, np.random.default_rng(0))
    assert [e.action for e in out] == ["augmented", tagged[0].action] and seen == [pool.examples[0]]


def test_train_config_parses_sources_and_rejects_bad_values():
    cfg = load_config(TrainConfig, ["data=[a, {path: b, weight: 2, tag: pseudo}]", "task=fdp", "lora.rank=8"])
    assert [(s.path, s.weight, s.tag) for s in cfg.data] == [("a", 1.0, ""), ("b", 2.0, "pseudo")]
    assert load_config(TrainConfig, ["data=runs/x"]).data[0].path == "runs/x"
    assert not TrainConfig().use_lora and TrainConfig(model_path="ckpt").use_lora  # auto: LoRA on checkpoints
    with pytest.raises(ConfigError, match="tag"):
        load_config(TrainConfig, ["data=[{path: b, tag: pseudo}]", "task=idp"])
    with pytest.raises(ConfigError, match="zero_stage"):
        load_config(TrainConfig, ["zero_stage=4"])
    with pytest.raises(ConfigError, match="weight"):
        load_config(TrainConfig, ["data=[{path: b, weight: 0}]"])
    # the tiny word-level tokenizer knows action words only: any other tag would be <unk>
    assert unknown_tags(TrainConfig(task="fdp", data=[{"path": "b", "tag": "pseudo"}])) == ["pseudo"]
    assert unknown_tags(TrainConfig(task="fdp", data=[{"path": "b", "tag": "red"}])) == []


def test_missing_source_fails_before_any_cluster_work(tmp_path):
    from jobs.train import InputError, run

    with pytest.raises(InputError, match="does not exist"):
        run(TrainConfig(data=[str(tmp_path / "nowhere")], eval_data="", out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_cli_help_lists_train_fields():
    res = subprocess.run([sys.executable, "-m", "dynboot.cli", "train", "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "zero_stage" in res.stdout and "lora.rank" in res.stdout and "cpus_per_worker" in res.stdout


# ---- the Ray Train + DeepSpeed job ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_one_worker_zero2_lora_matches_the_plain_loop(ray_cluster, small_world, base_model, tmp_path):
    """Same base, LoRA init, data, seed, batches and dropout draws: the Ray job's per-step losses (1 worker,
    ZeRO-2, LoRA) are the plain TrainLoop's, recipe-test style."""
    from dynboot.trainer import TrainLoop
    from dynboot.world.augment import world_augmenter
    from jobs.train import run
    from jobs.train_worker import build_model, world_spec

    cfg = quick(task="idp", model_path=str(base_model), data=[Source(path=str(small_world))], eval_data="",
                num_workers=1, zero_stage=2, out=str(tmp_path / "ray"), steps=6)
    summary = run(cfg)
    assert summary["lora"] and summary["zero_stage"] == 2
    torch.manual_seed(cfg.seed)  # as the worker does before building the model (LoRA init, then dropout)
    spec = world_spec(cfg)
    model = build_model(cfg, spec, lora=True)
    pool = load_mixture(cfg.data, cfg.task)
    plain = TrainLoop(model, cfg, pool.examples, augment=gold_only(world_augmenter(spec)),
                      mixture_weights=pool.sampling_weights(cfg.data)).run()
    ray_losses = losses(tmp_path / "ray")
    assert len(ray_losses) == len(plain) == 6
    assert np.max(np.abs(np.array(ray_losses) - [r["loss"] for r in plain])) < 1e-4
    assert ray_losses[-1] < ray_losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["idp", "fdp"])
def test_zero3_lora_exports_real_adapter_and_skips_malformed_rows(task, ray_cluster, small_world, pseudo_shards, base_model, tmp_path):
    from safetensors.torch import load_file

    from jobs.train import run

    out = tmp_path / task
    summary = run(quick(task=task, model_path=str(base_model), zero_stage=3, out=str(out),
                        data=[Source(path=str(small_world)), Source(path=str(pseudo_shards), weight=0.5)],
                        eval_data=str(small_world / "test")))
    assert summary["lora"] and summary["zero_stage"] == 3
    assert summary["malformed_rows"] == 1 and summary["examples"] == 200 + 19
    quarantined = [json.loads(line) for f in sorted((out / "quarantine").glob("*.jsonl")) for line in f.read_text().splitlines()]
    assert [q["id"] for q in quarantined] == ["ep9:test:3:3"]
    loss = losses(out)
    assert len(loss) == 8 and np.mean(loss[-2:]) < np.mean(loss[:2])
    assert "eval_loss" in summary["eval"] and "eval_exact" in summary["eval"]
    assert (out / "loss_curve.png").stat().st_size > 0

    check_export(out)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all(t.numel() > 0 for t in adapter.values())  # not the empty ZeRO-3 adapter
    assert all(t.abs().max() > 0 for k, t in adapter.items() if "lora_B" in k)  # B starts at 0: trained values
    assert summary["export"]["adapter_params"] == summary["export"]["trainable_params"] > 0

    # base + adapter (as PEFT loads them) gives the trained engine's logits too
    from peft import PeftModel

    from dynboot.models.world_lm import WorldLM

    probe = torch.load(out / "export_probe.pt", weights_only=False)
    b = probe["batch"]
    net = PeftModel.from_pretrained(WorldLM.from_pretrained(base_model, local_files_only=True), out / "adapter").eval()
    with torch.no_grad():
        logits = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                     cell_ids=b["cell_in"], diff_flags=b["diff_flags"], before_codes=b.get("before_codes")).logits
    assert (logits - probe["engine_outputs"]).abs().max().item() < 1e-4


@pytest.mark.slow
def test_zero2_lora_fdp_resumes_after_a_worker_dies(ray_cluster, small_world, base_model, tmp_path):
    from jobs.train import run

    out = tmp_path / "fdp"
    summary = run(quick(task="fdp", model_path=str(base_model), zero_stage=2, out=str(out), checkpoint_every=2,
                        fault_step=3, fault_rank=1, data=[Source(path=str(small_world))],
                        eval_data=str(small_world / "test"), eval_every=4))
    assert (out / ".fault_injected").exists()
    assert summary["attempts"] == [0, 2]  # the second worker group started from the step-2 checkpoint
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl")]
    assert steps == list(range(1, 9))  # the steps redone after the crash replace the lost ones
    loss = losses(out)
    assert np.mean(loss[-2:]) < np.mean(loss[:2])
    assert "eval_changed_cell_acc" in summary["eval"]
    check_export(out)
