"""One Ray Train worker of `dynboot train` (see jobs/train.py for the stages and the design).

Per rank: build the model (+ PEFT LoRA) -> stream this rank's shard into a decoded pool -> DeepSpeed
engine around the plain loop's optimizer -> restore the latest checkpoint -> `steps` steps, each the plain
loop's step (`dynboot.trainer`) -> checkpoints from every rank -> evaluation on rank 0 -> export on rank 0.
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

import numpy as np
import torch

from dynboot.mixture import PoolBuilder, Source, gold_only, load_mixture
from dynboot.models.base import UnifiedModel
from dynboot.rundir import append_jsonl, atomic_write_text, read_jsonl, write_json
from dynboot.trainer import Batcher, build_optimizer, lr_at, make_batch

SEED_STRIDE = 1_000_003  # rank r samples with seed + r * SEED_STRIDE; rank 0 draws the plain loop's batches
PROBE = 8  # examples in the export-check batch
FAULT_DELAY_S = 6.0


# ---- model ------------------------------------------------------------------------------------------------
def world_spec(cfg):
    """The embedded world's spec when training on world data (from a data source's or eval set's world.json)."""
    from dynboot.world.generate import load_spec

    for p in [s.path for s in cfg.data] + [cfg.eval_data]:
        if p and "://" not in p:
            try:
                return load_spec(p)
            except FileNotFoundError:
                continue
    return None


def build_model(cfg, spec, lora: bool) -> UnifiedModel:
    """The model to train (in train mode); with `lora`, `model.net` is the PEFT-wrapped network."""
    if cfg.from_scratch:
        from dynboot.models.tiny import TinyWorldModel

        if spec is None:
            raise ValueError("model_path is empty (tiny model from scratch) but no data source is a `dynboot world` dir")
        model = TinyWorldModel.create(spec, cfg.size, seed=cfg.seed)
    else:
        from dynboot.models.registry import load_model

        model = load_model(cfg.model_path, backend=cfg.backend or None)
    if lora:
        from peft import LoraConfig, get_peft_model

        targets = cfg.lora.target_modules or model.lora_target_modules()
        model.net = get_peft_model(model.net, LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha,
                                                         lora_dropout=cfg.lora.dropout, target_modules=targets,
                                                         task_type="CAUSAL_LM"))
    return model.train()


def use_bf16(cfg) -> bool:
    if cfg.bf16 == "auto":
        return bool(cfg.use_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    return bool(cfg.bf16)


def ds_config(cfg, bf16: bool) -> dict:
    zero = {"stage": cfg.zero_stage}
    if cfg.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = cfg.zero3_persist_below
    return {"train_micro_batch_size_per_gpu": cfg.batch_size, "gradient_accumulation_steps": cfg.grad_accum,
            "gradient_clipping": cfg.grad_clip, "zero_optimization": zero, "bf16": {"enabled": bf16},
            "steps_per_print": 1 << 30, "wall_clock_breakdown": False}


def gathered_state_dict(module: torch.nn.Module, stage3: bool, rank: int) -> dict | None:
    """Full CPU copies of every parameter on rank 0 (None elsewhere). Under ZeRO-3 each parameter is
    gathered from all ranks first (a collective: every rank calls this), so partitioned weights and LoRA
    adapters come out with their real values, not as empty placeholders."""
    import deepspeed

    out = {} if rank == 0 else None
    for name, p in module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None) if stage3 else nullcontext():
            if out is not None:
                out[name] = p.detach().float().cpu().clone()
    return out


