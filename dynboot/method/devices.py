"""Telling a broken accelerator context from a recoverable error, once for every stage that holds a model.

After a CUDA device-side assert (or a cuBLAS / cuDNN / NCCL failure) every later call in the process fails too,
so the holder must end: relabel's IDP actor exits (Ray restarts it and retries the batch), a Serve replica fails
its health check (Serve replaces it). Out-of-memory is not such a fault: the next, smaller call can succeed.
"""

from __future__ import annotations

import torch

__all__ = ["DEVICE_FAULT_MARKERS", "is_device_fault"]

DEVICE_FAULT_MARKERS = ("CUDA error", "CUBLAS_STATUS_", "CUDNN_STATUS_", "device-side assert", "NCCL error")


def is_device_fault(err: BaseException) -> bool:
    """A broken accelerator context (not a recoverable per-call error such as out-of-memory)."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(err, accelerator_error):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in DEVICE_FAULT_MARKERS)
