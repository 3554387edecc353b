"""Shared fixtures: every test starts from the same global torch seed."""

import pytest
import torch


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Two busy cores: one intra-op thread is many times faster than two fighting over them."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