def load_parameters(net: torch.nn.Module, state: dict) -> None:
    names = {n for n, _ in net.named_parameters()}
    missing = names - set(state)
    if missing:
        raise RuntimeError(f"gathered state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
    net.load_state_dict(state, strict=False)


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


def probe_outputs(model: UnifiedModel, net, batch: dict) -> torch.Tensor:
    """Logits of a batch (causal-lm backends), else the loss: what the export check compares."""
    with torch.no_grad():
        if hasattr(model, "_forward"):
            return model._forward(net, batch, diff=batch.get("diff_flags")).logits.float().cpu()
        return model.loss(batch, net=net).float().cpu().reshape(1)


# ---- data -------------------------------------------------------------------------------------------------
def read_shard(cfg, rank: int):
    """This rank's rows, streamed once from its Ray Data shard into a decoded pool."""
    import ray.train

    builder = PoolBuilder(cfg.data, cfg.task)
    for table in ray.train.get_dataset_shard("train").iter_batches(batch_size=256, batch_format="pyarrow"):
        builder.add_table(table)
    pool = builder.finish()
    quarantine = Path(cfg.out) / "quarantine" / f"train_rank{rank}.jsonl"
    if pool.malformed or quarantine.exists():
        atomic_write_text(quarantine, "".join(json.dumps(m) + "\n" for m in pool.malformed))
    return pool


# ---- evaluation (rank 0) --------------------------------------------------------------------------------------
class Evaluator:
    def __init__(self, cfg, spec):
        self.cfg, self.spec = cfg, spec
        pool = load_mixture([Source(path=cfg.eval_data)], cfg.task)
        self.examples = pool.examples[: cfg.eval_limit]

    def __call__(self, model: UnifiedModel) -> dict:
        cfg, ex = self.cfg, self.examples
        model.eval()
        losses, sizes = [], []
        with torch.no_grad():
            for i in range(0, len(ex), cfg.batch_size):
                chunk = ex[i: i + cfg.batch_size]
                losses.append(float(model.loss(make_batch(model, chunk, cfg.task, cfg))))
                sizes.append(len(chunk))
        out = {"eval_loss": round(float(np.average(losses, weights=sizes)), 5)}
        if cfg.eval_generate and self.spec is not None and getattr(model, "backend", "") == "tiny":
            out |= self._world_exact(model)
        model.train()
        return out

    def _world_exact(self, model) -> dict:
        from dynboot.metrics import fdp_world_metrics, idp_world_metrics

        before = np.stack([e.before for e in self.examples])
        after = np.stack([e.after for e in self.examples])
        actions = [e.action for e in self.examples]
        bs = self.cfg.batch_size
        if self.cfg.task == "idp":
            caps = [c for i in range(0, len(actions), bs) for c in model.caption(before[i: i + bs], after[i: i + bs])]
            return {"eval_exact": round(idp_world_metrics(self.spec, caps, actions)["exact"], 4)}
        pred = torch.cat([model.sample(before[i: i + bs], actions[i: i + bs], n=1, temperature=0)[:, 0]
                          for i in range(0, len(actions), bs)])
        tok = model.tokenizer
        m = fdp_world_metrics(pred.numpy(), tok.encode(before).numpy(), tok.encode(after).numpy())
        return {"eval_exact": round(m["exact"], 4), "eval_changed_cell_acc": round(m["changed_cell_acc"], 4)}


# ---- checkpoints ------------------------------------------------------------------------------------------------
def save_checkpoint(engine, batcher: Batcher, step: int, rank: int, metrics: dict) -> None:
    """Every rank saves its DeepSpeed shard and sampler state, then every rank reports (Ray merges them)."""
    import ray.train

    with tempfile.TemporaryDirectory(prefix="dynboot-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag="ds", client_state={"step": step})
        torch.save({"numpy": batcher.rng.bit_generator.state, "torch": torch.get_rng_state()},
                   Path(tmp) / f"rng_rank{rank}.pt")
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"step_{step:06d}")


def restore_checkpoint(engine, batcher: Batcher, rank: int) -> int:
    """The step to start from: 0, or the latest checkpoint's (engine, optimizer and sampler restored)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        _, client = engine.load_checkpoint(d, tag="ds")
        rng = Path(d) / f"rng_rank{rank}.pt"
        if rng.exists():  # absent when the worker count changed: the sampler then restarts from its seed
            state = torch.load(rng, weights_only=False)
            batcher.rng.bit_generator.state = state["numpy"]
            torch.set_rng_state(state["torch"])
    return int(client["step"])


def train_step(engine, model: UnifiedModel, batcher: Batcher, cfg) -> tuple[float, int]:
    """One optimizer step = `grad_accum` micro-steps of the plain loop's step through the engine (which
    scales the loss by 1/grad_accum, all-reduces or reduce-scatters gradients, clips and steps at the
    boundary). Returns the mean micro-batch loss and the tokens seen."""
    loss_sum, tokens = 0.0, 0
    for _ in range(cfg.grad_accum):
        batch = make_batch(model, batcher.next(), cfg.task, cfg)
        loss = model.loss(batch, net=engine)
        engine.backward(loss)
        engine.step()
        loss_sum += float(loss.detach())
        tokens += int(batch["attention_mask"].sum())
    return loss_sum / cfg.grad_accum, tokens


# ---- the loop -----------------------------------------------------------------------------------------------------
def train_loop(config: dict) -> None:
    import deepspeed
    import ray.train
    import torch.distributed as dist

    from jobs.train import TrainConfig

    cfg = TrainConfig.model_validate(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    out, lora, bf16, stage3 = Path(cfg.out), cfg.use_lora, use_bf16(cfg), cfg.zero_stage == 3

    spec = world_spec(cfg)
    model = build_model(cfg, spec, lora)
    device = ray.train.torch.get_device()
    model.to(device)
    pool = read_shard(cfg, rank)
    augment = None
    if cfg.augment and spec is not None and model.backend == "tiny":
        from dynboot.world.augment import world_augmenter

        augment = gold_only(world_augmenter(spec))
    batcher = Batcher(pool.examples, cfg.batch_size, cfg.seed + SEED_STRIDE * rank, augment, pool.sampling_weights(cfg.data))

    engine, *_ = deepspeed.initialize(model=model.net, optimizer=build_optimizer(model.net.parameters(), cfg),
                                      config=ds_config(cfg, bf16))
    start = restore_checkpoint(engine, batcher, rank)
    evaluator = Evaluator(cfg, spec) if (rank == 0 and cfg.eval_data) else None
    eval_model = None
    if rank == 0:
        append_jsonl(out / "attempts.jsonl", {"start_step": start, "time": time.time()})
        kept = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("step", 0) <= start]
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in kept))

    model.train()
    t_train, cpu_train, t_start = 0.0, 0.0, time.time()
    totals = torch.zeros(2, dtype=torch.float64)  # tokens, samples (all ranks)
    samples_per_step = cfg.batch_size * cfg.grad_accum
    for s in range(start, cfg.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        lr = lr_at(s, cfg)
        for g in engine.optimizer.param_groups:
            g["lr"] = lr
        loss, tokens = train_step(engine, model, batcher, cfg)
        stats = torch.tensor([loss, tokens, samples_per_step], dtype=torch.float64)
        if world > 1:  # NCCL reduces device tensors only
            stats = stats.to(device)
            dist.all_reduce(stats)
            stats = stats.cpu()
        t_train += time.perf_counter() - t0
        cpu_train += time.process_time() - c0
        totals += stats[1:]
        step = s + 1
        rec = {"step": step, "loss": round(stats[0].item() / world, 6), "lr": lr, "tokens": int(stats[1]),
               "samples_per_s": round(float(totals[1]) / t_train, 2), "tokens_per_s": round(float(totals[0]) / t_train, 1),
               "train_s": round(t_train, 3), "cpu_s": round(cpu_train, 3)}
        last = step == cfg.steps
        if cfg.eval_data and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
            if stage3:  # partitioned weights: gather a full copy into a separate model on rank 0
                state = gathered_state_dict(engine.module, True, rank)
                if rank == 0:
                    eval_model = eval_model or build_model(cfg, spec, lora)
                    load_parameters(eval_model.net, state)
            if rank == 0:
                rec |= evaluator(eval_model if stage3 else model)
        if rank == 0:
            append_jsonl(out / "metrics.jsonl", rec | {"time_s": round(time.time() - t_start, 3)})
        if (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or last:
            save_checkpoint(engine, batcher, step, rank, {k: v for k, v in rec.items() if isinstance(v, (int, float))})
        if cfg.fault_step == step and rank == cfg.fault_rank and not (out / ".fault_injected").exists():
            (out / ".fault_injected").touch()
            # Ray Train's controller collects reports by polling workers (every 2 s): a report still queued
            # in a worker that dies is lost, so the injected crash waits until the last one was collected
            time.sleep(FAULT_DELAY_S)
            os._exit(1)  # a hard crash, as a killed or OOM worker: the group restarts from the checkpoint
    if start >= cfg.steps and rank == 0:
        print(f"run already complete at step {start}: exporting only")

    # export: gather (all ranks) -> probe with the engine (all ranks) -> write + check (rank 0)
    state = gathered_state_dict(engine.module, stage3, rank)
    probe = make_batch(model, pool.examples[:PROBE], cfg.task, cfg)
    engine.eval()
    ref = probe_outputs(model, engine, probe)
    export = export_model(cfg, spec, lora, state, model, probe, ref) if rank == 0 else {}
    peak = {"rank": rank, "examples": len(pool.examples), "malformed": len(pool.malformed), "train_s": round(t_train, 3),
            "cpu_s": round(cpu_train, 3), "samples": int(totals[1]) // world,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else 0.0,
            **model_state_mb(engine, stage3)}
    ranks = [None] * world
    if world > 1:
        dist.all_gather_object(ranks, peak)
    else:
        ranks = [peak]
    if rank == 0:
        write_json(out / "workers.json", {"ranks": ranks, "bf16": bf16, "start_step": start, "export": export,
                                          "attempt_starts": [a["start_step"] for a in read_jsonl(out / "attempts.jsonl")]})


# ---- export (rank 0) --------------------------------------------------------------------------------------------------
def export_model(cfg, spec, lora: bool, state: dict, trained: UnifiedModel, probe: dict, ref: torch.Tensor) -> dict:
    """Write out/model (merged, loadable) [+ out/adapter, + out/base for a scratch base] and check them."""
    from safetensors.torch import load_file

    from dynboot.models.registry import load_model

    out = Path(cfg.out)
    fresh = build_model(cfg, spec, lora)
    load_parameters(fresh.net, state)
    info: dict = {"model": str(out / "model")}
    if lora:
        if cfg.from_scratch:  # the adapter needs its base: the same seeded initialisation, saved once
            base_dir = build_model(cfg, spec, False).save(out / "base")
            fresh.net.peft_config["default"].base_model_name_or_path = str(base_dir)
        fresh.net.save_pretrained(out / "adapter")
        adapter = load_file(out / "adapter" / "adapter_model.safetensors")
        trainable = {n for n, p in trained.net.named_parameters() if p.requires_grad}
        info |= {"adapter": str(out / "adapter"), "adapter_tensors": len(adapter),
                 "adapter_params": int(sum(t.numel() for t in adapter.values())),
                 "trainable_params": int(sum(state[n].numel() for n in trainable))}
        if not adapter or info["adapter_params"] != info["trainable_params"]:
            raise RuntimeError(f"exported adapter holds {info['adapter_params']} values for {info['trainable_params']} "
                               "trainable parameters (the empty-adapter failure of PEFT + ZeRO-3)")
        fresh.net = fresh.net.merge_and_unload()
    fresh.save(out / "model")
    reloaded = load_model(out / "model")
    diff = (probe_outputs(reloaded, reloaded.net, probe) - ref).abs().max().item()
    info["max_abs_logit_diff"] = diff
    torch.save({"batch": probe, "engine_outputs": ref}, out / "export_probe.pt")
    return info
