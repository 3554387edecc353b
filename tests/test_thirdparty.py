"""MONAI and segmentation_models_pytorch models as their users type them (a state dict, ``--arch
package.module:Class --arch-kwargs ...``), small enough for the default suite: a 3-D MONAI UNet through every
command on volumes (``--input-shape 1x16x16x16``, a tensor file of [N, C, D, H, W]), a 3-D MONAI classifier
evaluated on volumes, a 2-D BasicUNet and an smp Unet pruned to half their MACs, reloaded and exported. The slow
walk over every architecture is tests/test_coverage_thirdparty_slow.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import prunecli
from prunecli.cli import app

runner = CliRunner()
UNET_3D = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32, 64], "strides": [2, 2, 2],
           "num_res_units": 1}


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def state_dict_of(model: torch.nn.Module, path):
    torch.manual_seed(0)
    torch.save(model.state_dict(), path)
    return path


def pruned_to_half(path, arch: str, kwargs: dict, shape: str, *extra) -> dict:
    """``prune --flops-target 0.5 --json`` of the state dict: the report, after checking the budget was met."""
    out = path.with_suffix(".slim.safetensors")
    report = json.loads(invoke("prune", path, "--arch", arch, "--arch-kwargs", json.dumps(kwargs), "--input-shape",
                               shape, "--flops-target", "0.5", "-o", out, "--json", *extra).stdout)
    assert abs(report["macs_kept"] - 0.5) <= 0.005
    return report


def test_monai_3d_unet_through_every_command(tmp_path):
    """analyze, score, prune (with an activation criterion on volumes), reload and ONNX export of a 3-D UNet."""
    nets = pytest.importorskip("monai.networks.nets")
    arch, kwargs = "monai.networks.nets:UNet", json.dumps(UNET_3D)
    model = nets.UNet(**UNET_3D).eval()
    sd = state_dict_of(model, tmp_path / "unet3d.pt")
    volumes = tmp_path / "volumes.safetensors"
    save_file({"images": torch.randn(4, 1, 16, 16, 16)}, str(volumes))
    common = ("--arch", arch, "--arch-kwargs", kwargs, "--input-shape", "1x16x16x16")

    groups = json.loads(invoke("analyze", sd, *common, "--json").stdout)["groups"]
    held = [g["reason"] for g in groups if not g["prunable"]]
    # a group per level down (3), the bottom and a level up (3, the last feeding the output): every skip prunes
    assert held == ["feeds the model output"] and len(groups) == 7
    invoke("score", sd, *common, "--method", "dct", "--data", volumes, "--calib-images", "4", "--batch-size", "2",
           "-o", tmp_path / "scores.json")
    assert len(json.loads((tmp_path / "scores.json").read_text())["groups"]) == 6

    pruned_to_half(sd, arch, UNET_3D, "1x16x16x16", "--scores", tmp_path / "scores.json")
    slim = tmp_path / "unet3d.slim.safetensors"
    reloaded = prunecli.load(slim, trust_code=True)
    with torch.no_grad():
        assert reloaded(torch.randn(2, 1, 16, 16, 16)).shape == (2, 2, 16, 16, 16)
    invoke("export", slim, "--arch", arch, "-o", tmp_path / "unet3d.onnx")
    assert (tmp_path / "unet3d.onnx").stat().st_size > 0


def test_a_monai_3d_classifier_evaluates_on_a_tensor_file_of_volumes(tmp_path):
    nets = pytest.importorskip("monai.networks.nets")
    kwargs = {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [8, 16, 32, 64], "spatial_dims": 3,
              "n_input_channels": 1, "num_classes": 2}
    model = nets.ResNet(**kwargs).eval()
    sd = state_dict_of(model, tmp_path / "resnet3d.pt")
    volumes = torch.randn(6, 1, 16, 16, 16)
    with torch.no_grad():
        labels = model(volumes).argmax(1)  # its own predictions: top-1 is 100%
    save_file({"images": volumes, "labels": labels}, str(tmp_path / "volumes.safetensors"))
    report = json.loads(invoke("evaluate", sd, "--arch", "monai.networks.nets:ResNet", "--arch-kwargs",
                               json.dumps(kwargs), "--input-shape", "1x16x16x16", "--data",
                               tmp_path / "volumes.safetensors", "--json").stdout)
    assert report["metrics"]["top1"] == 1.0 and report["metrics"]["images"] == 6


def test_monai_2d_basicunet_prunes_to_half_and_reloads(tmp_path):
    nets = pytest.importorskip("monai.networks.nets")
    kwargs = {"spatial_dims": 2, "in_channels": 1, "out_channels": 2, "features": [8, 8, 16, 32, 64, 8]}
    sd = state_dict_of(nets.BasicUNet(**kwargs), tmp_path / "basicunet.pt")
    report = pruned_to_half(sd, "monai.networks.nets:BasicUNet", kwargs, "1x32x32")
    assert report["groups_pruned"] >= 10  # the encoder's skips into the decoder's concats prune too
    reloaded = prunecli.load(tmp_path / "basicunet.slim.safetensors", trust_code=True)
    with torch.no_grad():
        assert reloaded(torch.randn(1, 1, 32, 32)).shape == (1, 2, 32, 32)


def test_smp_unet_prunes_to_half_reloads_and_exports(tmp_path):
    smp = pytest.importorskip("segmentation_models_pytorch")
    kwargs = {"encoder_name": "resnet18", "encoder_weights": None, "encoder_depth": 3, "decoder_channels": [32, 16, 8],
              "classes": 2}
    sd = state_dict_of(smp.Unet(**kwargs), tmp_path / "unet.pt")
    pruned_to_half(sd, "segmentation_models_pytorch:Unet", kwargs, "3x32x32")
    slim = tmp_path / "unet.slim.safetensors"
    with torch.no_grad():
        assert prunecli.load(slim, trust_code=True)(torch.randn(1, 3, 32, 32)).shape == (1, 2, 32, 32)
    invoke("export", slim, "--arch", "segmentation_models_pytorch:Unet", "-o", tmp_path / "unet.onnx")
    assert (tmp_path / "unet.onnx").stat().st_size > 0
