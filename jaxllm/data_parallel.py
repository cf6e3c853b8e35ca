"""Data parallelism: `data_parallel_size` engine replicas over disjoint groups of devices, behind the
one engine interface that `LLM` and the server drive.

Replica i runs on devices [i * tp, (i + 1) * tp) (tp = tensor_parallel_size), with its own weights,
KV cache, scheduler and block manager. A new request goes to the replica with the fewest unfinished
requests (ties: the lowest index) and stays there to the end. `step()` steps every busy replica in
turn: each launches its next step before it waits for its previous one, so while the host waits for
one replica the others' devices are already running.
"""

from __future__ import annotations

from types import SimpleNamespace

import jax

from jaxllm.config import EngineConfig, ModelConfig
from jaxllm.core.request import Request
from jaxllm.engine import LLMEngine
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import SamplingParams


def replica_devices(engine_config: EngineConfig, devices=None) -> list[list]:
    """The device group of each replica; a ValueError naming the sizes when there are too few devices."""
    dp, tp = engine_config.data_parallel_size, engine_config.tensor_parallel_size
    devices = list(jax.devices() if devices is None else devices)
    if dp * tp > len(devices):
        raise ValueError(f"data_parallel_size={dp} x tensor_parallel_size={tp} needs {dp * tp} devices, and "
                         f"{len(devices)} {devices[0].platform.upper()} device(s) are available")
    return [devices[i * tp:(i + 1) * tp] for i in range(dp)]


class _Failures:
    """The replicas' `failures` (request_id -> the exception the engine failed it with), read and popped as
    one dict."""

    def __init__(self, engines: list[LLMEngine]):
        self.engines = engines

    def __contains__(self, request_id: str) -> bool:
        return any(request_id in engine.failures for engine in self.engines)

    def pop(self, request_id: str, *default):
        for engine in self.engines:
            if request_id in engine.failures:
                return engine.failures.pop(request_id)
        if default:
            return default[0]
        raise KeyError(request_id)


class DataParallelEngine:
    """`data_parallel_size` LLMEngines, with LLMEngine's interface (make_request, enqueue, step, ...)."""

    def __init__(self, model_config: ModelConfig, params, tokenizer, engine_config: EngineConfig, devices=None):
        groups = replica_devices(engine_config, devices)
        params = jax.device_get(params)  # on the host once: each replica copies its own shards
        self.engines = [LLMEngine(model_config, params, tokenizer, engine_config, devices=group)
                        for group in groups]
        first = self.engines[0]
        self.config, self.model_config, self.tokenizer = engine_config, first.model_config, tokenizer
        self.eos_token_ids = first.eos_token_ids
        self._owner: dict[str, LLMEngine] = {}  # user request_id -> its replica
        self.failures = _Failures(self.engines)

    @property
    def requests(self) -> dict[str, Request]:
        return {rid: req for engine in self.engines for rid, req in engine.requests.items()}

    def make_request(self, request_id: str, prompt, params: SamplingParams | None = None) -> Request:
        # Made by the first replica (its seeds and arrival order serve all); ids are unique across replicas.
        if request_id in self._owner:
            raise ValueError(f"request_id {request_id!r} is already in use")
        return self.engines[0].make_request(request_id, prompt, params)

    def enqueue(self, req: Request) -> None:
        engine = min(self.engines, key=lambda e: len(e.requests))
        self._owner[req.request_id] = engine
        engine.enqueue(req)

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None) -> Request:
        req = self.make_request(request_id, prompt, params)
        self.enqueue(req)
        return req

    def abort_request(self, request_id: str) -> None:
        engine = self._owner.pop(request_id, None)
        if engine is not None:
            engine.abort_request(request_id)

    def has_unfinished_requests(self) -> bool:
        return any(engine.has_unfinished_requests() for engine in self.engines)

    def step(self) -> list[RequestOutput]:
        outputs = []
        for engine in self.engines:
            if engine.has_unfinished_requests():
                outputs += engine.step()
        for out in outputs:
            if out.finished:
                self._owner.pop(out.request_id, None)
        return outputs

    # -- the replicas' state, summed, for the server's metrics and error handling ----------------
    @property
    def scheduler(self):
        schedulers = [engine.scheduler for engine in self.engines]
        return SimpleNamespace(running=[r for s in schedulers for r in s.running],
                               waiting=[r for s in schedulers for r in s.waiting],
                               num_preemptions=sum(getattr(s, "num_preemptions", 0) for s in schedulers))

    @property
    def kv_cache_manager(self):
        managers = [engine.kv_cache_manager for engine in self.engines]
        total = sum(m.num_blocks for m in managers)
        return SimpleNamespace(
            num_blocks=total, num_free_blocks=sum(m.num_free_blocks for m in managers),
            usage=sum(m.usage * m.num_blocks for m in managers) / total,
            prefix_cache_queries=sum(m.prefix_cache_queries for m in managers),
            prefix_cache_hits=sum(m.prefix_cache_hits for m in managers))
