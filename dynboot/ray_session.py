"""Join the Ray cluster a job runs on, or start a local one, and shut down only what was started here.

    with ray_session(cfg.ray_address, cfg.num_cpus):   # '' = RAY_ADDRESS (ray job submit sets it) or a new local cluster
        ...
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


@contextlib.contextmanager
def ray_session(address: str = "", num_cpus: int = 0) -> Iterator[None]:
    """Use the running Ray session, else join `address` / RAY_ADDRESS, else start a local cluster with
    `num_cpus` logical CPUs (0 = every core); a cluster started here is shut down on exit."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or None)
    else:
        ray.init(num_cpus=num_cpus or None, include_dashboard=False)
    try:
        yield
    finally:
        ray.shutdown()
