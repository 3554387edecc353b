"""What a coverage walk's worker does for one model, whatever zoo it comes from: prune a saved state dict to half its
MACs, reload the slim file without pickle, compare it with the model pruned in memory (every output tensor, and a
detector's detections end to end), export it to ONNX where the walk asks, and turn what happened into a JSON
record; and the parent's side, which runs each worker in its own process under a hard limit."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import time
import traceback
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def saved_models() -> Iterator[list]:
    """The models handed to ``save_slim`` inside the block (the pruned model as it was written), in order."""
    import prunecli.io.slim as slim_module

    captured: list = []
    original_save = slim_module.save_slim

    def spy(model, path, **kwargs):
        captured.append(model)
        return original_save(model, path, **kwargs)

    slim_module.save_slim = spy
    try:
        yield captured
    finally:
        slim_module.save_slim = original_save


def prune_and_reload(config, shape: tuple[int, ...], reference_shapes: tuple, record: dict,
                     trust_code: bool = False) -> None:
    """Run ``prune_model(config)`` and check the artifact against the model pruned in memory and the original's
    output shapes (``reference_shapes``, of its prunable part); the numbers, shapes and rebuild go into ``record``.
    ``trust_code``: the slim file names an architecture other than torchvision's or timm's (``--arch`` on reload).

    Raises what pruning or reloading raised; ``record["stage"]`` says which it was."""
    from prunecli.api import prune_model

    record["stage"] = "prune"
    with saved_models() as captured:
        result = prune_model(config)  # a model prunecli cannot run on one batch is refused here
    record.update(
        macs_before=result.before.macs, macs_after=result.after.macs, params_before=result.before.params,
        params_after=result.after.params, macs_kept=result.macs_kept, channels_removed=result.channels_removed,
        prune_seconds=result.seconds,
    )
    record["stage"] = "reload"
    config.source.path.unlink()  # the slim file must rebuild on its own
    (pruned,) = captured
    check_reload(config.output.path, pruned, shape, reference_shapes, record, trust_code)


def check_reload(output: Path, pruned, shape: tuple[int, ...], reference_shapes: tuple, record: dict,
                 trust_code: bool = False) -> None:
    """``prunecli.load(output)`` against ``pruned`` (the model written) and the original's output shapes: every
    tensor and output, and a detector's detections end to end; the verdict goes into ``record``."""
    import torch

    import prunecli
    from prunecli.outputs import output_shapes, output_tensors
    from prunecli.tasks import end_to_end_outputs, prunable_part

    loaded = prunecli.load(output, trust_code=trust_code)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
    pruned.eval()
    with torch.no_grad():
        got, want = prunable_part(loaded)(x), prunable_part(pruned)(x)
    record["output_shapes"] = [list(s) for s in output_shapes(got)]
    record["shapes_kept"] = output_shapes(got) == tuple(tuple(s) for s in reference_shapes)
    state, expected = loaded.state_dict(), pruned.state_dict()
    same = list(state) == list(expected) and all(torch.equal(state[k], expected[k]) for k in expected)
    pairs = list(zip(output_tensors(got), output_tensors(want), strict=True))
    detections = end_to_end_outputs(pruned, shape)
    if detections is not None:
        pairs += zip(end_to_end_outputs(loaded, shape), detections, strict=True)
        record["detections"] = sum(len(t) for t in detections if t.dim() == 2 and t.shape[1] == 4)  # boxes
    record["max_abs_diff"] = max(
        float((g.float() - w.float()).abs().max()) / (float(w.float().abs().max()) or 1.0) if w.numel() else 0.0
        for g, w in pairs
    )
    exact = same and record["max_abs_diff"] <= 1e-5 and record["shapes_kept"]
    record["rebuild"] = "exact" if exact else "MISMATCH"
    record["status"] = "ok"


def export_onnx(slim: Path, arch: str, output: Path, record: dict) -> None:
    """Export the slim file as ``prunecli export SLIM --arch ARCH -o OUTPUT.onnx`` does (verified against
    onnxruntime); ``record["onnx"]`` says whether it was written."""
    from prunecli.api import export_artifact
    from prunecli.config import ExportJob, ModelSource
    from prunecli.export.config import ExportConfig

    record.update(stage="export", onnx="failed")
    export_artifact(ExportJob(ModelSource(slim, arch=arch), ExportConfig(format="onnx", output=output)))
    record["onnx"] = "ok"


TOLERANCE = 0.005  # achieved MACs share within half a percentage point of the 0.5 asked for


def verdict(record: dict) -> tuple[str, str, str]:
    """A row's status, kept-MACs and note cells: ok only for an exact rebuild within ``TOLERANCE`` of half the MACs."""
    status = record["status"]
    if status != "ok":
        cell = {"refused": "refused (PrunecliError)", "hang": "**HANG**"}.get(status, f"**{status.upper()}**")
        return cell, "-", record.get("error", "")
    kept = record["macs_kept"]
    note = f"rebuild {record['rebuild']}"
    if abs(kept - 0.5) > TOLERANCE:
        note += f"; budget missed by {100 * (kept - 0.5):+.2f} pp"
    good = record["rebuild"] == "exact" and abs(kept - 0.5) <= TOLERANCE and record.get("onnx", "ok") == "ok"
    return "ok" if good else "**FAIL**", f"{100 * kept:.2f}%", note


def check(name: str, record: dict) -> None:
    """What a walk asserts of one model: refused with one short line, or ok with its output shapes kept, an exact
    rebuild and the budget met."""
    status = record["status"]
    assert status in ("ok", "refused"), f"{name}: {status}: {record.get('error')}"
    if status == "refused":
        assert record["prunecli_error"]
        assert "\n" not in record["error"] and len(record["error"]) < 500
        return
    assert record["shapes_kept"], record["output_shapes"]
    assert record["rebuild"] == "exact", record["max_abs_diff"]
    assert abs(record["macs_kept"] - 0.5) <= TOLERANCE, record["macs_kept"]
    assert record.get("onnx", "ok") == "ok"  # a walk that exports


def failure(exc: Exception, stage: str) -> dict:
    """A PrunecliError while pruning is a refusal; any other error, or one after pruning, a failure."""
    from prunecli.errors import PrunecliError

    if isinstance(exc, PrunecliError):
        return {"status": "refused" if stage == "prune" else "error", "error": f"{type(exc).__name__}: {exc}",
                "prunecli_error": True}
    frames = traceback.extract_tb(exc.__traceback__)[-3:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
    first = str(exc).splitlines()[0][:300] if str(exc) else ""
    return {"status": "crash", "error": f"{type(exc).__name__}: {first} ({where})", "prunecli_error": False}


def existing_rows(doc: Path, row: re.Pattern) -> dict[str, str]:
    """The rows of a coverage table already written, by the id ``row``'s first group reads off each line."""
    if not doc.exists():
        return {}
    return {m.group(1): line for line in doc.read_text().splitlines() if (m := row.match(line))}


def run_worker(command: list[str], record: dict, hard_limit: float, env: dict | None = None) -> dict:
    """Run one worker process; its last JSON line, or ``record`` marked as a hang or a crash."""
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=hard_limit, check=False, env=env)
    except subprocess.TimeoutExpired:
        return {**record, "status": "hang", "seconds": time.perf_counter() - started,
                "error": f"no answer after {hard_limit:g} s", "prunecli_error": False}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        return {**record, "status": "crash", "seconds": time.perf_counter() - started,
                "error": f"worker exited with {done.returncode}: {tail}", "prunecli_error": False}
    return {**json.loads(lines[-1]), "seconds": time.perf_counter() - started}
