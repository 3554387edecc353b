"""Torchvision classifiers pruned to half their MACs: the budget is met within half a percentage point, and
the slim artifact rebuilds, without pickle, into exactly the model that was pruned in memory."""

from __future__ import annotations

import warnings

import models as M
import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch.testing import assert_close

import prunecli
from prunecli.api import prune_model
from prunecli.budget import parse_budget
from prunecli.config import ModelSource, OutputOptions, PruneConfig
from prunecli.io.slim import read_slim_metadata
from prunecli.measure import totals

SHAPE = (3, 64, 64)
MODELS = [
    "resnet18",
    "mobilenet_v2",
    "regnet_y_400mf",
    "efficientnet_b0",
    "googlenet",
    "mnasnet0_5",
    pytest.param("densenet121", marks=pytest.mark.slow),
    pytest.param("vgg11_bn", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("name", MODELS)
def test_half_the_macs_and_an_exact_rebuild(tmp_path, saved_models, name):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # googlenet's init warning
        model = M.randomise_norms(torchvision.models.get_model(name, weights=None), seed=1).eval()
    source = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(source))
    output = tmp_path / "slim.safetensors"
    config = PruneConfig(
        ModelSource(source, arch=f"torchvision:{name}", input_shape=SHAPE), parse_budget("macs", "0.5"),
        output=OutputOptions(output),
    )
    result = prune_model(config)

    x1 = torch.randn(1, *SHAPE, generator=torch.Generator().manual_seed(0))
    assert result.before == totals(model, x1)
    assert abs(result.macs_kept - 0.5) <= 0.005, result.macs_kept
    assert abs(result.deviation_pp) <= 0.5
    assert result.after.params < result.before.params
    assert result.channels_removed > 0

    (pruned,) = saved_models
    loaded = prunecli.load(output)
    assert type(loaded) is type(model) and not loaded.training
    expected = pruned.state_dict()
    state = loaded.state_dict()
    assert list(state) == list(expected)
    for key, tensor in state.items():
        assert tensor.shape == expected[key].shape, key
        assert_close(tensor, expected[key], rtol=0, atol=0, msg=key)

    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = loaded(x), pruned.eval()(x)
    assert got.shape == (2, 1000)
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert totals(loaded, x1) == result.after

    document = read_slim_metadata(output)
    assert document["arch"] == {"spec": f"torchvision:{name}", "kwargs": {}}
    assert document["input_shape"] == list(SHAPE)
    assert document["achieved"] == {"macs": result.after.macs, "params": result.after.params}
