"""The model's default sampling parameters, from its `generation_config.json` (vLLM's
`--generation-config` and `LLM.get_default_sampling_params()`).

"auto" reads the model folder's generation_config.json; "vllm" uses vLLM's (SamplingParams') own
defaults; any other value is a folder holding a generation_config.json. Only the fields vLLM takes
from it are used, and a request's own values always win over them.
"""

from __future__ import annotations

import json
from pathlib import Path

# generation_config.json name -> SamplingParams name (vLLM's get_diff_sampling_param)
FIELDS = {"repetition_penalty": "repetition_penalty", "temperature": "temperature", "top_k": "top_k",
          "top_p": "top_p", "min_p": "min_p", "max_new_tokens": "max_tokens"}


def default_sampling_params(model_path: str | None, generation_config: str = "auto",
                            override_generation_config: dict | None = None) -> dict:
    """{SamplingParams field: value} that the model's generation config sets, over vLLM's defaults."""
    if not isinstance(generation_config, (str, Path)):
        raise TypeError(f"generation_config must be 'auto', 'vllm' or a folder, got {generation_config!r}")
    generation_config = str(generation_config)
    defaults: dict = {}
    if generation_config != "vllm":
        folder = model_path if generation_config == "auto" else generation_config
        if generation_config != "auto" and not Path(folder).is_dir():
            raise FileNotFoundError(f"generation_config={generation_config!r}: no such folder (pass 'auto', "
                                    "'vllm' or a folder holding a generation_config.json)")
        file = Path(folder) / "generation_config.json" if folder and Path(folder).is_dir() else None
        if file is not None and file.is_file():
            with open(file, encoding="utf-8") as f:
                config = json.load(f)
            defaults = {ours: config[theirs] for theirs, ours in FIELDS.items() if config.get(theirs) is not None}
    overrides = dict(override_generation_config or {})
    unknown = sorted(set(overrides) - set(FIELDS.values()) - set(FIELDS))
    if unknown:
        raise ValueError(f"override_generation_config: unknown fields {', '.join(unknown)} (known: "
                         f"{', '.join(sorted(set(FIELDS.values())))})")
    defaults.update({FIELDS.get(k, k): v for k, v in overrides.items()})
    return defaults


def with_generation_defaults(body: dict, defaults: dict | None) -> dict:
    """A completion or chat request body with `defaults` for the fields it leaves out (vLLM applies the
    model's generation config the same way: only where the request sets no value). A chat request's
    `max_completion_tokens` counts as setting `max_tokens`."""
    if not defaults:
        return body
    missing = {k: v for k, v in defaults.items() if body.get(k) is None}
    if "max_tokens" in missing and body.get("max_completion_tokens") is not None:
        del missing["max_tokens"]
    return {**body, **missing} if missing else body
