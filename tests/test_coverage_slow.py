"""Every torchvision model through prune (l1, half the MACs), reload and run; writes docs/coverage.md.

Each model runs in its own process: a crash or a runaway allocation takes down one row, not the session,
memory is returned between models, and a hang is cut off by a hard limit. A model prunecli cannot handle
must say so with a PrunecliError (one clear line); any other exception, a wrong rebuild, a missed budget
or a hang fails the test.

Run: ``.venv/bin/pytest -m slow tests/test_coverage_slow.py`` (``-k`` selects models; the table keeps the
rows of models not run this time). ``python tests/test_coverage_slow.py --worker NAME CxHxW DIR`` runs one.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import pytest
from coverage_walk import TOLERANCE, check, failure, prune_and_reload, run_worker, verdict

TRACE_TIMEOUT = 120.0  # the config's timeout: tracing must give up with an ArchitectureError after this
HARD_LIMIT = 1500  # seconds for one model's process before it counts as a hang
DOC = Path(__file__).resolve().parent.parent / "docs" / "coverage.md"
# Architectures whose input size is fixed by the weights-free build (position embeddings, window partitions).
FIXED_SIZE = {"vit_b_16": 224, "vit_b_32": 224, "vit_l_16": 224, "vit_l_32": 224, "vit_h_14": 224, "maxvit_t": 224}
# Large models (over ~8 GFLOPs or 100M parameters at their reference size) run at 128x128 to keep the walk
# within reach of a 2-core machine; the table says so.
SMALL_INPUT = 128
LARGE = {
    "convnext_base", "convnext_large", "convnext_small", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7",
    "efficientnet_v2_l", "efficientnet_v2_m", "efficientnet_v2_s", "regnet_x_16gf", "regnet_x_32gf",
    "regnet_y_128gf", "regnet_y_16gf", "regnet_y_32gf", "regnet_y_8gf", "resnet152", "resnext101_32x8d",
    "resnext101_64x4d", "swin_b", "swin_s", "swin_v2_b", "swin_v2_s", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn",
    "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "wide_resnet101_2", "wide_resnet50_2",
}


# Other tasks, at inputs a 2-core machine walks in minutes: segmentation at 256 (its weights' preset is 520),
# detectors at 320 (the R-CNN/RetinaNet/FCOS transforms resize to 800; the SSDs are fixed at 300/320), video clips
# of 8 frames (16 for S3D and MViT, which need them).
TASK_INPUTS = {
    "segmentation": (3, 256, 256),
    "detection": (3, 320, 320),
    "video": (3, 8, 112, 112),
    "optical_flow": (3, 128, 128),
}
SPECIAL_INPUTS = {
    "ssd300_vgg16": (3, 300, 300), "s3d": (3, 16, 224, 224), "mvit_v1_b": (3, 16, 224, 224),
    "mvit_v2_s": (3, 16, 224, 224), "swin3d_t": (3, 8, 112, 112), "swin3d_s": (3, 8, 112, 112),
    "swin3d_b": (3, 8, 112, 112),
}
MEMORY_LIMIT = 16 << 30  # bytes of address space per worker: a runaway trace fails its row, not the machine


def task(name: str) -> str:
    from prunecli.io.arch import torchvision_task

    return torchvision_task(name)


def input_shape(name: str) -> tuple[int, ...]:
    if name in SPECIAL_INPUTS:
        return SPECIAL_INPUTS[name]
    if task(name) in TASK_INPUTS:
        return TASK_INPUTS[task(name)]
    size = FIXED_SIZE.get(name, SMALL_INPUT if name in LARGE else 224)
    return (3, size, size)


def all_models() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models())


# ----------------------------------------------------------------------------- the worker (own process)


def worker(name: str, shape: tuple[int, ...], folder: Path) -> dict:
    """Prune one model, reload the artifact, run it and compare with the in-memory pruned model (a detector: its
    feature path, and its detections end to end in eval mode)."""
    import resource
    import warnings

    import torch
    from safetensors.torch import save_file

    from prunecli.budget import parse_budget
    from prunecli.config import ModelSource, OutputOptions, PruneConfig, RunOptions
    from prunecli.io.arch import ArchSpec, build_model
    from prunecli.outputs import output_shapes
    from prunecli.tasks import prunable_part

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    record: dict = {"model": name, "input": "x".join(map(str, shape)), "task": task(name), "stage": "build"}
    started = time.perf_counter()
    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_model(ArchSpec(f"torchvision:{name}"))
        source = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(source))
        with torch.no_grad():
            reference = output_shapes(prunable_part(model)(torch.randn(1, *shape)))
        del model
        config = PruneConfig(
            ModelSource(source, arch=f"torchvision:{name}", input_shape=shape),
            parse_budget("macs", "0.5"),
            output=OutputOptions(folder / f"{name}.slim.safetensors"),
            run=RunOptions(timeout=TRACE_TIMEOUT),
        )
        prune_and_reload(config, shape, reference, record)
    except Exception as exc:
        record.update(failure(exc, record["stage"]))
    record["seconds"] = time.perf_counter() - started
    return record


# ----------------------------------------------------------------------------- the table

_ROW = re.compile(r"^\| `([a-z0-9_]+)` \|")
RESULTS: dict[str, tuple[dict, str]] = {}


def _human(number) -> str:
    if number is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(number) >= scale:
            return f"{number / scale:.2f}{unit}"
    return str(number)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_row(record: dict) -> str:
    status_cell, kept_cell, note = verdict(record)
    if record.get("detections") is not None and record["status"] == "ok":
        note += f"; {record['detections']} detections end to end, same after reload"
    dims = record["input"].split("x")[1:]  # without the channels
    reduced = record["task"] in ("classification", "quantization") and dims == [str(SMALL_INPUT)] * 2
    size_cell = (dims[0] if len(set(dims)) == 1 and len(dims) == 2 else "x".join(dims)) + (" (reduced)" * reduced)
    return (
        f"| `{record['model']}` | {record['task']} | {size_cell} | {status_cell} | {_human(record.get('macs_before'))} | "
        f"{_human(record.get('macs_after'))} | {kept_cell} | {_human(record.get('params_before'))} → "
        f"{_human(record.get('params_after'))} | {record['seconds']:.0f} | {_cell(note)} |"
    )


def _existing_rows() -> dict[str, str]:
    if not DOC.exists():
        return {}
    rows = {}
    for line in DOC.read_text().splitlines():
        match = _ROW.match(line)
        if match:
            cells = line.split("|")
            if len(cells) == 11:  # a row of a walk before the task column: a classifier
                cells.insert(2, " classification ")
            rows[match.group(1)] = "|".join(cells)
    return rows


def write_doc() -> None:
    import torch
    import torchvision

    import prunecli

    rows = _existing_rows()
    rows.update({name: row for name, (_, row) in RESULTS.items()})
    names = all_models()
    ordered = [rows[n] for n in names if n in rows] + [rows[n] for n in sorted(rows) if n not in names]
    counts = {"ok": 0, "refused": 0, "fail": 0}
    for row in ordered:
        cell = row.split("|")[4].strip()
        counts["ok" if cell == "ok" else "refused" if cell.startswith("refused") else "fail"] += 1
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    header = f"""# Torchvision coverage

