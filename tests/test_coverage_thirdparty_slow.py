"""segmentation_models_pytorch, MONAI and transformers models through prune (l1, half the MACs), reload and ONNX
export, as their users type them (smp and MONAI: a state dict and ``--arch package.module:Class`` with
``--arch-kwargs``; transformers: the folder ``save_pretrained`` writes, ``prunecli prune ./folder/ --flops-target 0.5
-o ...`` through the CLI); writes docs/coverage-thirdparty.md.

smp: every architecture of the installed version with three encoders (``encoder_weights=None``: nothing is
downloaded). MONAI: its segmentation networks in 2-D and 3-D, and three of its classifiers. transformers: its image
classifiers (``AutoModelForImageClassification``) that build small from a config. As in
tests/test_coverage_timm_slow.py each model runs in its own process with a hard limit, and a model prunecli cannot
handle must say so with a one-line PrunecliError; here the pruned slim file must also export to ONNX (verified
against onnxruntime) for the row to pass.

Run: ``.venv/bin/pytest -m slow tests/test_coverage_thirdparty_slow.py`` (``-k`` selects rows by id, e.g.
``-k monai``; the table keeps the rows of those not run). ``python tests/test_coverage_thirdparty_slow.py --worker ID
DIR`` runs one.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
from coverage_walk import (
    TOLERANCE,
    check,
    check_reload,
    existing_rows,
    export_onnx,
    failure,
    prune_and_reload,
    run_worker,
    saved_models,
    verdict,
)
from test_coverage_slow import _cell, _human

TRACE_TIMEOUT = 120.0
HARD_LIMIT = 900  # seconds for one model's process before it counts as a hang
DOC = Path(__file__).resolve().parent.parent / "docs" / "coverage-thirdparty.md"
SMP_SIZE = 128  # smp: 3x128x128 (every architecture takes a multiple of 32)
MONAI_2D, MONAI_3D = (1, 96, 96), (1, 32, 32, 32)  # MONAI: one-channel images and volumes
SMP_ENCODERS = ("resnet18", "efficientnet-b0", "mobilenet_v2")
HF_SIZE = 64  # transformers: 3x64x64, the size each config below is built for
_VIT = {"image_size": HF_SIZE, "patch_size": 8, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 128}
_SWIN = {"image_size": HF_SIZE, "patch_size": 4, "embed_dim": 32, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 4, 8],
         "window_size": 2}
_STAGES = {"hidden_sizes": [32, 64, 128, 256], "depths": [1, 1, 2, 1]}
_PYRAMID = {"hidden_sizes": [32, 64, 128, 256], "depths": [1, 1, 1, 1], "num_attention_heads": [1, 2, 4, 8]}
# row -> (transformers class, its config's fields other than their defaults): the installed transformers' image
# classifiers that build small from a config (multimodal towers, DiNAT (natten) and the timm wrapper aside)
HF_MODELS = {
    "BEiT": ("BeitForImageClassification", _VIT),
    "BiT": ("BitForImageClassification", {"embedding_size": 64, "hidden_sizes": [128, 256, 512, 1024],
                                          "depths": [1, 1, 1, 1]}),
    "ConvNeXt": ("ConvNextForImageClassification", {**_STAGES, "image_size": HF_SIZE}),
    "ConvNeXtV2": ("ConvNextV2ForImageClassification", {**_STAGES, "image_size": HF_SIZE}),
    "CvT": ("CvtForImageClassification", {"embed_dim": [32, 64, 128], "num_heads": [1, 2, 4], "depth": [1, 2, 3]}),
    "Data2VecVision": ("Data2VecVisionForImageClassification", _VIT),
    "DeiT": ("DeiTForImageClassification", _VIT),
    "DINOv2": ("Dinov2ForImageClassification", {**_VIT, "mlp_ratio": 2}),
    "DINOv2-registers": ("Dinov2WithRegistersForImageClassification", {**_VIT, "mlp_ratio": 2}),
    "DonutSwin": ("DonutSwinForImageClassification", _SWIN),
    "EfficientNet": ("EfficientNetForImageClassification", {"width_coefficient": 1.0, "depth_coefficient": 1.0,
                                                            "hidden_dim": 1280, "image_size": HF_SIZE}),
    "FocalNet": ("FocalNetForImageClassification", {"image_size": HF_SIZE, "embed_dim": 32, "depths": [1, 1, 2, 1]}),
    "HGNetV2": ("HGNetV2ForImageClassification", {}),
    "Hiera": ("HieraForImageClassification", {"embed_dim": 32, "image_size": [HF_SIZE, HF_SIZE],
                                              "depths": [1, 1, 2, 1]}),
    "I-JEPA": ("IJepaForImageClassification", _VIT),
    "LeViT": ("LevitForImageClassification", {"image_size": HF_SIZE, "hidden_sizes": [64, 96, 128],
                                              "num_attention_heads": [2, 3, 4], "depths": [1, 1, 1],
                                              "key_dim": [16, 16, 16]}),
    "MobileNetV1": ("MobileNetV1ForImageClassification", {"depth_multiplier": 0.5, "image_size": HF_SIZE}),
    "MobileNetV2": ("MobileNetV2ForImageClassification", {"depth_multiplier": 0.5, "image_size": HF_SIZE}),
    "MobileViT": ("MobileViTForImageClassification", {"image_size": HF_SIZE}),
    "MobileViTV2": ("MobileViTV2ForImageClassification", {"image_size": HF_SIZE, "width_multiplier": 0.5}),
    "PoolFormer": ("PoolFormerForImageClassification", _STAGES),
    "PPLCNet": ("PPLCNetForImageClassification", {}),
    "PVT": ("PvtForImageClassification", {**_PYRAMID, "image_size": HF_SIZE}),
    "PVTv2": ("PvtV2ForImageClassification", _PYRAMID),
    "RegNet": ("RegNetForImageClassification", {"embedding_size": 32, **_STAGES, "groups_width": 16}),
    "ResNet": ("ResNetForImageClassification", {"embedding_size": 32, "hidden_sizes": [32, 64, 128, 256],
                                                "depths": [1, 1, 1, 1], "layer_type": "bottleneck"}),
    "SegFormer": ("SegformerForImageClassification", _PYRAMID),
    "SwiftFormer": ("SwiftFormerForImageClassification", {"embed_dims": [24, 32, 64, 128], "depths": [1, 1, 1, 1]}),
    "Swin": ("SwinForImageClassification", _SWIN),
    "Swinv2": ("Swinv2ForImageClassification", _SWIN),
    "TextNet": ("TextNetForImageClassification", {}),
    "ViT": ("ViTForImageClassification", _VIT),
    "ViT-MSN": ("ViTMSNForImageClassification", _VIT),
}


def smp_architectures() -> list[str]:
    """The architectures of the installed smp; DPT's encoders are only ViTs, which none of ``SMP_ENCODERS`` is."""
    try:
        import segmentation_models_pytorch as smp
    except ImportError:
        return []
    return sorted(cls.__name__ for cls in smp.MODEL_ARCHITECTURES_MAPPING.values() if cls.__name__ != "DPT")


