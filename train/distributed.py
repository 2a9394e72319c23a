"""Multi-host start-up through `jax.distributed` (no home-made launcher).

Explicit coordinator flags win; otherwise a cluster environment that JAX detects by itself
(Cloud TPU pod slices, SLURM with several tasks, Open MPI) triggers `jax.distributed.initialize()`
with no arguments; a single machine runs without it.
"""
from __future__ import annotations

import logging
import os

import jax

from hibari.base.errors import UsageError

log = logging.getLogger(__name__)


def cluster_detected(env: dict[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Initialise jax.distributed when running on several hosts; a no-op otherwise."""
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise UsageError("--coordinator_address, --num_processes and --process_id must be "
                             "given together")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif cluster_detected():
        jax.distributed.initialize()
    else:
        return
    log.info("jax.distributed: process %d of %d, %d local / %d global devices",
             jax.process_index(), jax.process_count(), jax.local_device_count(),
             jax.device_count())
