"""Multi-process start-up, shared by every entry point that may run on several hosts.

``maybe_initialize()`` must run before any other JAX call. It reads, in order:
  * ``JAXKD_COORDINATOR`` / ``JAXKD_NUM_PROCESSES`` / ``JAXKD_PROCESS_ID`` (set by
    ``launch/local_multiprocess.sh``; optional ``JAXKD_LOCAL_DEVICES`` fakes CPU devices per process),
  * otherwise a SLURM or TPU-pod environment, which ``jax.distributed.initialize()`` detects itself,
  * otherwise nothing: a single process.
"""

from __future__ import annotations

import os


def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def maybe_initialize() -> int:
    """Join the process group when the environment asks for one; returns this process's index."""
    import jax

    if "JAXKD_LOCAL_DEVICES" in os.environ:
        jax.config.update("jax_num_cpu_devices", _env_int("JAXKD_LOCAL_DEVICES"))
    if "JAXKD_COORDINATOR" in os.environ:
        missing = [k for k in ("JAXKD_NUM_PROCESSES", "JAXKD_PROCESS_ID") if k not in os.environ]
        if missing:
            raise ValueError(f"JAXKD_COORDINATOR is set but {missing} are not")
        jax.distributed.initialize(coordinator_address=os.environ["JAXKD_COORDINATOR"],
                                   num_processes=_env_int("JAXKD_NUM_PROCESSES"),
                                   process_id=_env_int("JAXKD_PROCESS_ID"))
    elif "SLURM_JOB_ID" in os.environ and _env_int_or("SLURM_NTASKS", 1) > 1:
        jax.distributed.initialize()
    elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
        jax.distributed.initialize()
    return jax.process_index()


def _env_int_or(name: str, default: int) -> int:
    return _env_int(name) if name in os.environ else default
