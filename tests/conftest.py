"""Shared fixtures: every test starts from the same global torch seed."""

import pytest
import torch


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)
    yield
