"""Several hosts as one engine: `jax.distributed` joins the processes, and JAX's device list becomes
every process's devices, so `tensor_parallel_size` / `data_parallel_size` can span hosts.

Each process runs the same program (JAX's multi-controller SPMD): the same `LLM(...)` and the same
`generate(...)` calls, in the same order. Every process then schedules the same steps and launches the
same sharded programs, each on its own devices; XLA's collectives cross hosts (NCCL on GPUs, gloo on
CPUs), and every process gets the same tokens.

    # on every host, with its own process id:
    JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python my_script.py
    # my_script.py:
    import jaxllm.distributed
    jaxllm.distributed.initialize()
    llm = jaxllm.LLM(model, tensor_parallel_size=16)   # 2 hosts x 8 GPUs
"""

from __future__ import annotations

import os

import jax


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join a multi-process run before anything else touches JAX's devices.

    Args default to the environment's JAX_COORDINATOR_ADDRESS ("host:port" of process 0),
    JAX_NUM_PROCESSES and JAX_PROCESS_ID. Returns False, doing nothing, when no coordinator address is
    given (a single-process run). On CPUs the collectives go over gloo."""
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if coordinator_address is None:
        return False
    num_processes = _int("num_processes", num_processes, "JAX_NUM_PROCESSES")
    process_id = _int("process_id", process_id, "JAX_PROCESS_ID")
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes}: must be at least 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id={process_id}: must be in [0, num_processes={num_processes})")
    if ":" not in coordinator_address:
        raise ValueError(f"coordinator_address={coordinator_address!r}: must be host:port")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # used only by CPU devices
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    return True


def _int(name: str, value: int | None, env: str) -> int:
    if value is None:
        raw = os.environ.get(env)
        if raw is None:
            raise ValueError(f"{name} is missing: pass it or set {env}")
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"{env}={raw!r}: must be an integer") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r}: must be an integer")
    return value
