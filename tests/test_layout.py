"""The dependency rule, checked: the core imports only torch, nothing below imports what is above.

Groups, lowest first (a module may import its own group and the groups listed for it):
core -> explain -> data -> models -> metrics, viz -> adapters -> io, sources, store, report, zoo, losses,
train, torchdistill_losses, evaluation, dataset_run -> demo, cli. Lazy (function-level) imports count too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "explain": {"core"},
    "data": set(),
    "models": {"data"},
    "metrics": {"core", "explain"},
    "viz": set(),
    "adapters": {"core", "explain", "viz"},
    "io": {"viz"},
    "sources": set(),
    "store": set(),
    "report": {"io"},
    "zoo": {"explain", "models", "data", "sources", "adapters"},  # adapters: the captioning families it loads
    "losses": {"core", "explain", "adapters", "models"},
    "train": {"explain", "losses", "models", "data"},
    "torchdistill_losses": {"core", "explain", "adapters", "losses"},
    "evaluation": {"core", "explain", "metrics", "adapters", "data", "train"},
    "demo": {"core", "explain", "metrics", "adapters", "data", "models", "evaluation", "io", "report", "viz"},
    "dataset_run": {"metrics", "sources", "store", "zoo", "io", "adapters", "explain", "report"},
    "cli": {"core", "explain", "metrics", "adapters", "data", "models", "evaluation", "io", "report", "viz",
            "zoo", "demo", "train", "dataset_run"},
}
ROOT_MODULES = {"__init__": {"core", "explain"}, "__main__": {"cli"}}


def _group(path: Path) -> str:
    """The group of a source file: its subpackage or module name under multiexplain/, or 'adapters'."""
    relative = path.relative_to(ROOT)
    if relative.parts[0] == "adapters":
        return "adapters"
    parts = relative.parts[1:]
    return parts[0] if len(parts) > 1 else Path(parts[0]).stem


def _imported_groups(path: Path) -> set[str]:
    """The multiexplain groups a file imports (absolute or relative, at any depth)."""
    tree = ast.parse(path.read_text())
    package = list(path.relative_to(ROOT).with_suffix("").parts)
    if package[0] == "adapters":
        package = ["multiexplain", "adapters", *package[1:]]
    found = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level]
                module = ".".join(base + ([node.module] if node.module else []))
                names = [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
            else:
                names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "multiexplain" and len(parts) > 1 and not parts[1].startswith("__"):
                found.add(parts[1])
    return found


SOURCES = sorted(list((ROOT / "multiexplain").rglob("*.py")) + list((ROOT / "adapters").glob("*.py")))


@pytest.mark.parametrize("path", SOURCES, ids=[str(p.relative_to(ROOT)) for p in SOURCES])
def test_every_module_imports_only_groups_below_it(path):
    group = _group(path)
    if path.parent == ROOT / "multiexplain" and path.stem in ROOT_MODULES:
        allowed = ROOT_MODULES[path.stem]
    else:
        assert group in ALLOWED, f"{path} is in no group of the layout; add it to ALLOWED"
        allowed = ALLOWED[group]
    wrong = _imported_groups(path) - allowed - {group}
    assert not wrong, f"{path.relative_to(ROOT)} ({group}) imports {sorted(wrong)}, which are not below it"


def test_importing_the_core_loads_no_adapter_application_or_heavy_library():
    code = (
        "import sys, multiexplain, multiexplain.core, multiexplain.explain, multiexplain.explain.families\n"
        "bad = ('multiexplain.adapters', 'multiexplain.cli', 'multiexplain.demo', 'multiexplain.io', 'PIL', 'av',\n"
        "       'matplotlib', 'transformers', 'pytorchvideo', 'torchvision')\n"
        "print([m for m in sys.modules if m.split('.')[0] in bad or any(m.startswith(b + '.') or m == b for b in bad)])\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", run.stdout


def _packages_under(folder: Path, name: str) -> set[str]:
    """Dotted names of ``folder`` and every subfolder with an ``__init__.py``, installed as ``name``."""
    return {".".join([name, *init.parent.relative_to(folder).parts]) for init in folder.rglob("__init__.py")}


def test_every_package_is_installed_by_a_non_editable_install():
    # setuptools installs only the packages listed in pyproject.toml; a subpackage missing there
    # works in an editable checkout and is absent from the wheel users get.
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = _packages_under(ROOT / "multiexplain", "multiexplain") | _packages_under(ROOT / "adapters", "multiexplain.adapters")
    assert on_disk - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(on_disk - listed)}"
    assert listed - on_disk == set(), f"listed but not on disk: {sorted(listed - on_disk)}"
