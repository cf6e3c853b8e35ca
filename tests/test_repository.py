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


def imported_modules() -> set[str]:
    """Top-level names of every module the package's sources import."""
    names = set()
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names


def test_every_runtime_dependency_is_imported_by_the_package():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    imported = imported_modules()
    modules_of = importlib.metadata.packages_distributions()  # top-level module -> distributions providing it
    unused = []
    for requirement in declared:
        dist = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
        canonical = re.sub(r"[-_.]+", "-", dist).lower()
        provided = {module for module, dists in modules_of.items()
                    if any(re.sub(r"[-_.]+", "-", d).lower() == canonical for d in dists)}
        if not provided & imported:
            unused.append(dist)
    assert not unused, f"declared in pyproject.toml but imported nowhere in {PACKAGES}: {unused}"


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
