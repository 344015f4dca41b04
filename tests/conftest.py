"""Shared test fixtures."""

import pytest
import torch


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
