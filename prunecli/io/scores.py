"""The scores file of ``prunecli score``: per-channel scores of every prunable group, tied to one model by its
sha256, which ``prune --scores`` reads back instead of scoring again."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from prunecli.errors import DataError
from prunecli.io.files import atomic_output, check_output_path, check_suffix

if TYPE_CHECKING:
    from prunecli.graph import ChannelGroup

SUFFIXES = (".json",)


def check_scores_output(path: Path, *, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse, before any work, an output that would clobber a file or is not a ``.json`` name."""
    check_output_path(path, force=force, inputs=inputs)
    check_suffix(path, SUFFIXES, "the scores file")


def write_scores(payload: Mapping[str, Any], path: Path, *, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Write a ``ScoreResult.to_dict()`` atomically, without its timing: identical runs write identical files."""
    payload = {k: v for k, v in payload.items() if k != "seconds"}
    with atomic_output(path, force=force, inputs=inputs) as tmp:
        tmp.write_text(json.dumps(payload, indent=1) + "\n")


def read_scores(
    path: Path, sha256: str, groups: Sequence[ChannelGroup], method: str = ""
) -> tuple[dict[int, torch.Tensor], str]:
    """Scores from a `prunecli score` file, refused unless made for the model with this ``sha256`` and these channel
    ``groups`` (and ``method``, if given); returns them by group index, with the method that made them."""
    try:
        payload = json.loads(Path(path).read_text())
        made_for, entries, made_with = payload["model"]["sha256"], payload["groups"], payload["method"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise DataError(f"--scores {path} is not a scores file written by `prunecli score`") from exc
    if made_for != sha256:
        raise DataError(f"--scores {path} was computed for another model (sha256 {made_for[:12]}...); score this one")
    if method and method != made_with:
        raise DataError(f"--scores {path} holds {made_with} scores but --method {method} was given; drop one of them")
    by_root = {g.root: g for g in groups}
    scores = {}
    for entry in entries:
        group = by_root.get(entry.get("root"))
        if group is None or group.channels != len(entry.get("scores", ())):
            raise DataError(f"--scores {path} does not match this model's channel groups; score it again")
        if group.prunable:
            scores[group.index] = torch.tensor(entry["scores"], dtype=torch.float64)
    return scores, made_with