timm: one model per family in [coverage-timm.md](coverage-timm.md).

Generated by `tests/test_coverage_slow.py` (`.venv/bin/pytest -m slow tests/test_coverage_slow.py`): every model
of `torchvision.models.list_models()` (classification, quantization, segmentation, detection, video, optical
flow), built with `weights=None, weights_backbone=None`, saved as a safetensors state dict, pruned with
`prune_model` (method l1, uniform allocation, `--flops-target 0.5`, tracing timeout {TRACE_TIMEOUT:g} s), reloaded
with `prunecli.load` and run. "rebuild exact" means the reloaded model has the same tensors as the in-memory pruned
model, every output tensor has the shape of the original's and the same values (max relative difference
≤ 1e-5). Detectors are pruned on their feature path (backbone with FPN or SSD extras; the heads and the widths
they read stay) and their MACs are that path's; their rows also run the whole detector in eval mode on two
images (transform, RPN/heads, box decoding, NMS) and compare its detections before and after reloading.
A model prunecli cannot handle must be refused with a one-line `PrunecliError`; a crash, a hang (over
{HARD_LIMIT} s), a rebuild mismatch or a budget missed by more than {100 * TOLERANCE:g} pp is a failure.

Input (without the batch; C x [T x] H x W, a single number is a square image): classifiers at 224x224, except
ViT/MaxViT (fixed at 224 by their weights-free build) and {len(LARGE)} large models run at {SMALL_INPUT}x{SMALL_INPUT}
("reduced"); segmentation at 256, detectors at 320 (SSD300 at 300), video clips of 8 frames at 112 (S3D, MViT:
16 frames at 224) to keep the walk within reach of a small machine. MACs are conv + linear multiply-accumulates
(thop convention) at that input; seconds are the whole per-model process (build, save, prune, reload, run) on
{platform.machine()} with {os.cpu_count()} CPU cores and {threads} torch thread(s), prunecli {prunecli.__version__},
torch {torch.__version__}, torchvision {torchvision.__version__}. `-k` re-runs a selection; the rows of the others
are kept from the last walk that ran them.

**{len(ordered)} models: {counts['ok']} ok, {counts['refused']} refused with a clear error, {counts['fail']} failing.**

| model | task | input | status | MACs before | MACs after | kept | params | seconds | note |
|---|---|---|---|---|---|---|---|---|---|
"""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(header + "\n".join(ordered) + "\n")


# ----------------------------------------------------------------------------- the test


def run_model(name: str, shape: tuple[int, ...], folder: Path) -> dict:
    what = {"model": name, "input": "x".join(map(str, shape)), "task": task(name)}
    return run_worker([sys.executable, __file__, "--worker", name, what["input"], str(folder)], what, HARD_LIMIT)


@pytest.mark.slow
@pytest.mark.parametrize("name", all_models())
def test_prune_every_torchvision_model(tmp_path, name):
    record = run_model(name, input_shape(name), tmp_path)
    RESULTS[name] = (record, table_row(record))
    write_doc()  # after every model: an interrupted walk keeps what it measured
    check(name, record)


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    print(json.dumps(worker(sys.argv[2], tuple(int(d) for d in sys.argv[3].split("x")), Path(sys.argv[4]))))
