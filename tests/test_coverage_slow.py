"""Every torchvision classifier through prune (l1, half the MACs), reload and run; writes docs/coverage.md.

Each model runs in its own process: a crash or a runaway allocation takes down one row, not the session,
memory is returned between models, and a hang is cut off by a hard limit. A model prunecli cannot handle
must say so with a PrunecliError (one clear line); any other exception, a wrong rebuild, a missed budget
or a hang fails the test.

Run: ``.venv/bin/pytest -m slow tests/test_coverage_slow.py`` (``-k`` selects models; the table keeps the
rows of models not run this time). ``python tests/test_coverage_slow.py --worker NAME SIZE DIR`` runs one.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

TRACE_TIMEOUT = 120.0  # the config's timeout: tracing must give up with an ArchitectureError after this
HARD_LIMIT = 1500  # seconds for one model's process before it counts as a hang
TOLERANCE = 0.005  # achieved MACs share within half a percentage point of the 0.5 asked for
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


def input_size(name: str) -> int:
    return FIXED_SIZE.get(name, SMALL_INPUT if name in LARGE else 224)


def classifiers() -> list[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


# ----------------------------------------------------------------------------- the worker (own process)


def worker(name: str, size: int, folder: Path) -> dict:
    """Prune one model, reload the artifact, run it and compare with the in-memory pruned model."""
    import warnings

    import torch
    import torchvision
    from safetensors.torch import save_file

    import prunecli
    import prunecli.io.slim as slim_module
    from prunecli.api import prune_model
    from prunecli.config import ModelSource, PruneConfig, parse_budget
    from prunecli.errors import PrunecliError

    record: dict = {"model": name, "size": size}
    started = time.perf_counter()
    stage = "build"
    captured = []
    original_save = slim_module.save_slim

    def spy(model, path, **kwargs):
        captured.append(model)
        return original_save(model, path, **kwargs)

    slim_module.save_slim = spy
    try:
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = torchvision.models.get_model(name, weights=None).eval()
        source = folder / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(source))
        del model
        stage = "prune"
        output = folder / f"{name}.slim.safetensors"
        config = PruneConfig(
            ModelSource(source, arch=f"torchvision:{name}", input_shape=(3, size, size)),
            parse_budget("flops", "0.5"),
            output=output,
            timeout=TRACE_TIMEOUT,
        )
        result = prune_model(config)
        record.update(
            macs_before=result.before.macs, macs_after=result.after.macs, params_before=result.before.params,
            params_after=result.after.params, macs_kept=result.macs_kept, channels_removed=result.channels_removed,
            prune_seconds=result.seconds,
        )
        stage = "reload"
        source.unlink()
        loaded = prunecli.load(output)
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            got = loaded(x)
            want = captured[0].eval()(x)
        record["output_shape"] = list(got.shape)
        state, expected = loaded.state_dict(), captured[0].state_dict()
        same_keys = list(state) == list(expected)
        same_state = same_keys and all(torch.equal(state[k], expected[k]) for k in expected)
        scale = float(want.abs().max()) or 1.0
        record["max_abs_diff"] = float((got - want).abs().max()) / scale
        record["rebuild"] = "exact" if same_keys and same_state and record["max_abs_diff"] <= 1e-5 else "MISMATCH"
        record["status"] = "ok"
    except PrunecliError as exc:
        record.update(status="refused" if stage == "prune" else "error", error=f"{type(exc).__name__}: {exc}",
                      prunecli_error=True)
    except Exception as exc:
        import traceback

        frames = traceback.extract_tb(exc.__traceback__)[-3:]
        where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        record.update(status="crash", error=f"{type(exc).__name__}: {first} ({where})", prunecli_error=False)
    finally:
        slim_module.save_slim = original_save
    record["stage"] = stage
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
    status = record["status"]
    if status == "ok":
        kept = record["macs_kept"]
        note = f"rebuild {record['rebuild']}"
        if abs(kept - 0.5) > TOLERANCE:
            note += f"; budget missed by {100 * (kept - 0.5):+.2f} pp"
        status_cell = "ok" if record["rebuild"] == "exact" and abs(kept - 0.5) <= TOLERANCE else "**FAIL**"
        kept_cell = f"{100 * kept:.2f}%"
    else:
        note = record.get("error", "")
        status_cell = {"refused": "refused (PrunecliError)", "hang": "**HANG**"}.get(status, f"**{status.upper()}**")
        kept_cell = "-"
    size = record["size"]
    size_cell = f"{size}" + (" (reduced)" if size == SMALL_INPUT else "")
    return (
        f"| `{record['model']}` | {size_cell} | {status_cell} | {_human(record.get('macs_before'))} | "
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
            rows[match.group(1)] = line
    return rows


def write_doc() -> None:
    import torch
    import torchvision

    import prunecli

    rows = _existing_rows()
    rows.update({name: row for name, (_, row) in RESULTS.items()})
    names = classifiers()
    ordered = [rows[n] for n in names if n in rows] + [rows[n] for n in sorted(rows) if n not in names]
    counts = {"ok": 0, "refused": 0, "fail": 0}
    for row in ordered:
        cell = row.split("|")[3].strip()
        counts["ok" if cell == "ok" else "refused" if cell.startswith("refused") else "fail"] += 1
    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    header = f"""# Torchvision coverage

