"""Model names as a vLLM user types them: a local path, or a Hugging Face id found in the local cache.

`LLM("Qwen/Qwen2.5-1.5B-Instruct")` and `jaxllm serve Qwen/Qwen2.5-1.5B-Instruct` read the snapshot that
`huggingface_hub` keeps under `$HF_HUB_CACHE` (default `$HF_HOME/hub`, i.e. ~/.cache/huggingface/hub):
`models--Qwen--Qwen2.5-1.5B-Instruct/snapshots/<commit>/`, with `refs/<revision>` naming the commit.
Nothing is downloaded: a model that is not in the cache is an error that names the id and the folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def resolve_model_path(model: str, revision: str | None = None, download_dir: str | None = None) -> str:
    """The local path for `model`: itself when it exists on disk, else the cached snapshot of the Hugging
    Face repository `model` (ORG/NAME) at `revision` (a branch, tag or commit; default "main").

    download_dir: the Hugging Face cache folder to look in (vLLM's name); default: huggingface_hub's.
    Raises FileNotFoundError naming the id, the revision and the folder looked in."""
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"model must be a path or a Hugging Face id (a string), got {type(model).__name__}")
    model = os.fspath(model)
    if Path(model).expanduser().exists():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to Hugging Face ids; {model} is a local path")
        return str(Path(model).expanduser())
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache_dir = download_dir or constants.HF_HUB_CACHE
    try:
        return snapshot_download(model, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except HFValidationError:
        raise FileNotFoundError(f"no such model path: {model} (nor is it a Hugging Face id such as "
                                "ORG/NAME)") from None
    except LocalEntryNotFoundError:
        at = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(
            f"model {model!r}{at} is neither a local path nor in the local Hugging Face cache (looked in "
            f"{cache_dir}, which $HF_HUB_CACHE or $HF_HOME set); jaxllm downloads nothing: fetch it with "
            f"`hf download {model}` or pass a local path") from None