def monai_cases() -> dict[str, tuple[str, dict, tuple[int, ...]]]:
    nets = "monai.networks.nets"
    cases = {}
    for dims, shape in ((2, MONAI_2D), (3, MONAI_3D)):
        common = {"spatial_dims": dims, "in_channels": 1, "out_channels": 2}
        cases.update({
            f"monai-UNet-{dims}d": (f"{nets}:UNet", {**common, "channels": [16, 32, 64, 128, 256],
                                                     "strides": [2, 2, 2, 2], "num_res_units": 2}, shape),
            f"monai-BasicUNet-{dims}d": (f"{nets}:BasicUNet", common, shape),
            f"monai-SegResNet-{dims}d": (f"{nets}:SegResNet", common, shape),
            f"monai-DynUNet-{dims}d": (f"{nets}:DynUNet", {**common, "kernel_size": [3, 3, 3, 3],
                                                           "strides": [1, 2, 2, 2], "upsample_kernel_size": [2, 2, 2]},
                                       shape),
            f"monai-DenseNet121-{dims}d": (f"{nets}:DenseNet121", common, shape),
            f"monai-ResNet18-{dims}d": (f"{nets}:resnet18", {"spatial_dims": dims, "n_input_channels": 1,
                                                             "num_classes": 2}, shape),
        })
    cases["monai-EfficientNetBN-b0-2d"] = (f"{nets}:EfficientNetBN", {
        "model_name": "efficientnet-b0", "pretrained": False, "spatial_dims": 2, "in_channels": 1, "num_classes": 2},
        MONAI_2D)
    return dict(sorted(cases.items()))


