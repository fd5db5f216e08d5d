"""Export of a finished `dynboot train` run (all ranks call `export_model`; rank 0 writes), sized to what was trained.

    <out>/adapter/   LoRA runs: the PEFT adapter (trainable parameters only; `adapter_config.json` names the base)
    <out>/model/     what `load_model` loads: full training -> the trained model; LoRA -> a checkpoint holding the
                     adapter and naming its base (`model_path`), or, with `export_merged=true` (or a backend that
                     cannot save adapter-only checkpoints), the base with the adapter merged, in the training dtype

No extra copy of the weights is made on rank 0: the adapter is written from the trained module (under ZeRO-3 only
the trainable parameters are gathered); a merged export merges the LoRA layers into the trained module in place
(training is over) and saves it, its parameters gathered layer group by layer group under ZeRO-3 (`GatheredParameters`
over the module, every rank taking part). The export is written to a temporary directory, checked, then published:
locally renamed into place (a reader never sees a half-written `model/`), on object storage uploaded from the local
copy (`dynboot.io.storage.copy_dir`). The check reloads `model/` with `load_model` on the training device in the
training dtype and compares its loss on a probe batch with the trained engine's (summary.json: export.check).
"""

from __future__ import annotations

import inspect
import io
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from dynboot.io import storage
from dynboot.models.base import UnifiedModel
from dynboot.training.trainer import make_batch
from jobs.train_config import TrainConfig

TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # |loss(export) - loss(engine)| / max(1, loss)


def _gathered(params, stage3: bool):
    """All ranks: ZeRO-3 partitions gathered whole for the duration (read-only), else nothing to do."""
    if not stage3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def _publish(tmp: Path, name: str, out: str) -> str:
    """`tmp/name` -> `out/name`: a local rename (the old one set aside first, then removed), or an upload."""
    dst = storage.join(out, name)
    if storage.is_uri(out) and not out.startswith("file://"):
        storage.delete_dir(dst)
        storage.copy_dir(str(tmp / name), dst)
        return dst
    dst_path = Path(storage.resolve(dst)[1])
    old = dst_path.with_name(f".{name}.old-{os.getpid()}-{int(time.time())}")
    if dst_path.exists():
        dst_path.rename(old)
    (tmp / name).rename(dst_path)
    shutil.rmtree(old, ignore_errors=True)
    return str(dst_path)


def _staging(out: str) -> Path:
    """A local directory to write the export in: beside `out` (the same filesystem: renames are atomic), or a temp
    directory when `out` is on object storage."""
    if storage.is_uri(out) and not out.startswith("file://"):
        return Path(tempfile.mkdtemp(prefix="dynboot-export-"))
    root = Path(storage.resolve(out)[1])
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=".export-", dir=root))


def _probe_loss(model: UnifiedModel, net, batch: dict) -> float:
    with torch.no_grad():
        return float(model.loss(batch, net=net))


def export_model(cfg: TrainConfig, model: UnifiedModel, engine, probe_examples: list, rank: int, device,
                 dtype: torch.dtype, lora: bool) -> dict:
    """Write and check the export (module doc); returns what summary.json records (rank 0; {} elsewhere)."""
    import torch.distributed as dist

    from dynboot.models.registry import load_model

    stage3 = cfg.zero_stage == 3
    probe = make_batch(model, probe_examples, cfg.task, cfg)
    engine.eval()
    ref = _probe_loss(model, engine, probe)  # every rank: a ZeRO-3 forward is a collective
    tmp = _staging(cfg.out) if rank == 0 else None
    info: dict = {}
    base = storage.absolute(cfg.model_path) if not cfg.from_scratch else ""
    adapter_only = lora and not cfg.export_merged and "include_base" in inspect.signature(model.save).parameters \
        and bool(base) and not storage.is_uri(base)
    try:
        if lora:
            trainable = [p for p in model.net.parameters() if p.requires_grad]
            with _gathered(trainable, stage3):
                if rank == 0:
                    if cfg.from_scratch:  # the adapter needs its base: the seeded initialisation, saved once
                        from jobs.train_model import build_model

                        build_model(cfg, False).save(tmp / "base")
                        base = storage.join(cfg.out, "base")
                    model.net.peft_config["default"].base_model_name_or_path = base
                    model.net.save_pretrained(str(tmp / "adapter"))
                    info |= _adapter_info(tmp / "adapter", trainable)
                    if adapter_only:
                        model.save(tmp / "model", include_base=False, base_model_path=base)
        if not adapter_only:
            with _gathered(model.net.parameters(), stage3):
                if rank == 0:
                    if lora:
                        model.net = model.net.merge_and_unload()  # in place: W += scale * B @ A
                    model.save(tmp / "model")
            info["merged"] = lora
        if rank == 0:
            reloaded = load_model(tmp / "model", device=str(device), dtype=dtype)
            got = _probe_loss(reloaded, reloaded.net, probe)
            del reloaded
            diff = abs(got - ref) / max(1.0, abs(ref))
            info["check"] = {"engine_loss": ref, "export_loss": got, "rel_diff": diff, "device": str(device),
                             "dtype": str(dtype).replace("torch.", "")}
            if diff > TOLERANCE.get(dtype, 3e-2):
                raise RuntimeError(f"the exported model's loss on the probe batch is {got:.6f}, the trained engine's "
                                   f"{ref:.6f}: the export is not the trained model; nothing was published")
            for name in ("base", "adapter", "model"):
                if (tmp / name).exists():
                    info[name] = _publish(tmp, name, cfg.out)
            buf = io.BytesIO()  # for tests and debugging: the probe batch and the engine's loss on it (tensors only)
            torch.save({"batch": probe, "engine_loss": torch.tensor(ref)}, buf)
            storage.write_bytes(storage.join(cfg.out, "export_probe.pt"), buf.getvalue())
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return info


def _adapter_info(adapter_dir: Path, trainable: list[torch.Tensor]) -> dict:
    """Values in the written adapter vs trainable parameters: they must agree (PEFT + ZeRO-3 used to write an
    empty adapter of placeholders)."""
    from safetensors.torch import load_file

    adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))
    n_adapter = int(sum(t.numel() for t in adapter.values()))
    n_trainable = int(sum(getattr(p, "ds_numel", p.numel()) for p in trainable))
    if not adapter or n_adapter != n_trainable:
        raise RuntimeError(f"exported adapter holds {n_adapter} values for {n_trainable} trainable parameters "
                           "(the empty-adapter failure of PEFT + ZeRO-3)")
    return {"adapter_tensors": len(adapter), "adapter_params": n_adapter, "trainable_params": n_trainable}
