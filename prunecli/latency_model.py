"""Latency as a cost: per-layer latency tables, the cost model they make, their disk cache and the loop that corrects
the requested cost until the measured model meets ``--latency-target``.

Nothing here times anything: the timings come in as callables (``prunecli.latency`` measures them under a runtime),
so tests can hand in a fake timer and check every number. The model, after HALP and NetAdapt's lookup tables:

- every conv/linear layer is timed alone at a coarse grid of its input and output channel counts (the counts it
  has when every group keeps the same step of its allowed counts, ``grid`` steps from the floor to full); a
  depthwise conv, or a grouped one that loses whole groups, whose in, out and groups move together, is a line
  rather than a grid;
- a plan's latency is the sum of its layers' times, interpolated bilinearly between the grid points (clamped at
  the ends), plus a residual: what the whole original takes beyond the sum of its layers at full width (norms,
  activations, pooling, adds, the runtime's per-run overhead and fusions, negative when timing layers one by one
  costs more than the fused graph). The residual scales with the activation volume the conv/linear layers
  write (their output channels times positions), as elementwise layers do.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from prunecli.allocate import GroupLimits
from prunecli.errors import ExportError
from prunecli.graph import ChannelGroup
from prunecli.io.files import atomic_output
from prunecli.measure import CostModel, LayerCost

CACHE_FORMAT = 1
TIMED_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass(frozen=True)
class LayerSpec:
    """One conv/linear layer as timed alone: its shape and its per-example input shape (channels first for
    convs, features last for linears)."""

    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    input_shape: tuple[int, ...]
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = False
    whole_groups: bool = False  # a grouped conv that loses whole groups (``ChannelGroup.grouped_conv``)

    @property
    def groups_follow(self) -> bool:
        """In, out and groups move together: a depthwise conv, or a grouped one that loses whole groups."""
        return self.groups > 1 and (self.whole_groups or self.groups == self.in_channels)

    def key(self) -> str:
        """The cache key: every field, in a fixed order."""
        return json.dumps(asdict(self), separators=(",", ":"))

    def resized(self, in_channels: int, out_channels: int) -> LayerSpec:
        """This layer with other channel counts (where groups follow, each keeps its input width)."""
        if self.kind == "linear":
            return replace(self, in_channels=in_channels, out_channels=out_channels,
                           input_shape=(*self.input_shape[:-1], in_channels))
        groups = in_channels // (self.in_channels // self.groups) if self.groups_follow else self.groups
        return replace(self, in_channels=in_channels, out_channels=out_channels, groups=groups,
                       input_shape=(in_channels, *self.input_shape[1:]))


def _padding(module: nn.modules.conv._ConvNd) -> tuple[int, ...]:
    if isinstance(module.padding, str):  # "valid" or "same" (symmetric: exact for odd kernels)
        if module.padding == "valid":
            return (0,) * len(module.kernel_size)
        return tuple(d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation, strict=True))
    return tuple(module.padding)


def _spec(module: nn.Module, x: torch.Tensor) -> LayerSpec:
    shape = tuple(int(d) for d in x.shape[1:])
    if isinstance(module, nn.Linear):
        return LayerSpec("linear", module.in_features, module.out_features, shape, bias=module.bias is not None)
    return LayerSpec("conv", module.in_channels, module.out_channels, shape, tuple(module.kernel_size),
                     tuple(module.stride), _padding(module), tuple(module.dilation), module.groups,
                     module.bias is not None)


@torch.no_grad()
def trace_specs(model: nn.Module, example_input: torch.Tensor) -> dict[str, tuple[LayerSpec, int]]:
    """Every conv/linear layer that runs on one example: its spec and how often it runs (transposed convs have no
    table; their time is part of the residual)."""
    found: dict[str, tuple[LayerSpec, int]] = {}
    handles = []
    for name, module in model.named_modules():
        if type(module) in TIMED_TYPES:

            def hook(mod, inputs, output, name=name):
                spec, calls = found.get(name, (_spec(mod, inputs[0][:1]), 0))
                found[name] = (spec, calls + 1)

            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(example_input[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return found


def grid_keeps(limits: Mapping[int, GroupLimits], groups: Sequence[ChannelGroup], points: int) -> list[np.ndarray]:
    """Kept counts per group (in ``groups`` order) at ``points`` steps from full to the floor: step k keeps each
    group's allowed count at position k/(points-1) down its list, so every grid point is a count the allocator
    may choose (on the ``--round-to`` grid)."""
    allowed = [limits[g.index].allowed_keeps() for g in groups]
    return [np.array([a[round((len(a) - 1) * (1 - k / (points - 1)))] for a in allowed], dtype=float)
            for k in range(points)]


def _snap(channels: float, groups: int) -> int:
    """A channel count the layer can have: a positive multiple of its (fixed) groups."""
    return max(groups, round(channels / groups) * groups)


@dataclass(frozen=True)
class LayerTable:
    """The measured times of one layer: a grid over (in, out) channels, or where groups follow (in, out and
    groups move together) a line over its grid steps, ``ins[i]`` with ``outs[i]``."""

    name: str
    spec: LayerSpec
    calls: int
    ins: tuple[int, ...]
    outs: tuple[int, ...]
    ms: tuple[tuple[float, ...], ...] = ()  # [len(ins)][len(outs)]; one row where groups follow

    def points(self) -> list[LayerSpec]:
        if self.spec.groups_follow:
            return [self.spec.resized(i, o) for i, o in zip(self.ins, self.outs, strict=True)]
        return [self.spec.resized(i, o) for i in self.ins for o in self.outs]

    def predict(self, cin: float, cout: float) -> float:
        """Milliseconds of all this layer's calls at (cin, cout), interpolated between the grid points."""
        rows = [np.interp(cout, self.outs, row) for row in self.ms]
        return self.calls * float(rows[0] if self.spec.groups_follow else np.interp(cin, self.ins, rows))


