"""Tensor parallelism on JAX's SPMD: a `Mesh` with one axis "tp", weights sharded Megatron-style from
one table of logical axes, the KV cache sharded by KV heads, and attention run per shard.

The model code knows nothing of devices. Each weight has logical axes (`WEIGHT_AXES`); `AXIS_RULES`
maps logical axes to the mesh axis; `shard_weights` places every weight by them. The jitted step then
runs on the mesh as one SPMD program: XLA inserts the all-reduce after each row-parallel GEMM (the
attention output and MLP down projections) and the gathers of the vocabulary-parallel embedding and
LM head. Attention is the one place that runs per shard (`shard_map`): each device attends its own
heads over its own slice of the paged cache, the kernels' signature unchanged. One block table
serves every shard, so the scheduler and block manager do not know about devices at all.

    column-parallel  wqkv, w_gate_up  [e, G, cols / G]: device g computes its own heads (its own f slice)
    row-parallel     wo, w_down       rows split by heads (by f): partial sums, all-reduced by XLA
    vocab-parallel   embed, lm_head   rows (columns) split by vocabulary; logits gathered for sampling

KV heads. With as many KV heads as devices or more, each device holds num_kv_heads / N of them in
its cache. With fewer (GQA: Llama-3-70B has 8 KV heads; 16 devices), each KV head is replicated on
the N / num_kv_heads devices whose query heads read it (vLLM's choice): every device holds exactly
one KV head, so the cache costs N heads instead of num_kv_heads, but attention stays local. The
model then runs with `num_kv_heads = N` (`tensor_parallel_config`), which is the same model.

Families. The table covers llama.py's `Weights`: Llama, Mistral, Qwen2, Qwen3 and Phi-3 (which runs
llama.py's forward). The other families (jaxllm/models/registry.py) refuse tensor_parallel_size > 1
by architecture; their data-parallel replicas (one device each) keep the one-device layout. Their
attention already goes through `paged_attention` (jaxllm/models/layers.py), windows and ALiBi
slopes included, so a family's tensor parallelism is its rows in a table like WEIGHT_AXES.
"""

from __future__ import annotations

import functools
import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import pallas_kernels
from jaxllm.config import ModelConfig
from jaxllm.models.quant import QuantizedWeight

logger = logging.getLogger("jaxllm")

TP = "tp"  # the mesh axis of tensor parallelism

# Family modules (jaxllm/models/registry.py) whose weights are `jaxllm.models.llama.Weights` (Phi-3 runs
# llama.py's forward on them); the other families refuse tensor_parallel_size > 1 by name.
TENSOR_PARALLEL_FAMILIES = ("llama", "phi3")
# Logical axes of each weight of `jaxllm.models.llama.Weights` (per-layer weights lead with "layers").
WEIGHT_AXES: dict[str, tuple[str | None, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "final_norm": ("embed",),
    "layers.attn_norm": ("layers", "embed"),
    "layers.wqkv": ("layers", "embed", "heads", None),  # grouped: [L, e, G, (q + 2 kv) / G]
    "layers.bqkv": ("layers", "heads", None),
    "layers.wo": ("layers", "heads", "embed"),
    "layers.mlp_norm": ("layers", "embed"),
    "layers.w_gate_up": ("layers", "embed", "mlp", None),  # grouped: [L, e, G, 2 f / G]
    "layers.w_down": ("layers", "mlp", "embed"),
    "layers.q_norm": ("layers", "head_dim"),
    "layers.k_norm": ("layers", "head_dim"),
}
KV_CACHE_AXES = ("layers", "blocks", "block_size", "kv_heads", "head_dim")
# Logical axis -> mesh axis; the others are replicated.
AXIS_RULES: dict[str, str] = {"vocab": TP, "heads": TP, "mlp": TP, "kv_heads": TP}


def spec(axes: tuple[str | None, ...], rules: dict[str, str] = AXIS_RULES) -> P:
    """The PartitionSpec of logical axes under `rules`."""
    return P(*(rules.get(a) if a else None for a in axes))


def make_mesh(tensor_parallel_size: int, devices=None) -> Mesh:
    """A mesh ("tp",) over the first `tensor_parallel_size` of `devices` (default: JAX's devices, which
    honour CUDA_VISIBLE_DEVICES)."""
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size!r}: must be a positive integer")
    if tensor_parallel_size > len(devices):
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} is more than the {len(devices)} "
                         f"{devices[0].platform.upper()} device(s) available")
    return Mesh(np.array(devices[:tensor_parallel_size]), (TP,))


