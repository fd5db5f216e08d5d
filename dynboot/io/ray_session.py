"""Join the Ray cluster a job runs on, or start a local one, and shut down only what was started here.

    with ray_session(cfg.ray_address, cfg.num_cpus):   # '' = RAY_ADDRESS (ray job submit sets it) or a new local cluster
        ...
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator


START_ATTEMPTS = 3


def start_local(num_cpus: int = 0) -> None:
    """A new local cluster. Ray gives its raylet a fixed 30 s to register with the GCS (ray/_private/node.py, not
    configurable); on a loaded laptop that can pass, and the start is retried from scratch."""
    import ray

    for attempt in range(1, START_ATTEMPTS + 1):
        try:
            ray.init(num_cpus=num_cpus or None, include_dashboard=False)
            return
        except Exception as err:  # ray raises a bare Exception for this timeout
            if "timed out during startup" not in str(err) or attempt == START_ATTEMPTS:
                raise
            ray.shutdown()  # stops the processes this attempt started


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
        start_local(num_cpus)
    try:
        yield
    finally:
        ray.shutdown()