def hf_cases() -> dict[str, tuple[str, dict, tuple[int, ...]]]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return {}
    return {f"hf-{label}": (f"hf:{name}", {**fields, "num_labels": 10}, (3, HF_SIZE, HF_SIZE))
            for label, (name, fields) in sorted(HF_MODELS.items())}


def cases() -> dict[str, tuple[str, dict, tuple[int, ...]]]:
    """Row id -> (``--arch``, ``--arch-kwargs``, input shape); for transformers, (``hf:CLASS``, its config's
    fields, input shape)."""
    found = {
        f"smp-{arch}-{encoder}": (f"segmentation_models_pytorch:{arch}",
                                  {"encoder_name": encoder, "encoder_weights": None, "classes": 2},
                                  (3, SMP_SIZE, SMP_SIZE))
        for arch in smp_architectures() for encoder in SMP_ENCODERS
    }
    try:
        import monai  # noqa: F401
    except ImportError:
        return {**found, **hf_cases()}
    return {**found, **monai_cases(), **hf_cases()}


# ----------------------------------------------------------------------------- the worker (own process)


def worker(case: str, folder: Path) -> dict:
    """One row in this process: build the model with random weights, save it as its users do, prune, reload and
    compare, export to ONNX; a refusal or failure recorded with the stage it happened in."""
    import torch

    torch.set_num_threads(1)
    arch, kwargs, shape = cases()[case]
    record: dict = {"case": case, "arch": arch, "input": "x".join(map(str, shape)), "stage": "build"}
    started = time.perf_counter()
    try:
        torch.manual_seed(0)
        (through_cli if case.startswith("hf-") else through_state_dict)(arch, kwargs, shape, folder, record)
    except Refused as exc:
        record.update(status="refused" if record["stage"] == "prune" else "error", error=str(exc), prunecli_error=True)
    except Exception as exc:
        record.update(failure(exc, record["stage"]))
    record["seconds"] = time.perf_counter() - started
    return record


def through_state_dict(arch: str, kwargs: dict, shape: tuple[int, ...], folder: Path, record: dict) -> None:
    """Save the state dict, prune it with ``--arch``, reload the slim file and compare, then export it to ONNX."""
    import warnings

    import torch

    from prunecli.budget import parse_budget
    from prunecli.config import ModelSource, OutputOptions, PruneConfig, RunOptions
    from prunecli.io.arch import ArchSpec, build_model
    from prunecli.outputs import output_shapes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(ArchSpec(arch, kwargs))
    source = folder / "model.pt"
    torch.save(model.state_dict(), source)
    with torch.no_grad():
        reference = output_shapes(model(torch.randn(1, *shape)))
    del model
    config = PruneConfig(
        ModelSource(source, arch=arch, arch_kwargs=kwargs, input_shape=shape),
        parse_budget("macs", "0.5"),
        output=OutputOptions(folder / "model.slim.safetensors"),
        run=RunOptions(timeout=TRACE_TIMEOUT),
    )
    prune_and_reload(config, shape, reference, record, trust_code=True)
    export_onnx(config.output.path, arch, folder / "model.onnx", record)


class Refused(Exception):
    """The CLI's one-line error (exit 1) for a model it cannot handle."""


def cli(*args) -> dict:
    """``prunecli ARGS --json`` as typed: its JSON document; Refused with the error line on exit 1, RuntimeError on
    an internal error (a bug) or any other exit."""
    from typer.testing import CliRunner

    from prunecli.cli import app

    result = CliRunner().invoke(app, [*map(str, args), "--json"])
    if result.exit_code == 0:
        return json.loads(result.stdout)
    message = ((result.stderr or "").strip().splitlines() or [repr(result.exception)])[-1].removeprefix("error: ")
    if result.exit_code == 1 and not message.startswith("internal error"):
        raise Refused(message)
    raise RuntimeError(f"exit {result.exit_code}: {message}")