def tensor_parallel_architectures() -> tuple[str, ...]:
    """The architectures whose weights have a tensor-parallel layout: those run on llama.py's Weights."""
    from jaxllm.models.registry import SUPPORTED_ARCHITECTURES, family_name

    return tuple(a for a in SUPPORTED_ARCHITECTURES if family_name(a) in TENSOR_PARALLEL_FAMILIES)


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """Refuse a `tensor_parallel_size` for a family with no layout in WEIGHT_AXES, or one that does not
    split the model's heads and MLP evenly."""
    if tp > 1 and config.architecture not in tensor_parallel_architectures():
        raise ValueError(f"tensor_parallel_size={tp}: {config.architecture} has no tensor-parallel layout in "
                         f"jaxllm yet (supported: {', '.join(tensor_parallel_architectures())}); "
                         f"data_parallel_size works for every architecture")
    for name, value in (("num_heads", config.num_heads), ("intermediate_size", config.intermediate_size)):
        if value % tp:
            raise ValueError(f"tensor_parallel_size={tp} does not divide the model's {name}={value}")
    nkv = config.num_kv_heads
    if nkv % tp and tp % nkv:
        raise ValueError(f"tensor_parallel_size={tp} and the model's num_kv_heads={nkv}: one must divide the "
                         f"other (KV heads are split over the devices, or each replicated on tp / num_kv_heads)")


def tensor_parallel_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The config the sharded model runs with: KV heads replicated up to `tp` when there are fewer."""
    check_tensor_parallel(config, tp)
    return config.replace(num_kv_heads=max(config.num_kv_heads, tp))


def _group_qkv(w: np.ndarray, config: ModelConfig, tp: int) -> np.ndarray:
    """[..., q + 2 kv] (q | k | v) -> [..., tp, cols / tp]: group g holds its query heads, then the KV
    heads they read (repeated when there are fewer KV heads than groups)."""
    lead, hd, nkv = w.shape[:-1], config.head_dim, config.num_kv_heads
    q, k, v = np.split(w, [config.q_size, config.q_size + config.kv_size], axis=-1)

    def per_group(x, repeat=1):
        x = np.repeat(x.reshape(*lead, -1, hd), repeat, axis=-2)
        return x.reshape(*lead, tp, -1)

    repeat = max(tp // nkv, 1)
    return np.concatenate([per_group(q), per_group(k, repeat), per_group(v, repeat)], axis=-1)


def _group_gate_up(w: np.ndarray, tp: int) -> np.ndarray:
    """[..., 2 f] (gate | up) -> [..., tp, 2 f / tp]: group g holds its slice of gate, then of up."""
    gate, up = np.split(w, 2, axis=-1)
    lead = w.shape[:-1]
    return np.concatenate([gate.reshape(*lead, tp, -1), up.reshape(*lead, tp, -1)], axis=-1)


def _path_name(path) -> str:
    return ".".join(getattr(k, "name", getattr(k, "key", str(k))) for k in path)


def weight_shardings(params, config: ModelConfig, mesh: Mesh):
    """A NamedSharding for every leaf of (grouped) `params`, from WEIGHT_AXES and AXIS_RULES. A
    vocabulary that the mesh does not divide stays replicated."""
    tp = mesh.shape[TP]
    rules = dict(AXIS_RULES)
    if config.vocab_size % tp:
        logger.warning("vocab_size=%d is not a multiple of tensor_parallel_size=%d: the embedding and LM head "
                       "are replicated", config.vocab_size, tp)
        rules.pop("vocab")
    return jax.tree_util.tree_map_with_path(
        lambda path, _: NamedSharding(mesh, spec(WEIGHT_AXES[_path_name(path)], rules)), params)


def check_quantized_tensor_parallel(tensor_parallel_size: int, quantization: str | None = None,
                                    kv_cache_dtype: str = "auto", params=None) -> None:
    """Refuse tensor_parallel_size > 1 with quantized weights (a `quantization` method, or `params` from
    a pre-quantized checkpoint) or an FP8 KV cache: WEIGHT_AXES lays out float weights and a 16-bit
    cache only (a QuantizedWeight's scales, zero points and packed int4 rows, and the cache's per-layer
    scales, have no sharded layout yet). Data parallelism runs them: each replica is one device."""
    tp = tensor_parallel_size
    if not isinstance(tp, int) or tp <= 1:
        return
    hint = "use tensor_parallel_size=1 (data_parallel_size works with it)"
    if quantization is not None:
        raise ValueError(f"tensor_parallel_size={tp} with quantization={quantization!r}: jaxllm shards float "
                         f"weights only; {hint}, or quantization=None")
    if params is not None and any(isinstance(leaf, QuantizedWeight) for leaf in jax.tree_util.tree_leaves(
            params, is_leaf=lambda x: isinstance(x, QuantizedWeight))):
        raise ValueError(f"tensor_parallel_size={tp} with a quantized checkpoint (quantization from its "
                         f"quantization_config): jaxllm shards float weights only; {hint}")
    if kv_cache_dtype != "auto":
        raise ValueError(f"tensor_parallel_size={tp} with kv_cache_dtype={kv_cache_dtype!r}: jaxllm shards a "
                         f"16-bit KV cache only; {hint}, or kv_cache_dtype='auto'")


def shard_weights(params, config: ModelConfig, mesh: Mesh):
    """(the config the sharded model runs with, `params` laid out for `mesh` and placed on it).

    `params` may live on the host (numpy) or on a device; each device receives only its shards. On a
    mesh of one device (a data-parallel replica) the weights keep their one-device layout, any family."""
    from jaxllm.models.llama import Weights

    tp = mesh.shape[TP]
    if tp == 1:
        return config, jax.device_put(params, NamedSharding(mesh, P()))
    check_quantized_tensor_parallel(tp, params=params)
    tp_config = tensor_parallel_config(config, tp)
    host = jax.tree_util.tree_map(np.asarray, params)
    layers = host.layers
    grouped = Weights(
        embed=host.embed, final_norm=host.final_norm, lm_head=host.lm_head,
        layers=type(layers)(**{**vars(layers),
                               "wqkv": _group_qkv(layers.wqkv, config, tp),
                               "bqkv": None if layers.bqkv is None else _group_qkv(layers.bqkv, config, tp),
                               "w_gate_up": _group_gate_up(layers.w_gate_up, tp)}))
    shardings = weight_shardings(grouped, tp_config, mesh)
    return tp_config, jax.tree_util.tree_map(jax.device_put, grouped, shardings)


def kv_cache_sharding(mesh: Mesh) -> NamedSharding:
    """The KV cache's sharding: by KV heads."""
    return NamedSharding(mesh, spec(KV_CACHE_AXES))