Generated by `tests/test_coverage_slow.py` (`.venv/bin/pytest -m slow tests/test_coverage_slow.py`): every
classifier of `torchvision.models.list_models(module=torchvision.models)`, built with `weights=None`, saved as a
safetensors state dict, pruned with `prune_model` (method l1, uniform allocation, `--flops-target 0.5`, tracing
timeout {TRACE_TIMEOUT:g} s), reloaded with `prunecli.load` and run on one image. "rebuild exact" means the reloaded
model has the same tensors as the in-memory pruned model and the same output (max relative difference ≤ 1e-5).
A model prunecli cannot handle must be refused with a one-line `PrunecliError`; a crash, a hang (over
{HARD_LIMIT} s), a rebuild mismatch or a budget missed by more than {100 * TOLERANCE:g} pp is a failure.

Input: 224x224, except ViT/MaxViT (fixed at 224 by their weights-free build) and {len(LARGE)} large models run at
{SMALL_INPUT}x{SMALL_INPUT} ("reduced") to keep the walk within reach of a small machine. MACs are conv + linear
multiply-accumulates (thop convention) at that input; seconds are the whole per-model process (build, save,
prune, reload, run) on {platform.machine()} with {os.cpu_count()} CPU cores and {threads} torch thread(s),
prunecli {prunecli.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}.

**{len(ordered)} models: {counts['ok']} ok, {counts['refused']} refused with a clear error, {counts['fail']} failing.**

| model | input | status | MACs before | MACs after | kept | params | seconds | note |
|---|---|---|---|---|---|---|---|---|
"""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(header + "\n".join(ordered) + "\n")


@pytest.fixture(scope="module", autouse=True)
def coverage_doc():
    yield
    if RESULTS:
        write_doc()


# ----------------------------------------------------------------------------- the test


def run_worker(name: str, size: int, folder: Path) -> dict:
    command = [sys.executable, __file__, "--worker", name, str(size), str(folder)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=HARD_LIMIT, check=False)
    except subprocess.TimeoutExpired:
        return {"model": name, "size": size, "status": "hang", "seconds": time.perf_counter() - started,
                "error": f"no answer after {HARD_LIMIT} s", "prunecli_error": False}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {"model": name, "size": size, "status": "crash", "seconds": time.perf_counter() - started,
                "error": f"worker exited with {done.returncode}: {tail}", "prunecli_error": False}
    record = json.loads(lines[-1])
    record["seconds"] = time.perf_counter() - started
    return record


@pytest.mark.slow
@pytest.mark.parametrize("name", classifiers())
def test_prune_every_torchvision_classifier(tmp_path, name):
    record = run_worker(name, input_size(name), tmp_path)
    RESULTS[name] = (record, table_row(record))
    status = record["status"]
    assert status in ("ok", "refused"), f"{name}: {status}: {record.get('error')}"
    if status == "refused":
        assert record["prunecli_error"]
        assert "\n" not in record["error"] and len(record["error"]) < 500
        return
    assert record["output_shape"] == [1, 1000]
    assert record["rebuild"] == "exact", record["max_abs_diff"]
    assert abs(record["macs_kept"] - 0.5) <= TOLERANCE, record["macs_kept"]


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--worker":
    print(json.dumps(worker(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))))
