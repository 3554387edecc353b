"""One model of every timm family through prune (l1, half the MACs), reload and run, beside plain Torch-Pruning;
writes docs/coverage-timm.md.

A family is a module of ``timm.list_modules()``; its model is the architecture with the fewest parameters
(counted on the meta device; among timm's ``test_*`` models where the family has them). As in
tests/test_coverage_slow.py each family runs in its own process with a hard limit, and a family prunecli cannot
handle must say so with a one-line PrunecliError. Each row also runs Torch-Pruning's own MetaPruner (L1 magnitude,
the classifier ignored, one ratio for every layer) on the same model, to show what prunecli adds.

Run: ``.venv/bin/pytest -m slow tests/test_coverage_timm_slow.py`` (``-k`` selects families; the table keeps
the rows of families not run). ``python tests/test_coverage_timm_slow.py --worker FAMILY DIR`` runs one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

import pytest
from coverage_walk import TOLERANCE, check, existing_rows, failure, prune_and_reload, run_worker, verdict
from test_coverage_slow import _cell, _human

pytest.importorskip("timm")

TRACE_TIMEOUT = 60.0  # the config's tracing timeout: a family that needs longer is refused after this
HARD_LIMIT = 600  # seconds for one family's process before it counts as a hang
SIZE = 128  # input height and width, where the model takes it (timm's ViTs are built for it with img_size)
TP_RATIO = 1 - math.sqrt(0.5)  # one channel ratio for every layer: about half the MACs of a plain CNN
TP_TIMEOUT = 60.0  # Torch-Pruning alone gets the same time for tracing as prunecli
LARGE = 50_000_000  # parameters: a transformer this large is built with depth 2 where its constructor takes one
DOC = Path(__file__).resolve().parent.parent / "docs" / "coverage-timm.md"


def families() -> list[str]:
    import timm

    return sorted(timm.list_modules())


def smallest(family: str) -> str:
    """The architecture of ``family`` with the fewest parameters (built on the meta device), by name on a tie.

    Where the family has timm's own ``test_*`` models, only they are counted: they are its smallest by design,
    and building the 160 ViTs on meta takes a minute."""
    import warnings

    import timm
    import torch

    names = timm.list_models(module=family)
    sizes = []
    for name in [n for n in names if n.startswith("test_")] or names:
        try:
            with warnings.catch_warnings(), torch.device("meta"):
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False)
        except Exception:  # a variant that cannot be built without its weights is not a candidate
            continue
        sizes.append((sum(p.numel() for p in model.parameters()), name))
    if not sizes:
        raise RuntimeError(f"no model of timm family {family} builds")
    return min(sizes)[1]


def build(name: str) -> tuple[object, dict, tuple[int, int, int]]:
    """The model at ``SIZE`` when it runs there (ViT-style models built for it with ``img_size``), else at the
    input size of its pretrained config, and with two blocks when it is ``LARGE``; the kwargs and input shape it
    was built for."""
    import warnings

    import timm
    import torch

    cfg = timm.models.get_pretrained_cfg(name)
    channels, height, _ = cfg.input_size
    tries = [({"img_size": SIZE} if cfg.fixed_input_size else {}, SIZE), ({}, height)]
    with torch.device("meta"):
        if sum(p.numel() for p in timm.create_model(name, pretrained=False).parameters()) > LARGE:
            tries = [({**kwargs, "depth": 2}, size) for kwargs, size in tries] + tries
    for kwargs, size in tries:
        torch.manual_seed(0)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False, **kwargs).eval()
                with torch.no_grad():
                    model(torch.zeros(1, channels, size, size))
        except Exception:
            continue
        return model, kwargs, (channels, size, size)
    raise RuntimeError(f"{name} runs neither at {SIZE} nor at {height}")


def plain_torch_pruning(name: str, kwargs: dict, shape: tuple[int, int, int]) -> dict:
    """Torch-Pruning alone on the same model: did it run, the MACs it kept, and is the output shape unchanged."""
    import timm
    import torch
    import torch_pruning as tp

    from prunecli.measure import totals
    from prunecli.runtime import time_limit

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    before = totals(model, x)
    with torch.no_grad():
        want = model(x).shape
    head = model.get_classifier()
    ignored = [m for m in (head if isinstance(head, tuple) else (head,)) if any(True for _ in m.parameters())]
    try:
        with time_limit(TP_TIMEOUT, "Torch-Pruning"):
            pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                          pruning_ratio=TP_RATIO, ignored_layers=ignored)
            pruner.step()
            with torch.no_grad():
                got = model(x).shape
        kept = totals(model, x).macs / before.macs
    except Exception as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else ""
        return {"tp": "error", "tp_error": f"{type(exc).__name__}: {first}"}
    return {"tp": "ok" if got == want else "wrong shape", "tp_macs_kept": kept, "tp_shape": list(got)}


# ----------------------------------------------------------------------------- the worker (own process)


def worker(family: str, folder: Path) -> dict:
    """Pick the family's model, prune it, reload the artifact and compare; then Torch-Pruning alone."""
    import torch

    from prunecli.budget import parse_budget
    from prunecli.config import ModelSource, OutputOptions, PruneConfig, RunOptions
    from prunecli.outputs import output_shapes

    torch.set_num_threads(1)
    record: dict = {"family": family, "stage": "build"}
    started = time.perf_counter()
    try:
        name = record["model"] = smallest(family)
        model, kwargs, shape = build(name)
        record.update(kwargs=kwargs, size=shape[1])
        source = folder / f"{name}.pt"  # a torch file: some timm models share layers (CoaT), safetensors refuses that
        torch.save(model.state_dict(), source)
        with torch.no_grad():
            reference = output_shapes(model(torch.zeros(1, *shape)))
        del model
        config = PruneConfig(
            ModelSource(source, arch=f"timm:{name}", arch_kwargs=kwargs, input_shape=shape),
            parse_budget("macs", "0.5"),
            output=OutputOptions(folder / f"{name}.slim.safetensors"),
            run=RunOptions(timeout=TRACE_TIMEOUT),
        )
        prune_and_reload(config, shape, reference, record)
    except Exception as exc:
        record.update(failure(exc, record["stage"]))
    if "size" in record and "dependencies took longer" not in record.get("error", ""):  # its tracer would time out too
        record.update(plain_torch_pruning(record["model"], record["kwargs"], shape))
    record["seconds"] = time.perf_counter() - started
    return record


