"""One Ray Train worker of `dynboot train` (see jobs/train.py for the stages and the design).

Per rank: build the model (in its training dtype, on its device; gradient checkpointing; PEFT LoRA) -> DeepSpeed
engine around the core's optimizer -> restore the latest checkpoint (verified first: dynboot.io.checkpoint_manifest)
-> the rank's stream of the mixture from its recorded position (dynboot.data.ingest) -> `steps` steps of the training
core (dynboot.training.trainer), rank 0 logging -> checkpoints from every rank -> evaluation -> export (jobs/train_export.py).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dynboot.io import storage
from dynboot.io.checkpoint_manifest import verify_checkpoint, write_manifest
from dynboot.data.data_index import build_index, load_index
from dynboot.data.ingest import RankStream, read_examples
from dynboot.data.mixture import Source, gold_only
from dynboot.models.base import UnifiedModel
from dynboot.io.rundir import RunDir, quarantine_row, read_jsonl, write_json
from dynboot.training.trainer import TrainCore, build_optimizer
from jobs.train_config import TrainConfig
from jobs.train_model import build_model, train_dtype, world_of

__all__ = ["train_loop", "plain_reference"]

FAULT_DELAY_S = 6.0


def use_bf16(cfg: TrainConfig) -> bool:
    if cfg.bf16 == "auto":
        return bool(cfg.use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(cfg.bf16)


def ds_config(cfg: TrainConfig, bf16: bool) -> dict:
    zero = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.zero3_persist_below
    return {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.grad_clip, "zero_optimization": zero, "bf16": {"enabled": bf16},
            "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


class EngineStepper:
    """The core's stepper for a DeepSpeed engine (it scales by 1/grad_accum, reduces, clips, steps at the boundary)."""

    def __init__(self, engine):
        self.net = engine

    def set_lr(self, lr: float) -> None:
        for g in self.net.optimizer.param_groups:
            g["lr"] = lr

    def backward(self, loss: torch.Tensor) -> None:
        self.net.backward(loss)

    def step(self) -> None:
        self.net.step()


def model_state_mb(engine, stage3: bool) -> dict:
    """MiB of model state this rank holds: parameters (its partition under ZeRO-3), fp32 master copies
    (ZeRO), optimizer moments (its partition under ZeRO-1/2/3). What ZeRO divides by the rank count."""
    def mb(tensors) -> float:
        return round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 3)

    params = [getattr(p, "ds_tensor", p) if stage3 else p for p in engine.module.parameters()]
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    moments = [t for st in inner.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0]
    master = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_partitioned_groups_flat", None) or []
    return {"params_mb": mb(params), "master_mb": mb(master), "optimizer_mb": mb(moments)}


def plain_reference(cfg: TrainConfig) -> list[dict]:
    """The plain single-process loop (torch AdamW, the stream read in this process) on exactly what the job's rank 0
    of a 1-worker run trains on: same model build and seed, same plan, same augmentation draws. The recipe tests and
    the benchmark compare the job with it."""
    from dynboot.data.data_index import build_index
    from dynboot.training.trainer import TrainLoop

    cfg = cfg.resolved()
    torch.manual_seed(cfg.seed)  # as the worker does before building the model (LoRA init, then dropout)
    model = build_model(cfg, cfg.use_lora)
    stream = RankStream(build_index(cfg.data), 0, 1, model.tokenizer.policy, cfg.seed, cfg.shuffle_window,
                        cache_mb=cfg.decode_cache_mb)
    augment = None
    if cfg.augment and world_of(model) is not None:
        from dynboot.world.augment import world_augmenter

        augment = gold_only(world_augmenter(world_of(model)))
    return TrainLoop(model, cfg, augment=augment, batches=stream).run()


# ---- evaluation ----------------------------------------------------------------------------------------------
class Evaluator:
    """Held-out loss (+ the world's exact metrics). Under ZeRO-3 every rank runs it on the same examples (the
    partitioned model gathers its layers in each forward, so no rank builds a copy of the model)."""

    def __init__(self, cfg: TrainConfig, model: UnifiedModel):
        self.cfg, self.world = cfg, world_of(model)
        index = build_index([Source(path=cfg.eval_data)], allow_test=True)
        self.examples, _ = read_examples(index, model.tokenizer.policy, cfg.eval_limit)

    def __call__(self, model: UnifiedModel) -> dict:
        from dynboot.training.trainer import make_batch

        cfg, ex = self.cfg, self.examples
        losses, sizes = [], []
        with torch.no_grad():
            for i in range(0, len(ex), cfg.batch_size):
                chunk = ex[i: i + cfg.batch_size]
                losses.append(float(model.loss(make_batch(model, chunk, cfg.task, cfg))))
                sizes.append(len(chunk))
        out = {"eval_loss": round(float(np.average(losses, weights=sizes)), 5)} if ex else {}
        if ex and cfg.eval_generate and self.world is not None:
            from dynboot.eval.world_eval import fdp_eval, idp_eval

            if cfg.task == "idp":
                out["eval_exact"] = round(idp_eval(model, ex, self.world)["exact"], 4)
            else:
                m = fdp_eval(model, ex, self.world)
                out |= {"eval_exact": round(m["exact"], 4), "eval_changed_cell_acc": round(m["changed_cell_acc"], 4)}
        return out


