"""Compiled step programs on disk, so that a second start neither compiles nor traces.

JAX's persistent compilation cache keys an entry on the lowered program, so a start must still trace
and lower every program to find its entry: Python work under the GIL, some 0.3-0.7 s for each of the
engine's ~40 programs, which the compile threads cannot share out. This cache keys each program on what
decides it before tracing: the source of `jaxllm` and `pallas_kernels`, the jax and jaxlib versions,
the device, the model config, the step's static arguments and the shapes and dtypes of its arrays. An
entry is the executable serialized by `jax.experimental.serialize_executable`, beside the JAX cache
(`<jax_compilation_cache_dir>/jaxllm-steps/<version>/`, one directory per jaxllm source and jax
version; only the KEEP_VERSIONS most recently used stay). JAXLLM_COMPILATION_CACHE="" turns both off.

A stale or unreadable entry is never fatal: it is logged, dropped and compiled again. Entries are
pickles that load compiled code, so the directory must be as trusted as the code itself (it is the
user's own cache, as JAX's is).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import shutil
from pathlib import Path

import jax
import jaxlib

logger = logging.getLogger("jaxllm")

_PACKAGES = ("jaxllm", "pallas_kernels")
# Environment that changes what a step compiles to (the cache's own location aside).
_ENV_PREFIXES = ("JAXLLM_", "XLA_FLAGS", "JAX_")
_ENV_IGNORED = ("JAXLLM_COMPILATION_CACHE", "JAXLLM_GIT_COMMIT")


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 over every Python file of the packages whose code a step runs."""
    import importlib.util

    h = hashlib.sha256()
    for package in _PACKAGES:
        root = Path(importlib.util.find_spec(package).origin).parent
        for path in sorted(root.rglob("*.py")):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _avals(tree) -> str:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return repr(treedef) + repr([(tuple(x.shape), str(x.dtype)) for x in leaves])


def version_tag() -> str:
    """The code and jax that compiled an entry: entries of other versions can never be hit again."""
    return hashlib.sha256(f"{source_digest()} {jax.__version__} {jaxlib.__version__}".encode()).hexdigest()[:16]


KEEP_VERSIONS = 3


class ExecutableCache:
    """`load(key)` / `store(key, compiled)` of `jax.stages.Compiled` objects under `directory/<version>/`.
    Opening it marks this version's directory as used and deletes all but the KEEP_VERSIONS most recently
    used ones (each holds ~13 MB for the Qwen3-0.6B shape's 42 programs)."""

    def __init__(self, directory: str | os.PathLike):
        self.root = Path(directory)
        self.directory = self.root / version_tag()
        self._prune()

    def _prune(self) -> None:
        try:
            if self.directory.is_dir():
                os.utime(self.directory)
            others = sorted((d for d in self.root.iterdir() if d.is_dir() and d != self.directory),
                            key=lambda d: d.stat().st_mtime, reverse=True)
        except OSError:  # no cache yet, or one we cannot read: nothing to prune
            return
        for stale in others[KEEP_VERSIONS - 1:]:
            shutil.rmtree(stale, ignore_errors=True)

    @classmethod
    def from_jax_config(cls) -> ExecutableCache | None:
        """Beside JAX's persistent cache; None when that is off, and on the CPU. There the engine compiles
        lazily anyway, and jaxlib 0.10.2 cannot run an executable of XLA's CPU thunk runtime loaded
        back ("Function ... not found"; XLA_FLAGS=--xla_cpu_use_thunk_runtime=false can)."""
        base = jax.config.jax_compilation_cache_dir
        if not base or jax.default_backend() == "cpu":
            return None
        return cls(Path(base) / "jaxllm-steps")

    @staticmethod
    def key(device, statics: dict, arrays) -> str:
        """A program's key: everything that decides what it compiles to, none of which needs a trace.
        `statics` are the jit's static arguments (the model config among them), `arrays` the pytree of
        its array arguments (only shapes and dtypes count)."""
        env = sorted((k, v) for k, v in os.environ.items()
                     if k.startswith(_ENV_PREFIXES) and k not in _ENV_IGNORED)
        parts = (source_digest(), jax.__version__, jaxlib.__version__,
                 device.platform, device.device_kind, device.id, device.client.platform_version,
                 jax.config.jax_default_matmul_precision, jax.config.jax_enable_x64,
                 jax.config.jax_default_prng_impl, jax.config.jax_threefry_partitionable, env,
                 sorted(statics.items(), key=lambda kv: kv[0]), _avals(arrays))
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:40]

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.pkl"

    def load(self, key: str, device) -> jax.stages.Compiled | None:
        """The stored program, loaded onto `device`; None when there is none or it cannot be loaded."""
        from jax.experimental.serialize_executable import deserialize_and_load

        path = self._path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            logger.warning("executable cache: cannot read %s (%s); compiling", path, e)
            return None
        try:
            serialized, in_tree, out_tree = pickle.loads(blob)
        except Exception as e:  # a truncated file: compile it again
            logger.warning("executable cache: dropping %s (%s: %s); compiling", path, type(e).__name__, e)
            path.unlink(missing_ok=True)
            return None
        try:
            return deserialize_and_load(serialized, in_tree, out_tree, backend=device.client,
                                        execution_devices=[device])
        except Exception as e:  # e.g. a Mosaic GPU kernel whose runtime is missing: compile (and store) again
            logger.warning("executable cache: loading %s failed (%s: %s); compiling", path, type(e).__name__,
                           str(e)[:300])
            return None

    def store(self, key: str, compiled: jax.stages.Compiled) -> None:
        """Write the program (atomically: a reader never sees half a file). Failures are logged only."""
        from jax.experimental.serialize_executable import serialize

        path = self._path(key)
        try:
            blob = pickle.dumps(serialize(compiled))
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}.{id(compiled)}")
            tmp.write_bytes(blob)
            os.replace(tmp, path)
        except Exception as e:
            logger.warning("executable cache: cannot store %s (%s: %s)", path, type(e).__name__, e)
