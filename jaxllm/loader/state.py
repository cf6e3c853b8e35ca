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

from jaxllm.loader.quantized import QuantScheme, fuse, int4_layout, read_linear
from jaxllm.models.quant import QuantizedWeight

NUMPY_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
                "float16": np.dtype(np.float16)}
# Tensors a checkpoint may carry that the model recomputes or never uses.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attn.bias", "attn.masked_bias")


class StateReader:
    def __init__(self, config, state: Mapping[str, np.ndarray], scheme: QuantScheme | None = None,
                 on_host: bool = False):
        """`on_host`: give numpy arrays (for weights sharded over several devices later), not arrays on
        the default device."""
        self.config = config
        self.place = np.asarray if on_host else jnp.asarray
        self.state = state
        self.scheme = scheme  # quantized linear weights (loader/quantized.py), or None
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
        return self.place((array.T if transpose else array).astype(self.dtype))

    def layers(self, parts: list[tuple[str, tuple[int, ...]]], transpose: bool = True,
               num_layers: int | None = None, quantize: bool = True) -> jnp.ndarray | QuantizedWeight:
        """Stack per-layer tensors (names with `{i}`) on a leading axis, concatenating `parts` along the
        output axis: [L, in, sum(out)] for matrices (stored [out, in] unless transpose=False, then
        [in, out]), [L, sum(out)] for vectors. Matrices are linear weights: under a quantization scheme
        they come back as a QuantizedWeight, unless `quantize` is False (a MoE router)."""
        L = self.config.num_layers if num_layers is None else num_layers
        matrix = len(parts[0][1]) == 2
        if matrix and quantize and self.scheme is not None:
            stored = [self.scheme.stores_quantized(self, t.format(i=0)) for t, _ in parts]
            if all(stored):
                return self._quantized_layers(parts, transpose, L)
            if any(stored):
                raise ValueError(f"{', '.join(t.format(i=0) for t, _ in parts)} are fused in jaxllm but only some "
                                 "are quantized in the checkpoint")
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
        return self.place(out)

    def _quantized_layers(self, parts, transpose: bool, L: int) -> QuantizedWeight:
        method = self.scheme.kernel_method
        per_layer = []
        for i in range(L):
            names = [t.format(i=i) for t, _ in parts]
            fused = fuse([read_linear(self, n, shape, transpose, self.scheme) for n, (_, shape) in zip(names, parts)],
                         names)
            if method == "fp8":  # [out, in], contracted axis innermost (models/quant.py)
                fused.q = np.ascontiguousarray(fused.q.T)
            per_layer.append(int4_layout(fused, ", ".join(names)) if method == "int4" else fused)
        if any(p.perm is not None for p in per_layer):  # act-order in some layers only: the others in order
            for p in per_layer:
                p.perm = np.arange(p.q.shape[0] * 8, dtype=np.int32) if p.perm is None else p.perm
        first = per_layer[0]

        def stack(field, dtype=None):
            if getattr(first, field) is None:
                return None
            array = np.stack([getattr(p, field) for p in per_layer])
            return self.place(array if dtype is None else array.astype(dtype))

        return QuantizedWeight(
            q=stack("q"), scale=stack("scale", None if method == "int4" else np.float32), zero=stack("zero"),
            perm=stack("perm", np.int32), input_scale=stack("input_scale", np.float32), method=method)

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
        return self.place(out)

    def lm_head(self, shape: tuple[int, int]) -> jnp.ndarray | None:
        """The output projection `lm_head.weight` ([v, e] stored) as [e, v], or None when the config ties
        it to the embedding (some tied checkpoints store the copy anyway: it counts as used)."""
        if self.config.tie_word_embeddings:
            self.mark_used("lm_head.weight")
            return None
        return self.single("lm_head.weight", shape, transpose=True)

    def mark_used(self, name: str) -> None:
        """A tensor that may be stored but is not needed (a tied lm_head's copy)."""
        self.used.add(name)

    def check_all_used(self) -> None:
        unused = sorted(n for n in self.state if n not in self.used and not n.endswith(IGNORED_SUFFIXES))
        if unused:
            shown = ", ".join(unused[:8]) + (f", ... ({len(unused)} in all)" if len(unused) > 8 else "")
            raise ValueError(f"checkpoint has tensors {self.config.architecture} in jaxllm does not use "
                             f"(an unsupported feature?): {shown}")