# ---- checkpoints ------------------------------------------------------------------------------------------------
def save_checkpoint(engine, core: TrainCore, stream: RankStream, step: int, rank: int, run_id: str, lora: bool,
                    metrics: dict) -> None:
    """Every rank saves its DeepSpeed shard (trainable parameters only for LoRA), its data position and RNG
    states (JSON + safetensors: nothing pickled), and a manifest of what it wrote; then every rank reports."""
    import ray.train
    from safetensors.torch import save_file

    with tempfile.TemporaryDirectory(prefix="dynboot-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag="ds", client_state={"step": step}, exclude_frozen_parameters=lora)
        state = {"step": step, "data": stream.state(), "augment_rng": core.rng.bit_generator.state}
        Path(tmp, f"trainer_rank{rank}.json").write_text(json.dumps(state))
        rngs = {"torch": torch.get_rng_state()} | ({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})
        save_file(rngs, str(Path(tmp, f"rng_rank{rank}.safetensors")))
        write_manifest(tmp, run_id, f"rank{rank}")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=f"step_{step:06d}")


def checkpoint_state(directory: Path | None, rank: int, run_id: str) -> tuple[int, dict | None]:
    """(step, this rank's trainer state) of a checkpoint directory, verified against this run's manifests first
    (nothing in it is unpickled before that); (0, None) without a checkpoint. The state is None when this rank
    wrote none (the worker count changed)."""
    if directory is None:
        return 0, None
    verify_checkpoint(directory, run_id)
    mine = Path(directory) / f"trainer_rank{rank}.json"
    any_rank = sorted(Path(directory).glob("trainer_rank*.json"))
    if not any_rank:
        raise RuntimeError(f"checkpoint {directory} holds no trainer state: not a checkpoint of this job")
    state = json.loads(mine.read_text()) if mine.is_file() else None
    return int((state or json.loads(any_rank[0].read_text()))["step"]), state


def load_engine_state(engine, directory: Path, rank: int, lora: bool) -> None:
    """The DeepSpeed shard (LoRA: its trainable parameters) and this rank's RNG states, from a verified checkpoint."""
    from safetensors.torch import load_file

    engine.load_checkpoint(str(directory), tag="ds", load_module_strict=not lora)
    rng = Path(directory) / f"rng_rank{rank}.safetensors"
    if rng.is_file():
        rngs = load_file(str(rng))
        torch.set_rng_state(rngs["torch"])
        if "cuda" in rngs and torch.cuda.is_available():
            torch.cuda.set_rng_state(rngs["cuda"])