def paged_attention(q, k_cache, v_cache, layer, block_tables, seq_lens, query_start_loc, *, scale: float,
                    decode_only: bool = False, prefill_kernel: bool | None = None, sliding_window=None,
                    logit_softcap: float | None = None, alibi_slopes=None):
    """`pallas_kernels.ragged_paged_attention`, run per shard of heads when traced under a mesh with a
    "tp" axis (`jax.set_mesh`), else as is. Shapes as the kernel's: q [T, heads, head_dim], caches
    [layers, blocks, block_size, kv_heads, head_dim], alibi_slopes [heads]; each shard sees its heads,
    its cache slice and its heads' slopes. sliding_window: a scalar (traced or not) or None."""
    attend = functools.partial(pallas_kernels.ragged_paged_attention, scale=scale, decode_only=decode_only,
                               prefill_kernel=prefill_kernel, logit_softcap=logit_softcap)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or TP not in mesh.axis_names:
        return attend(q, k_cache, v_cache, layer, block_tables, seq_lens, query_start_loc,
                      sliding_window=sliding_window, alibi_slopes=alibi_slopes)
    # The optional arrays travel as arguments (a traced window or slopes cannot be closed over).
    heads, cache = P(None, TP, None), spec(KV_CACHE_AXES)
    args = [q, k_cache, v_cache, layer, block_tables, seq_lens, query_start_loc]
    specs = [heads, cache, cache, P(), P(), P(), P()]
    extra = {}
    if sliding_window is not None:
        extra["sliding_window"] = (sliding_window, P())
    if alibi_slopes is not None:
        extra["alibi_slopes"] = (alibi_slopes, P(TP))
    names = list(extra)

    def per_shard(*a):
        return attend(*a[:7], **dict(zip(names, a[7:])))

    return jax.shard_map(per_shard, in_specs=tuple(specs + [extra[n][1] for n in names]), out_specs=heads,
                         check_vma=False)(*args, *(extra[n][0] for n in names))