def table_grid(name: str, spec: LayerSpec, calls: int, ins: Sequence[float], outs: Sequence[float]) -> LayerTable:
    """The (not yet timed) table of one layer from its channel counts at the grid steps."""
    if spec.groups_follow:  # its input count follows its output count (the cost model moves only the latter)
        width_out, width_in = spec.out_channels // spec.groups, spec.in_channels // spec.groups
        outs_ = tuple(sorted({_snap(o, width_out) for o in outs}))
        return LayerTable(name, spec, calls, tuple(o // width_out * width_in for o in outs_), outs_)
    return LayerTable(name, spec, calls, tuple(sorted({_snap(i, spec.groups) for i in ins})),
                      tuple(sorted({_snap(o, spec.groups) for o in outs})))


def layer_tables(specs: Mapping[str, tuple[LayerSpec, int]], cost_model: CostModel,
                 keeps: Sequence[np.ndarray]) -> list[LayerTable]:
    """The (not yet timed) table of every timed layer, at its channel counts under ``keeps`` (the grid steps)."""
    dims = [cost_model.dims(keep) for keep in keeps]
    tables = []
    for row, cost in enumerate(cost_model.costs):
        if cost.name in specs:
            spec, calls = specs[cost.name]
            spec = replace(spec, whole_groups=cost.name in cost_model.whole_group_convs)
            tables.append(table_grid(cost.name, spec, calls, [d[1][row] for d in dims], [d[0][row] for d in dims]))
    return tables


def timed(tables: Sequence[LayerTable], ms: Mapping[str, float]) -> list[LayerTable]:
    """The tables with their times filled in from ``ms`` (milliseconds by spec key)."""
    filled = []
    for t in tables:
        values = [ms[p.key()] for p in t.points()]
        width = len(t.outs)
        filled.append(replace(t, ms=tuple(tuple(values[i:i + width]) for i in range(0, len(values), width))))
    return filled


class LatencyModel:
    """Predicted milliseconds of the model as a function of its conv/linear layers' channel counts.

    ``predict(out, cin)`` takes the counts of every layer of ``costs`` (as ``CostModel.dims`` gives them); the
    residual is calibrated so that the full-width model predicts exactly ``measured_ms``.
    """

    def __init__(self, tables: Sequence[LayerTable], costs: Sequence[LayerCost], measured_ms: float):
        self.tables = list(tables)
        index = {c.name: i for i, c in enumerate(costs)}
        self._rows = [index[t.name] for t in self.tables]
        self._positions = np.array([c.positions for c in costs], dtype=float)
        self._out0 = np.array([c.out_channels for c in costs], dtype=float)
        self._in0 = np.array([c.in_channels for c in costs], dtype=float)
        self._volume0 = float((self._out0 * self._positions).sum()) or 1.0
        self.measured_ms = float(measured_ms)
        self.layers_ms = self._layers(self._out0, self._in0)
        self.residual_ms = self.measured_ms - self.layers_ms

    def _layers(self, out: np.ndarray, cin: np.ndarray) -> float:
        return sum(t.predict(cin[r], out[r]) for t, r in zip(self.tables, self._rows, strict=True))

    def predict(self, out: np.ndarray, cin: np.ndarray) -> float:
        volume = float((out * self._positions).sum()) / self._volume0
        return self._layers(out, cin) + self.residual_ms * volume

    def to_dict(self) -> dict[str, Any]:
        return {"layers": len(self.tables), "points": sum(len(t.points()) for t in self.tables),
                "layers_ms": self.layers_ms, "residual_ms": self.residual_ms, "measured_ms": self.measured_ms}


# ----------------------------------------------------------------------------- the cache


def cache_dir() -> Path:
    """Where latency tables are kept: ``$PRUNECLI_CACHE/latency``, else ``$XDG_CACHE_HOME`` or ``~/.cache``,
    then ``prunecli/latency``."""
    root = os.environ.get("PRUNECLI_CACHE")
    if root:
        return Path(root) / "latency"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prunecli" / "latency"


@dataclass(frozen=True)
class TimingKey:
    """What a layer's time depends on besides its shape: one cache file per key."""

    runtime: str
    version: str
    device: str
    batch: int
    threads: int

    def filename(self) -> str:
        name = f"{self.runtime}-{self.version}-{self.device}-batch{self.batch}-threads{self.threads}"
        return re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".json"


@dataclass(frozen=True)
class CachedTimings:
    """Times by spec key, and how many were measured now or read back from ``path``."""

    ms: dict[str, float]
    path: Path
    measured: int
    reused: int

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "measured": self.measured, "reused": self.reused}


def _read_cache(path: Path, key: TimingKey) -> dict[str, float]:
    """The stored times of ``key``; an unreadable file or one of another key counts as empty (it is rewritten)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT or data.get("key") != asdict(key):
        return {}
    layers = data.get("layers")
    return {str(k): float(v) for k, v in layers.items()} if isinstance(layers, dict) else {}


def cached_timings(directory: Path, key: TimingKey, specs: Sequence[LayerSpec],
                   measure: Callable[[LayerSpec], float]) -> CachedTimings:
    """The time of every spec: read from the cache file of ``key``, the missing ones measured and the file
    rewritten once (atomically) with them."""
    path = Path(directory) / key.filename()
    stored = _read_cache(path, key)
    unique = list({s.key(): s for s in specs}.values())
    missing = [s for s in unique if s.key() not in stored]
    for spec in missing:
        stored[spec.key()] = float(measure(spec))
    if missing:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ExportError(f"cannot create the latency cache {path.parent} ({exc.strerror or exc}); "
                              "set PRUNECLI_CACHE to a writable folder") from exc
        document = {"format": CACHE_FORMAT, "key": asdict(key), "layers": dict(sorted(stored.items()))}
        with atomic_output(path, force=True) as tmp:
            tmp.write_text(json.dumps(document, indent=1) + "\n")
    return CachedTimings({s.key(): stored[s.key()] for s in unique}, path, len(missing), len(unique) - len(missing))


# ----------------------------------------------------------------------------- the correction loop


@dataclass(frozen=True)
class Attempt:
    """One slim model of the correction loop: the cost asked of the allocator, what its plan is predicted to
    cost, and what it measured (in the target's unit)."""

    requested: float
    predicted: float
    measured: float


def _next_request(steps: Sequence[Attempt], target: float) -> float:
    """Once attempts measured on both sides of the target: the secant through the closest on each side, the far one's
    miss halved for each further attempt in a row on the near side (the Illinois rule: plain regula falsi stalls on
    a curved response; a 0.7 target of MobileNetV2 measured 0.53, 0.83, then 0.62, 0.64 and 0.65, each fit pulled
    towards the far attempts). Before that, where the line fitted through the attempts (requested -> measured,
    least squares: the secant for two) meets the target; proportional from the last attempt when there is one, or
    when the fit rises less than half as steeply as proportion would: two plans a channel step apart measure nearly
    alike, and the flat line through them would send the next request to the floor."""
    last = steps[-1]
    below = [s for s in steps if s.measured < target]
    above = [s for s in steps if s.measured > target]
    if below and above:
        low, high = max(below, key=lambda s: s.measured), min(above, key=lambda s: s.measured)
        near_low = last.measured < target
        run = next((i for i, s in enumerate(reversed(steps)) if (s.measured < target) != near_low), len(steps))
        miss_low, miss_high = target - low.measured, high.measured - target
        if near_low:
            miss_high *= 0.5 ** (run - 1)
        else:
            miss_low *= 0.5 ** (run - 1)
        return low.requested + miss_low * (high.requested - low.requested) / (miss_low + miss_high)
    requested = np.array([s.requested for s in steps])
    measured = np.array([s.measured for s in steps])
    if len(steps) > 1 and np.ptp(requested) > 0:
        slope, intercept = np.polyfit(requested, measured, 1)
        if slope >= 0.5 * last.measured / last.requested:
            return float((target - intercept) / slope)
    return last.requested * target / last.measured


def correct_target(target: float, attempt: Callable[[float], tuple[float, float]], start: float | None, low: float,
                   high: float, tolerance: float, iterations: int,
                   known: Sequence[Attempt] | None = None) -> tuple[int, list[Attempt]]:
    """Ask the allocator for ``start``, measure, and correct the request until the measurement is within
    ``tolerance`` (a share of ``target``), ``iterations`` slim models were measured, or the next request
    repeats one (it was clamped to [low, high]).

    ``known``: attempts whose measurements the corrections use without timing them again; ``start`` None asks where
    they point. By default the unpruned model at ``high``: asked for its own cost, it keeps every channel and
    measures exactly that (a first attempt below the target is bracketed at once, where a step in proportion went
    back to a nearly unpruned model: MobileNetV2 asked for 0.6 of its time measured 0.35, then 0.98).

    Args:
        attempt: requested cost -> (predicted cost of its plan, measured latency).

    Returns:
        The index of the attempt closest to the target, and every attempt.
    """
    known = [Attempt(high, high, high)] if known is None else list(known)
    steps: list[Attempt] = []
    requested = min(max(_next_request(known, target) if start is None else start, low), high)
    while True:
        steps.append(Attempt(requested, *attempt(requested)))
        if abs(steps[-1].measured / target - 1) <= tolerance or len(steps) >= iterations:
            break
        requested = min(max(_next_request([*known, *steps], target), low), high)
        if any(math.isclose(requested, s.requested, rel_tol=1e-9) for s in steps):
            break
    best = min(range(len(steps)), key=lambda i: abs(steps[i].measured / target - 1))
    return best, steps