# ---- the loop -----------------------------------------------------------------------------------------------------
def train_loop(config: dict[str, Any]) -> None:
    """One rank's run. `config` is Ray Train's train_loop_config as jobs/train.py built it: {cfg, run_id, index_dir}."""
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from jobs.train_export import export_model

    # Ray Train hands every worker (and every restarted one) the dict the driver gave TorchTrainer, and the driver
    # puts the config there as plain JSON (model_dump(mode="json")). Validated into a TrainConfig once, here, every
    # function below gets a typed config, and a field this worker's code does not accept fails now, named, rather
    # than mid-run; a TrainConfig passed as it is comes back unchanged (pydantic does not revalidate instances).
    cfg = TrainConfig.model_validate(config["cfg"])
    run_id, index_dir = config["run_id"], config["index_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    lora, bf16, stage3 = cfg.use_lora, use_bf16(cfg), cfg.zero_stage == 3
    run = RunDir(cfg.out)
    device = ray.train.torch.get_device()

    model = build_model(cfg, lora, str(device), train_dtype(bf16))
    ckpt = ray.train.get_checkpoint()
    with ckpt.as_directory() if ckpt is not None else nullcontext(None) as ckpt_dir:
        start, state = checkpoint_state(ckpt_dir, rank, run_id)
        window = cfg.shuffle_window
        samples_per_step = cfg.batch_size * cfg.grad_accum
        position = ((state["data"]["window"], state["data"]["pos"]) if state else
                    (start * samples_per_step // window, 0))  # no state (the worker count changed): the nearest window
        stream = RankStream(load_index(index_dir), rank, world, model.tokenizer.policy, cfg.seed, window, start=position,
                            reader="ray", rows_hint=(cfg.steps - start) * samples_per_step,
                            ingest_cpus=cfg.ingest_cpus, ingest_tasks=cfg.ingest_tasks,
                            cache_mb=cfg.decode_cache_mb)
        stream.start()  # the ingest's start-up overlaps DeepSpeed's set-up and the checkpoint load
        engine, *_ = deepspeed.initialize(model=model.net, optimizer=build_optimizer(model.net.parameters(), cfg),
                                          config=ds_config(cfg, bf16))
        if ckpt_dir is not None:
            load_engine_state(engine, ckpt_dir, rank, lora)
    world_spec_ = world_of(model)
    augment = None
    if cfg.augment and world_spec_ is not None:
        from dynboot.world.augment import world_augmenter

        augment = gold_only(world_augmenter(world_spec_))

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        if world == 1:
            return t
        t = t.to(device)  # NCCL reduces device tensors only
        dist.all_reduce(t)
        return t.cpu()

    core = TrainCore(model, cfg, stream, EngineStepper(engine), augment, rank, world, all_reduce)
    if state:
        core.rng.bit_generator.state = state["augment_rng"]
    evaluator = Evaluator(cfg, model) if cfg.eval_data and (rank == 0 or stage3) else None
    if rank == 0:
        attempts = read_jsonl(run.uri("attempts.jsonl")) + [{"start_step": start, "time": time.time()}]
        storage.write_text(run.uri("attempts.jsonl"), "".join(json.dumps(a) + "\n" for a in attempts))
        kept = [r for r in read_jsonl(run.uri("metrics.jsonl")) if r.get("step", 0) <= start]
        storage.write_text(run.uri("metrics.jsonl"), "".join(json.dumps(r) + "\n" for r in kept))

    def on_eval(step: int) -> dict:
        return evaluator(model) if evaluator else {}

    def after_step(step: int, rec: dict) -> None:
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps:
            run.flush()  # metrics up to a checkpoint survive a crash (object storage buffers them)
            save_checkpoint(engine, core, stream, step, rank, run_id, lora,
                            {k: v for k, v in rec.items() if isinstance(v, (int, float))})
        if cfg.fault_step == step and rank == cfg.fault_rank and not storage.exists(run.uri(".fault_injected")):
            storage.write_text(run.uri(".fault_injected"), "")
            # Ray Train's controller collects reports by polling workers (every 2 s): a report still queued
            # in a worker that dies is lost, so the injected crash waits until the last one was collected
            time.sleep(FAULT_DELAY_S)
            os._exit(1)  # a hard crash, as a killed or OOM worker: the group restarts from the checkpoint

    core.run(start, on_eval=on_eval if evaluator else None, log=run.log if rank == 0 else None, after_step=after_step)
    run.flush()
    if start >= cfg.steps and rank == 0:
        print(f"run already complete at step {start}: exporting only")

    probe = stream.next(cfg.batch_size)  # the export check's batch: the next rows of the rank's stream
    stream.close()
    export = export_model(cfg, model, engine, probe, rank, device, train_dtype(bf16), lora)
    if stream.malformed:
        storage.write_text(run.uri("quarantine", f"train_rank{rank}.jsonl"), "".join(
            json.dumps(quarantine_row(pair_id, "train", "malformed_row", error=why)) + "\n" for pair_id, why in stream.malformed.items()))
    peak = {"rank": rank, "malformed": sorted(stream.malformed), "skipped_rows": stream.skipped,
            "train_s": round(core.t_train, 3), "cpu_s": round(core.cpu_train, 3), "samples": core.samples // world,
            "data_wait_s": round(stream.wait_s, 3), "position": stream.state(),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else 0.0,
            **model_state_mb(engine, stage3)}
    ranks = [None] * world
    if world > 1:
        dist.all_gather_object(ranks, peak)
    else:
        ranks = [peak]
    if rank == 0:
        write_json(run.uri("workers.json"), {"ranks": ranks, "bf16": bf16, "start_step": start, "export": export,
                                             "attempt_starts": [a["start_step"] for a in read_jsonl(run.uri("attempts.jsonl"))]})
