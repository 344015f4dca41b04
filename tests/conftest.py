"""Shared test fixtures, and the guard that tests write no tracked file."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
#: Tracked paths a test could be tempted to write (results, shipped checkpoints): their contents must be
#: the same after a run as before it (``--update-results`` lets the matrix rewrite its compatibility files).
GUARDED = ("benchmarks/results", "multiexplain/checkpoints")
UPDATED_BY_OPTION = ("benchmarks/results/compatibility.json", "benchmarks/results/compatibility.md")


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for modules whose tensors are tiny: on a busy 2-core machine a second
    thread mostly synchronises (10-20x slower); the previous setting is restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_addoption(parser):
    parser.addoption(
        "--update-results", action="store_true", default=False,
        help="write the compatibility matrix's results into benchmarks/results/ (tests write no tracked file otherwise)",
    )


def _tracked_digests() -> dict[str, str] | None:
    """``{path: sha256}`` of the tracked files under :data:`GUARDED` (``None`` outside a git checkout)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", *GUARDED], cwd=REPO, capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    names = [name for name in listed.stdout.decode().split("\0") if name]
    return {name: hashlib.sha256((REPO / name).read_bytes()).hexdigest() if (REPO / name).is_file() else "missing"
            for name in names}


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # the controller only, not each xdist worker
        session.config.stash[_DIGESTS] = _tracked_digests()


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):
        return
    before = session.config.stash.get(_DIGESTS, None)
    after = _tracked_digests()
    if before is None or after is None:
        return
    allowed = UPDATED_BY_OPTION if session.config.getoption("--update-results") else ()
    changed = sorted(name for name in set(before) | set(after) if before.get(name) != after.get(name) and name not in allowed)
    if changed:
        print("\nThe test run changed tracked files (tests must write under tmp_path; results are refreshed only by "
              "their scripts or --update-results):\n  " + "\n  ".join(changed), file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_DIGESTS = pytest.StashKey[dict]()
