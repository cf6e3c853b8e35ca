"""StateReader: checked access to a checkpoint's HF-named tensors, for the families' `load_weights`.

Every tensor's shape is checked against what the family expects from its config; a missing tensor,
or one that no family code asked for (a bias the model would silently ignore, say), is a ValueError
naming it. HF's nn.Linear stores [out, in]; jaxllm computes x @ W, so matrices are transposed unless a
family says they are already [in, out] (GPT-2's Conv1D).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np

NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}
# Tensors a checkpoint may carry that the model recomputes or never uses.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


class StateReader:
    def __init__(self, config, state: Mapping[str, np.ndarray]):
        self.config = config
        self.state = state
        self.dtype = NUMPY_DTYPES[config.dtype]
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.state

    def take(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.state:
            raise ValueError(f"checkpoint is missing tensor {name!r} (needed by {self.config.architecture})")
        array = self.state[name]
        if tuple(array.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(array.shape)}, expected {tuple(shape)} from the config")
        self.used.add(name)
        return array

    def single(self, name: str, shape: tuple[int, ...], transpose: bool = False) -> jnp.ndarray:
        array = self.take(name, shape)
        return jnp.asarray((array.T if transpose else array).astype(self.dtype))

    def layers(self, parts: list[tuple[str, tuple[int, ...]]], transpose: bool = True,
               num_layers: int | None = None) -> jnp.ndarray:
        """Stack per-layer tensors (names with `{i}`) on a leading axis, concatenating `parts` along the
        output axis: [L, in, sum(out)] for matrices (stored [out, in] unless transpose=False, then
        [in, out]), [L, sum(out)] for vectors."""
        L = self.config.num_layers if num_layers is None else num_layers
        matrix = len(parts[0][1]) == 2
        out_axis = 0 if transpose or not matrix else 1
        width = sum(shape[out_axis] for _, shape in parts)
        in_dim = parts[0][1][1 - out_axis] if matrix else None
        out = np.empty((L, in_dim, width) if matrix else (L, width), self.dtype)
        for i in range(L):
            col = 0
            for template, shape in parts:
                array = self.take(template.format(i=i), shape)
                n = shape[out_axis]
                if matrix:
                    out[i, :, col:col + n] = array.T if transpose else array
                else:
                    out[i, col:col + n] = array
                col += n
        return jnp.asarray(out)

    def experts(self, parts: list[tuple[str, tuple[int, ...]]], num_experts: int) -> jnp.ndarray:
        """Per-layer, per-expert matrices (names with `{i}` and `{j}`), fused along the output axis:
        [L, E, in, sum(out)]."""
        L = self.config.num_layers
        width = sum(shape[0] for _, shape in parts)
        out = np.empty((L, num_experts, parts[0][1][1], width), self.dtype)
        for i in range(L):
            for j in range(num_experts):
                col = 0
                for template, shape in parts:
                    out[i, j, :, col:col + shape[0]] = self.take(template.format(i=i, j=j), shape).T
                    col += shape[0]
        return jnp.asarray(out)

    def mark_used(self, name: str) -> None:
        """A tensor that may be stored but is not needed (a tied lm_head's copy)."""
        self.used.add(name)

    def check_all_used(self) -> None:
        unused = sorted(n for n in self.state if n not in self.used and not n.endswith(IGNORED_SUFFIXES))
        if unused:
            shown = ", ".join(unused[:8]) + (f", ... ({len(unused)} in all)" if len(unused) > 8 else "")
            raise ValueError(f"checkpoint has tensors {self.config.architecture} in jaxllm does not use "
                             f"(an unsupported feature?): {shown}")
