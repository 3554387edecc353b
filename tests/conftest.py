"""Shared fixtures: every test starts from the same global torch seed."""

import pytest
import torch
from models import torch_threads


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Two busy cores: one intra-op thread is many times faster than two fighting over them."""
    with torch_threads(1):
        yield


@pytest.fixture
def saved_models(monkeypatch):
    """The in-memory pruned models that prune_model hands to save_slim, in order."""
    import prunecli.io.slim as slim_module

    models = []
    original = slim_module.save_slim

    def spy(model, path, **kwargs):
        models.append(model)
        return original(model, path, **kwargs)

    monkeypatch.setattr(slim_module, "save_slim", spy)
    return models
