"""Fixtures shared by the kernel tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """torch and the kernels on one thread for the test; the kernels' thread count back to its default after."""
    from strataprune import kernels

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    kernels.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
    kernels.set_num_threads(None)
