"""Device buffers held at fixed addresses across the launches of a precompiled program.

XLA:GPU runs a program as a command buffer (a CUDA graph) recorded with the device addresses of the
buffers it reads and writes, and re-records it before a launch whenever one of them has moved. A step's
host inputs land in new device buffers each step, and its outputs are fresh allocations, so without
care every launch re-records. Measured on an H100 (benchmarks/NOTES.md, 2026-12-05): one Qwen3-0.6B
sequence's decode program (496 commands) was re-recorded at 1,143 of 1,150 launches, 0.2-1.3 ms of host
time each, and a launch then returned only once the step before it had run (a launch p50 of 1.3 ms, the
device's step).

So each precompiled program of a step
- reads its host inputs from buffers held per program, overwritten in place by a tiny donated copy
  (`refill`), and
- writes its outputs into buffers held per output shape and donated to it: XLA aliases an output to a
  donated input of its shape, so the output lands where the last one did. What the host reads is a
  `snapshot` of them, copied by a program too small to run as a command buffer; the next launch may
  overwrite the held buffers while the host still waits for that copy.

The KV cache, the last samples and the penalty state are donated and aliased already, and stay put.
The buffers are touched by the launcher thread only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, donate_argnums=(0,))
def _refill(held: dict, fresh: dict) -> dict:
    return jax.tree.map(lambda h, f: h.at[...].set(f), held, fresh)


@jax.jit
def snapshot(tree):
    """A copy of `tree`'s arrays in fresh buffers (one small copy program, run without a command buffer)."""
    return jax.tree.map(jnp.copy, tree)


class HeldBuffers:
    def __init__(self):
        self._inputs: dict[tuple, dict] = {}  # program key -> its input buffers
        self._refills: dict[tuple, jax.stages.Compiled] = {}  # program key -> `_refill` of its inputs' shapes
        self._refill_programs: dict[tuple, jax.stages.Compiled] = {}  # the same, by the inputs' shapes
        self._outputs: dict[tuple, object] = {}  # output key -> the buffers a program's outputs are written to

    def compile_refill(self, key: tuple, avals: dict) -> None:
        """Compile the refill of program `key`'s inputs (ShapeDtypeStructs with their shardings), ahead of
        its first launch, so no program compiles while steps run; programs whose inputs have the same
        shapes (the sampling programs of a row bucket) share one."""
        shapes = tuple((k, a.shape, a.dtype, a.sharding) for k, a in sorted(avals.items()))
        if (program := self._refill_programs.get(shapes)) is None:
            program = self._refill_programs.setdefault(shapes, _refill.lower(avals, avals).compile())
        self._refills[key] = program

    def inputs(self, key: tuple, arrays: dict, shardings: dict) -> dict:
        """Program `key`'s array inputs, copied into the buffers held for it: the same device addresses at
        every launch. `shardings`: where the compiled program takes each of them."""
        held = self._inputs.get(key)
        if held is None:
            held = jax.device_put(arrays, {k: shardings[k] for k in arrays})
        else:
            held = self._refills[key](held, arrays)
        self._inputs[key] = held
        return held

    def outputs(self, key: tuple, avals, sharding):
        """The buffers for outputs of `avals` (a pytree of ShapeDtypeStructs) to be written to, zeros at first:
        donate them to the program, then `keep` what it returns. None where there is nothing to hold."""
        if avals is None:
            return None
        held = self._outputs.pop(key, None)
        if held is None:
            held = jax.device_put(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), avals), sharding)
        return held

    def keep(self, key: tuple, outputs) -> None:
        """The outputs a program wrote into the buffers `outputs(key, ...)` gave it (the same addresses)."""
        self._outputs[key] = outputs