def through_cli(arch: str, fields: dict, shape: tuple[int, ...], folder: Path, record: dict) -> None:
    """Build the transformers model from its config, ``save_pretrained`` it (with an image processor's
    preprocessor_config.json, as a folder a user holds), then as typed: ``prunecli prune ./model/ --flops-target 0.5
    -o model.slim``; reload the pruned folder and compare; ``prunecli export model.slim -o model.onnx``."""
    import warnings

    import torch
    import transformers

    from prunecli.outputs import output_shapes

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cls = getattr(transformers, arch.removeprefix("hf:"))
        model = cls(cls.config_class(**fields)).eval()
        source, output = folder / "model", folder / "model.slim"
        model.save_pretrained(source)
        transformers.ViTImageProcessor(size={"height": shape[1], "width": shape[2]}).save_pretrained(source)
    with torch.no_grad():
        reference = output_shapes(model(torch.randn(1, *shape)))  # every tensor of its ModelOutput, logits or not
    del model
    record["stage"] = "prune"
    with saved_models() as captured:
        report = cli("prune", source, "--flops-target", "0.5", "-o", output)
    record.update(
        macs_before=report["before"]["macs"], macs_after=report["after"]["macs"],
        params_before=report["before"]["params"], params_after=report["after"]["params"],
        macs_kept=report["macs_kept"], channels_removed=report["channels_removed"], prune_seconds=report["seconds"],
    )
    record["stage"] = "reload"
    shutil.rmtree(source)  # the pruned folder must rebuild on its own
    (pruned,) = captured
    check_reload(output, pruned, shape, reference, record)
    record.update(stage="export", onnx="failed")
    cli("export", output, "-o", folder / "model.onnx")
    record["onnx"] = "ok"


# ----------------------------------------------------------------------------- the table

_ROW = re.compile(r"^\| `((?:smp|monai|hf)-[A-Za-z0-9_.-]+)` \|")
RESULTS: dict[str, tuple[dict, str]] = {}
LIBRARIES = {"smp": "segmentation_models_pytorch", "monai": "MONAI", "hf": "transformers"}
# Why a model is refused, as measured (the refusal itself is the one line in its row).
WHY = {
    "smp-PSPNet-efficientnet-b0": "smp's encoder runs one stage past `encoder_depth` 3 and drops its output, so "
    "29.5% of the MACs are in layers whose channels reach no output and no group holds them",
    "smp-PSPNet-mobilenet_v2": "as with efficientnet-b0: 39.8% of the MACs are in the stage the encoder runs and "
    "drops",
    "monai-SegResNet-3d": "its 8-channel stages at full resolution (41% of the MACs at 32x32x32) normalise with "
    "`GroupNorm(8, 8)`, one channel per group, and stay whole (\"too few channels\"); in 2-D they hold less of the "
    "MACs and half is reached",
}


def table_row(record: dict) -> str:
    status_cell, kept_cell, note = verdict(record)
    onnx = record.get("onnx")
    onnx_cell = "-" if onnx is None else "ok" if onnx == "ok" else "**FAIL**"
    return (
        f"| `{record['case']}` | {record['input']} | {status_cell} | {_human(record.get('macs_before'))} | {kept_cell} | "
        f"{_human(record.get('params_before'))} → {_human(record.get('params_after'))} | {onnx_cell} | "
        f"{record['seconds']:.0f} | {_cell(note)} |"
    )


def _section(library: str, rows: dict[str, str]) -> str:
    counts, why = {"ok": 0, "refused": 0, "fail": 0}, []
    for case, row in rows.items():
        cell = row.split("|")[3].strip()
        counts["ok" if cell == "ok" else "refused" if cell.startswith("refused") else "fail"] += 1
        if cell.startswith("refused") and case in WHY:
            why.append(f"- `{case}`: {WHY[case]}.")
    unwalked = [case for case in cases() if case.startswith(f"{library}-") and case not in rows]
    return (
        f"## {LIBRARIES[library]}\n\n**{counts['ok']} of {len(rows)} pass; {counts['refused']} refused with a clear "
        f"error, {counts['fail']} failing.**\n\n"
        + (f"Not walked yet: {', '.join(f'`{case}`' for case in unwalked)}.\n\n" if unwalked else "")
        +
        "| model | input | status | MACs before | kept | params | ONNX | seconds | note |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows.values()) + "\n"
        + ("\nWhy refused:\n\n" + "\n".join(why) + "\n" if why else "")
    )


