"""``--arch timm:NAME``: building without weights, its errors, default inputs, recognising bare timm state dicts,
and small timm models pruned to half their MACs and reloaded from the slim file without pickle: a CNN, a ViT, an NFNet
(its convs hold a per-channel ``gain``) and a PoolFormerV2 (bias-free GroupNorms, scales that reshape by ``shape``);
slim files that name timm models as they did before ``timm:NAME`` (``timm:create_model`` with a ``model_name``)."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

import prunecli
from prunecli.api import prune_model
from prunecli.budget import parse_budget
from prunecli.config import ModelSource, OutputOptions, PruneConfig
from prunecli.errors import ArchitectureError
from prunecli.io.arch import ArchSpec, build_model, default_input, detect_timm_arch
from prunecli.io.formats import load_model
from prunecli.io.slim import read_slim_metadata

timm = pytest.importorskip("timm")


def test_timm_spec_builds_the_named_model_with_its_kwargs():
    model = build_model(ArchSpec("timm:test_resnet", {"num_classes": 7}))
    assert type(model).__name__ == "ResNet" and not model.training
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_unknown_timm_name_names_close_matches():
    with pytest.raises(ArchitectureError) as exc:
        build_model(ArchSpec("timm:resnet181"))
    message = str(exc.value)
    assert "unknown timm model 'resnet181'" in message and "resnet18" in message
    assert "timm.list_models()" in message and "\n" not in message


def test_timm_kwargs_that_would_load_weights_are_refused():
    with pytest.raises(ArchitectureError, match="checkpoint_path would load weights"):
        build_model(ArchSpec("timm:test_resnet", {"checkpoint_path": "/tmp/elsewhere.pth"}))


def test_bad_timm_kwargs_are_an_architecture_error():
    with pytest.raises(ArchitectureError, match="--arch-kwargs"):
        build_model(ArchSpec("timm:test_resnet", {"no_such_option": 1}))


def test_without_timm_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(ArchitectureError, match=r"pip install prunecli\[timm\]"):
        build_model(ArchSpec("timm:test_resnet"))


def test_default_input_comes_from_the_pretrained_config():
    vit = default_input(ArchSpec("timm:vit_tiny_patch16_224"))
    assert vit.shape == (3, 224, 224) and vit.mean == (0.5, 0.5, 0.5) and vit.std == (0.5, 0.5, 0.5)
    assert default_input(ArchSpec("timm:resnet18")).mean == (0.485, 0.456, 0.406)
    assert default_input(ArchSpec("timm:test_vit", {"img_size": 96})).shape == (3, 96, 96)
    gray = default_input(ArchSpec("timm:resnet18", {"in_chans": 1}))
    assert gray.shape == (1, 224, 224) and len(gray.mean) == len(gray.std) == 1


def test_bare_timm_state_dict_is_recognised(tmp_path):
    model = timm.create_model("starnet_s050", num_classes=10).eval()
    path = tmp_path / "starnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    loaded = load_model(path, input_shape=(3, 64, 64))
    assert loaded.arch == ArchSpec("timm:starnet_s050", {"num_classes": 10})
    assert any("timm:starnet_s050" in note for note in loaded.notes)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(loaded.model(x), model(x), rtol=0, atol=0)


def meta_state(name: str) -> dict[str, torch.Tensor]:
    """The keys and shapes of a timm model, without memory: recognition reads nothing else."""
    with torch.device("meta"):
        return timm.create_model(name).state_dict()


def test_weights_that_two_timm_models_share_name_both():
    with pytest.raises(ArchitectureError) as exc:
        detect_timm_arch(meta_state("coat_lite_medium"))  # its 384 variant differs only in the input size
    assert "match 2 timm models (coat_lite_medium, coat_lite_medium_384); pass --arch timm:NAME" in str(exc.value)


def test_a_layout_hundreds_of_timm_models_share_asks_for_the_name():
    with pytest.raises(ArchitectureError, match=r"layout of \d{3} timm models .*; pass --arch timm:NAME"):
        detect_timm_arch(meta_state("vit_tiny_patch16_224"))


def test_weights_of_no_timm_model_are_not_recognised():
    assert detect_timm_arch({"conv.weight": torch.zeros(4, 3, 3, 3), "fc.weight": torch.zeros(10, 4)}) is None


# ----------------------------------------------------------------------------- pruned end to end


@pytest.mark.parametrize(
    ("name", "kwargs", "kind"),
    [("test_efficientnet", {}, "EfficientNet"), ("test_vit", {"img_size": 64, "depth": 2}, "VisionTransformer"),
     ("test_nfnet", {}, "NormFreeNet"), ("poolformerv2_s12", {}, "MetaFormer")],
)
def test_half_the_macs_and_an_exact_reload(tmp_path, saved_models, one_thread, name, kwargs, kind):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    source = tmp_path / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(source))
    output = tmp_path / "slim.safetensors"
    source_spec = ModelSource(source, arch=f"timm:{name}", arch_kwargs=kwargs, input_shape=(3, 64, 64))
    result = prune_model(PruneConfig(source_spec, parse_budget("macs", "0.5"), output=OutputOptions(output)))
    assert abs(result.macs_kept - 0.5) <= 0.005, result.macs_kept
    assert result.after.params < result.before.params

    (pruned,) = saved_models
    loaded = prunecli.load(output)  # a timm spec rebuilds without --trust-pickle
    assert type(loaded).__name__ == kind
    expected = pruned.state_dict()
    assert {k: v.shape for k, v in loaded.state_dict().items()} == {k: v.shape for k, v in expected.items()}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = loaded(x), pruned.eval()(x)
    assert got.shape == (2, 1000)
    assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert read_slim_metadata(output)["arch"] == {"spec": f"timm:{name}", "kwargs": kwargs}


def test_cli_unknown_timm_name_is_one_line_and_exit_1(tmp_path):
    from typer.testing import CliRunner

    from prunecli.cli import app

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.zeros(1)}, str(path))
    result = CliRunner().invoke(app, ["analyze", str(path), "--arch", "timm:resnet181"])
    assert result.exit_code == 1
    assert "unknown timm model 'resnet181'" in result.output and "Traceback" not in result.output


# ----------------------------------------------------------------------------- the spec before timm:NAME


def _legacy_slim(tmp_path, one_thread) -> tuple:
    """A slim test_resnet pruned to half its MACs, its document rewritten by hand to name the architecture as
    files did before ``timm:NAME``: ``timm:create_model`` with the model's name in the kwargs."""
    from safetensors import safe_open

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10).eval()
    source = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(source))
    current = tmp_path / "current.safetensors"
    spec = ModelSource(source, arch="timm:test_resnet", arch_kwargs={"num_classes": 10}, input_shape=(3, 32, 32))
    prune_model(PruneConfig(spec, parse_budget("macs", "0.5"), output=OutputOptions(current)))
    with safe_open(str(current), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (safe_open is no mapping)
        document = json.loads(handle.metadata()["prunecli"])
    assert document["arch"] == {"spec": "timm:test_resnet", "kwargs": {"num_classes": 10}}
    document["arch"] = {"spec": "timm:create_model", "kwargs": {"model_name": "test_resnet", "num_classes": 10,
                                                                 "pretrained": False}}
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={"prunecli": json.dumps(document, sort_keys=True)})
    return current, old