# ----------------------------------------------------------------------------- the table

_ROW = re.compile(r"^\| `([a-z0-9_]+)` \|")
RESULTS: dict[str, tuple[dict, str]] = {}


def _plain_cell(record: dict) -> str:
    tp = record.get("tp")
    if tp is None:
        return "-"
    if tp == "error":
        return _cell(f"error: {record['tp_error']}")
    kept = f"{100 * record['tp_macs_kept']:.1f}% MACs"
    return kept if tp == "ok" else f"{kept}, **wrong output shape** {record['tp_shape']}"


def table_row(record: dict) -> str:
    status_cell, kept_cell, note = verdict(record)
    model = f"`{record['model']}`" if record.get("model") else "-"
    size = record.get("size")
    size_cell = "-" if size is None else f"{size}" + (f" ({', '.join(record['kwargs'])})" if record.get("kwargs") else "")
    return (
        f"| `{record['family']}` | {model} | {size_cell} | {status_cell} | {_human(record.get('macs_before'))} | "
        f"{kept_cell} | {_human(record.get('params_before'))} → {_human(record.get('params_after'))} | "
        f"{_plain_cell(record)} | {record['seconds']:.0f} | {_cell(note)} |"
    )


def write_doc() -> None:
    import timm
    import torch
    import torch_pruning

    import prunecli

    rows = existing_rows(DOC, _ROW)
    rows.update({family: row for family, (_, row) in RESULTS.items()})
    ordered = [rows[f] for f in sorted(rows)]
    not_run = [f for f in families() if f not in rows]
    counts = {"ok": 0, "refused": 0, "fail": 0}
    plain = {"ok": 0, "wrong": 0, "error": 0}
    for row in ordered:
        cells = [c.strip() for c in row.split("|")]
        counts["ok" if cells[4] == "ok" else "refused" if cells[4].startswith("refused") else "fail"] += 1
        tp = cells[8]
        if tp != "-":
            plain["error" if tp.startswith("error") else "wrong" if "wrong" in tp else "ok"] += 1
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    header = f"""# timm coverage

Generated by `tests/test_coverage_timm_slow.py` (`.venv/bin/pytest -m slow tests/test_coverage_timm_slow.py`): one
model of each module of `timm.list_modules()` (a family), the variant with the fewest parameters (timm's `test_*`
model where the family has one), built with
`pretrained=False`, saved as a safetensors state dict, pruned with `prune_model` as `--arch timm:NAME` (method l1,
uniform allocation, `--flops-target 0.5`, tracing timeout {TRACE_TIMEOUT:g} s), reloaded with `prunecli.load` and run
on one image. "rebuild exact" means the reloaded model has the same tensors as the in-memory pruned model and the
same output (max relative difference ≤ 1e-5). A family prunecli cannot handle must be refused with a one-line
`PrunecliError`; a crash, a hang (over {HARD_LIMIT} s), a rebuild mismatch or a budget missed by more than
{100 * TOLERANCE:g} pp is a failure.

Input: {SIZE}x{SIZE} to fit a small machine; models whose size is fixed at build time are built for it with
`--arch-kwargs '{{"img_size": {SIZE}}}'` ("img_size"), and a model that runs at neither gets the input size of its
pretrained config. A family whose smallest model has over {LARGE / 1e6:g}M parameters is built with two blocks
(`{{"depth": 2}}`, "depth") where its constructor takes that, so that one process fits the machine and the hard
limit. MACs are conv + linear multiply-accumulates (thop convention; attention's matrix products are not counted)
at that input.

"plain Torch-Pruning" runs `tp.pruner.MetaPruner` on the same model (L1 `MagnitudeImportance`, the classifier in
`ignored_layers`, `pruning_ratio` {TP_RATIO:.3f} on every layer, which keeps about half the MACs of a plain CNN) and
reports the MACs it kept in prunecli's convention, or its error (within {TP_TIMEOUT:g} s), and whether the output shape
stayed right; "-" where tracing for prunecli already ran out of time (Torch-Pruning's tracer is the same).

Seconds are the whole per-family process (choosing the variant, build, save, prune, reload, run, Torch-Pruning)
on {platform.machine()} with {os.cpu_count()} CPU cores and {threads} torch thread; prunecli {prunecli.__version__},
timm {timm.__version__}, torch {torch.__version__}, torch-pruning {torch_pruning.__version__}. `-k` re-runs a
selection; the rows of the others are kept from the last walk that ran them.

**{len(ordered)} families: {counts['ok']} ok, {counts['refused']} refused with a clear error, {counts['fail']} failing.**
Plain Torch-Pruning: {plain['ok']} ran with the right output shape, {plain['wrong']} changed the output shape,
{plain['error']} failed.{f" Not run yet: {', '.join(not_run)}." if not_run else ""}

| family | model | input | status | MACs before | kept | params | plain Torch-Pruning | seconds | note |
|---|---|---|---|---|---|---|---|---|---|
"""
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(header + "\n".join(ordered) + "\n")


# ----------------------------------------------------------------------------- the test


def run_family(family: str, folder: Path) -> dict:
    command = [sys.executable, __file__, "--worker", family, str(folder)]
    return run_worker(command, {"family": family}, HARD_LIMIT, {**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
@pytest.mark.parametrize("family", families())
def test_prune_every_timm_family(tmp_path, family):
    record = run_family(family, tmp_path)
    RESULTS[family] = (record, table_row(record))
    write_doc()  # after every family: a walk cut short still leaves its rows
    check(family, record)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    print(json.dumps(worker(sys.argv[2], Path(sys.argv[3]))))
