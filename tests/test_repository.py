"""The repository reads as a product: every declared runtime dependency is used by the package, and no file
speaks of the development's own sittings (the numbered diary of who measured what when): figures are named
by date and commit."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("jaxllm", "pallas_kernels")

# "session" as a word of prose; not an identifier (ClientSession, requests.Session(), session_id) nor a quoted
# string such as pytest's scope="session".
DIARY_WORD = re.compile(r"(?<![\w.\"'])sessions?(?![\w\"(])", re.IGNORECASE)


def tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in out.decode().split("\0") if name]


def imported_modules(folders) -> set[str]:
    """Top-level names of every module that the Python files under `folders` import."""
    names = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def unused(requirements: list[str], imported: set[str]) -> list[str]:
    """The requirements none of whose top-level modules is imported."""
    modules_of = importlib.metadata.packages_distributions()  # top-level module -> distributions providing it
    canonical = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    left = []
    for requirement in requirements:
        dist = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
        provided = {module for module, dists in modules_of.items()
                    if any(canonical(d) == canonical(dist) for d in dists)}
        if not provided & imported:
            left.append(dist)
    return left


def test_every_runtime_dependency_is_imported_by_the_package():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    left = unused(declared, imported_modules(PACKAGES))
    assert not left, f"declared in pyproject.toml but imported nowhere in {PACKAGES}: {left}"


# Dev dependencies that a library the tests use imports, not the tests themselves, and why.
IMPORTED_BY_LIBRARIES = {"absl-py": "jax.experimental.pallas.mosaic_gpu, which tests/test_kernels.py lowers"}


def test_every_dev_dependency_is_imported_by_the_tests_or_benchmarks():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    left = [d for d in unused(declared, imported_modules(("tests", "benchmarks", "examples")))
            if d not in IMPORTED_BY_LIBRARIES]
    assert not left, f"declared as dev dependencies but imported nowhere in tests, benchmarks or examples: {left}"


# Folders whose scripts run with their own folder first on sys.path (python benchmarks/X.py), or that the tests
# put there: a module of theirs named like an installed package's stands in for it everywhere in that process.
SCRIPT_FOLDERS = ("benchmarks", "tests", "tests/gpu", "examples")


def test_no_script_shadows_an_installed_package():
    """benchmarks/kernels.py once stood in for Hugging Face's `kernels`, which transformers imports: each
    script folder's module names must be free of every installed distribution's top-level modules."""
    installed = importlib.metadata.packages_distributions()
    clashes = [f"{folder}/{path.name} hides {installed[path.stem]}" for folder in SCRIPT_FOLDERS
               for path in sorted((ROOT / folder).glob("*.py")) if path.stem in installed]
    assert not clashes, clashes


def test_diary_word_pattern():
    assert DIARY_WORD.search("the eighth session's kernel") and DIARY_WORD.search("Sessions 3-5")
    for legitimate in ('aiohttp.ClientSession()', 'requests.Session()', '@pytest.fixture(scope="session")',
                       "session_id = 3", "self.session.get(url)"):
        assert not DIARY_WORD.search(legitimate), legitimate


def test_no_file_speaks_of_development_sessions():
    found = []
    for path in tracked_files():
        if path == Path(__file__).resolve():  # the pattern's own examples
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if DIARY_WORD.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not found, "name figures by date and commit instead:\n" + "\n".join(found[:40])
