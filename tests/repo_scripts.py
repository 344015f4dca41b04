"""Loading the repository's benchmark and script files (not an installed package) as modules in tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_repo_module(relative_path: str) -> ModuleType:
    """The file at ``relative_path`` under the repository root (e.g. ``"benchmarks/quality_video.py"``), run as a module."""
    path = REPO / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None, f"cannot load {path}"
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
