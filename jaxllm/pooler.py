"""Pooling, as vLLM's pooler splits it: how a sequence's tokens are pooled into one vector (CLS, MEAN,
LAST: on the device, inside the step), apart from what follows (normalise and cut Matryoshka
dimensions for embeddings; sigmoid or softmax for classification; cosine or the cross-encoder's
logit for scores: on the host, per request, on the few floats that come back).

The defaults come from the model as vLLM takes them: an encoder pools its CLS token, a decoder its
last token, both normalised; a sentence-transformers folder overrides that with its
`1_Pooling/config.json` (the pooling mode) and `modules.json` (a `Normalize` module or none); an
`override_pooler_config` / `pooler_config` from the user beats both.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

POOLING_TYPES = ("CLS", "MEAN", "LAST")


@dataclass(frozen=True)
class PoolerConfig:
    """vLLM's PoolerConfig: None fields take the model's default (see `resolve_pooler_config`)."""

    pooling_type: str | None = None  # "CLS" | "MEAN" | "LAST"
    normalize: bool | None = None  # embeddings: L2-normalise
    dimensions: int | None = None  # embeddings: default Matryoshka dimensions
    use_activation: bool | None = None  # classification/scores: sigmoid (one label) or softmax

    def __post_init__(self):
        if self.pooling_type is not None:
            kind = str(self.pooling_type).upper()
            if kind not in POOLING_TYPES:
                raise ValueError(f"pooling_type={self.pooling_type!r}: supported: {', '.join(POOLING_TYPES)}")
            object.__setattr__(self, "pooling_type", kind)
        for name in ("normalize", "use_activation"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a boolean or None")
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)
                                            or self.dimensions < 1):
            raise ValueError(f"dimensions={self.dimensions!r} must be a positive integer or None")

    @classmethod
    def from_any(cls, value) -> "PoolerConfig | None":
        """A PoolerConfig, a dict of its fields (vLLM's older `softmax`/`activation` mean `use_activation`),
        a JSON string of one, or None. Unknown fields are refused by name."""
        if value is None or isinstance(value, PoolerConfig):
            return value
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, dict):
            raise TypeError(f"pooler_config must be a PoolerConfig, a dict or a JSON string, got {type(value).__name__}")
        value = dict(value)
        for alias in ("softmax", "activation"):
            if alias in value:
                value.setdefault("use_activation", value.pop(alias))
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"pooler_config: unsupported fields {', '.join(unknown)}; supported: "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return cls(**value)

    def merged_over(self, base: "PoolerConfig") -> "PoolerConfig":
        """This config's set fields over `base`'s."""
        return dataclasses.replace(base, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                                           if getattr(self, f.name) is not None})


def sentence_transformers_pooler(folder: Path) -> PoolerConfig:
    """What a sentence-transformers folder says: the pooling mode from its Pooling module's config, and
    normalize=True iff modules.json lists a Normalize module. Empty when the folder has no modules.json."""
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        return PoolerConfig()
    modules = json.loads(modules_file.read_text())
    normalize = any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    pooling_type = None
    for m in modules:
        if str(m.get("type", "")).endswith("Pooling"):
            config_file = folder / m.get("path", "") / "config.json"
            if config_file.is_file():
                pooling_type = _st_pooling_mode(json.loads(config_file.read_text()), config_file)
    return PoolerConfig(pooling_type=pooling_type, normalize=normalize)


def _st_pooling_mode(st: dict, where: Path) -> str:
    mode = st.get("pooling_mode")
    if isinstance(mode, str):
        flags = {f"pooling_mode_{mode}": True}
    else:
        flags = {k: v for k, v in st.items() if k.startswith("pooling_mode_") and v}
    for flag, kind in (("pooling_mode_cls_token", "CLS"), ("pooling_mode_cls", "CLS"),
                       ("pooling_mode_mean_tokens", "MEAN"), ("pooling_mode_mean", "MEAN"),
                       ("pooling_mode_lasttoken", "LAST")):
        if flags.get(flag):
            return kind
    raise ValueError(f"{where}: pooling mode {sorted(flags) or 'none'} is not supported (CLS, mean, last token)")


def resolve_pooler_config(folder: Path | None, *, is_encoder: bool, override: PoolerConfig | None) -> PoolerConfig:
    """The model's default pooler (encoders: CLS, decoders: LAST; normalised; activation on), then the
    sentence-transformers files, then the user's override."""
    config = PoolerConfig(pooling_type="CLS" if is_encoder else "LAST", normalize=True, use_activation=True)
    if folder is not None and folder.is_dir():
        config = sentence_transformers_pooler(folder).merged_over(config)
    return override.merged_over(config) if override is not None else config


@dataclass(frozen=True)
class MatryoshkaInfo:
    """Whether (and to which sizes) a model's embeddings may be cut: config.json's `is_matryoshka` /
    `matryoshka_dimensions`, as vLLM reads them."""

    is_matryoshka: bool = False
    dimensions: tuple[int, ...] | None = None

    @classmethod
    def from_hf(cls, hf: dict) -> "MatryoshkaInfo":
        dims = hf.get("matryoshka_dimensions")
        return cls(bool(hf.get("is_matryoshka") or dims), tuple(int(d) for d in dims) if dims else None)

    def check(self, dimensions: int | None, hidden_size: int) -> None:
        """Refuse a `dimensions` the model cannot honour."""
        if dimensions is None:
            return
        if isinstance(dimensions, bool) or not isinstance(dimensions, int) or dimensions < 1:
            raise ValueError(f"dimensions={dimensions!r} must be a positive integer")
        if not self.is_matryoshka:
            raise ValueError(f"dimensions={dimensions}: this model does not support Matryoshka representation "
                             "(config.json declares no is_matryoshka / matryoshka_dimensions), so cutting its "
                             "embeddings would give poor results")
        if self.dimensions is not None and dimensions not in self.dimensions:
            raise ValueError(f"dimensions={dimensions}: this model supports only {list(self.dimensions)}")
        if dimensions > hidden_size:
            raise ValueError(f"dimensions={dimensions} is more than the model's {hidden_size}")


# -- what follows the pooling (host, numpy) ---------------------------------------------------------
def embedding_head(pooled: np.ndarray, normalize: bool, dimensions: int | None) -> np.ndarray:
    """[e] -> [dimensions or e]: cut first (Matryoshka), then L2-normalise, as vLLM does."""
    x = pooled[:dimensions] if dimensions else pooled
    if normalize:
        x = x / max(float(np.linalg.norm(x)), 1e-12)
    return x


def classification_head(logits: np.ndarray, use_activation: bool, activation: str) -> np.ndarray:
    """[l] logits -> probabilities: `activation` is "sigmoid", "softmax" or "identity"."""
    if not use_activation or activation == "identity":
        return logits
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    z = np.exp(logits - logits.max())
    return z / z.sum()


def default_activation(hf: dict, num_labels: int) -> str:
    """A cross-encoder's activation: sentence-transformers' `activation_fn` in config.json when it names
    one, else sigmoid for one label and softmax for more (vLLM's rule)."""
    st = hf.get("sentence_transformers") or {}
    fn = str(st.get("activation_fn") or "")
    if fn.endswith("Identity"):
        return "identity"
    if fn.endswith("Sigmoid"):
        return "sigmoid"
    return "sigmoid" if num_labels == 1 else "softmax"