def test_a_slim_file_naming_timm_create_model_still_rebuilds(tmp_path, one_thread):
    current, old = _legacy_slim(tmp_path, one_thread)
    assert read_slim_metadata(old)["arch"]["spec"] == "timm:create_model"
    loaded, expected = prunecli.load(old), prunecli.load(current)  # no --trust-pickle: timm builds without code
    assert type(loaded).__name__ == "ResNet"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(loaded(x), expected(x), rtol=0, atol=0)


def test_timm_create_model_spec_builds_and_sizes_the_named_model():
    spec = ArchSpec("timm:create_model", {"model_name": "test_vit", "img_size": 96, "num_classes": 7})
    assert type(build_model(spec)).__name__ == "VisionTransformer"
    assert default_input(spec).shape == (3, 96, 96)
    with pytest.raises(ArchitectureError, match='needs "model_name" in --arch-kwargs; or pass --arch timm:NAME'):
        build_model(ArchSpec("timm:create_model", {"num_classes": 7}))


def test_cli_reads_and_prunes_a_slim_file_naming_timm_create_model(tmp_path, one_thread):
    from typer.testing import CliRunner

    from prunecli.cli import app

    _, old = _legacy_slim(tmp_path, one_thread)
    analyzed = CliRunner().invoke(app, ["analyze", str(old), "--json"])
    assert analyzed.exit_code == 0, analyzed.output
    assert json.loads(analyzed.stdout)["model"]["input_shape"] == [3, 32, 32]
    again = tmp_path / "again.safetensors"
    pruned = CliRunner().invoke(app, ["prune", str(old), "--ratio", "0.2", "-o", str(again), "-q"])
    assert pruned.exit_code == 0, pruned.output
    assert read_slim_metadata(again)["arch"]["spec"] == "timm:create_model"
    assert type(prunecli.load(again)).__name__ == "ResNet"