def write_doc() -> None:
    import torch

    import prunecli

    rows = existing_rows(DOC, _ROW)
    rows.update({case: row for case, (_, row) in RESULTS.items()})
    versions = []
    for module, label in (("segmentation_models_pytorch", "segmentation_models_pytorch"), ("monai", "monai"),
                          ("transformers", "transformers")):
        try:
            versions.append(f"{label} {__import__(module).__version__}")
        except ImportError:
            versions.append(f"{label} not installed")
    listed = "\n".join(f"- `{arch}` `{json.dumps(kwargs)}`" for case, (arch, kwargs, _) in cases().items()
                       if case.startswith("monai-") and not case.endswith("-3d"))
    hf_listed = "\n".join(f"- `{label}`: `{name}` `{json.dumps(fields)}`" for label, (name, fields) in HF_MODELS.items())
    header = f"""# Third-party coverage: segmentation_models_pytorch, MONAI and transformers

timm: [coverage-timm.md](coverage-timm.md); torchvision: [coverage.md](coverage.md).

Generated by `tests/test_coverage_thirdparty_slow.py` (`.venv/bin/pytest -m slow tests/test_coverage_thirdparty_slow.py`):
each model built with random weights (smp with `encoder_weights=None`: nothing downloaded), saved with
`torch.save(model.state_dict())`, pruned with `prune_model` as `--arch package.module:Class --arch-kwargs ...`
(method l1, uniform allocation, `--flops-target 0.5`, tracing timeout {TRACE_TIMEOUT:g} s), reloaded with
`prunecli.load` and run, then exported from the slim file to ONNX (`export -o model.onnx`, verified against
onnxruntime). A row passes when the MACs kept are within {100 * TOLERANCE:g} pp of half, the reloaded model has the
same tensors and outputs (max relative difference ≤ 1e-5) as the model pruned in memory, every output keeps its
shape, and the ONNX file is written and verified. A model prunecli cannot handle must be refused with a one-line
`PrunecliError`; a crash, a traceback, a hang (over {HARD_LIMIT} s) or a failed export is a failure.

transformers rows go as their users go, through the CLI: the class built from a small config with random weights
(`num_labels` 10), saved with `save_pretrained` into a folder beside a `ViTImageProcessor` of its
{HF_SIZE}x{HF_SIZE} size, `prunecli prune ./model/ --flops-target 0.5 -o model.slim --json`, the source folder
removed, the pruned folder reloaded with `prunecli.load` and compared as above (on the logits), then
`prunecli export model.slim -o model.onnx`. A refusal is the CLI's one-line error (exit 1); an internal error, any
other exit or a traceback is a failure. The configs (fields besides each class's defaults):

{hf_listed}

smp: every architecture of the installed version (DPT aside: its encoders are ViTs only) with the encoders
{', '.join(f'`{e}`' for e in SMP_ENCODERS)}, `classes=2`, at 3x{SMP_SIZE}x{SMP_SIZE}. MONAI: 2-D at
{'x'.join(map(str, MONAI_2D))} and 3-D volumes at {'x'.join(map(str, MONAI_3D))} (C x D x H x W), built as below
(the 3-D rows with `spatial_dims` 3):

{listed}

MACs are conv + linear multiply-accumulates (thop convention) at that input; seconds are the whole per-model process
(build, save, prune, reload, export) on {platform.machine()} with {os.cpu_count()} CPU cores and 1 torch thread;
prunecli {prunecli.__version__}, torch {torch.__version__}, {', '.join(versions)}. `-k` re-runs a selection; the rows
of the others are kept from the last walk that ran them.

"""
    sections = [_section(lib, {k: rows[k] for k in sorted(rows) if k.startswith(f"{lib}-")}) for lib in LIBRARIES]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(header + "\n".join(sections))


# ----------------------------------------------------------------------------- the test


def run_case(case: str, folder: Path) -> dict:
    command = [sys.executable, __file__, "--worker", case, str(folder)]
    _, _, shape = cases()[case]
    return run_worker(command, {"case": case, "input": "x".join(map(str, shape))}, HARD_LIMIT,
                      {**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("case", list(cases()))
def test_prune_and_export_third_party_models(tmp_path, case):
    record = run_case(case, tmp_path)
    RESULTS[case] = (record, table_row(record))
    write_doc()  # after every model: a walk cut short still leaves its rows
    check(case, record)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    print(json.dumps(worker(sys.argv[2], Path(sys.argv[3]))))
