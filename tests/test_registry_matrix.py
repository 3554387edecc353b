"""Every registered criterion scores and prunes the sample architecture and a torchvision ResNet-18."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from prunecli import load
from prunecli.api import prune_model, score_model
from prunecli.budget import parse_budget
from prunecli.config import DataOptions, ModelSource, OutputOptions, PruneConfig, ScoreConfig, ScoringOptions
from prunecli.criteria import get_criterion, list_criteria
from prunecli.errors import DataError, OptionError
from prunecli.pipeline.removal import ROUNDING_TOLERANCE
from prunecli.samples import resnet20

MODELS = {
    "sample": ("sample:resnet20", (1, 28, 28), lambda: resnet20()),
    "resnet18": ("torchvision:resnet18", (3, 64, 64), lambda: torchvision.models.resnet18(weights=None, num_classes=10)),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """A checkpoint and 16 labelled calibration images per model."""
    root = tmp_path_factory.mktemp("matrix")
    made = {}
    for key, (_, shape, build) in MODELS.items():
        torch.manual_seed(0)
        checkpoint = root / f"{key}.pt"
        torch.save(build().state_dict(), checkpoint)
        data = root / f"{key}_calib.safetensors"
        save_file({"images": torch.randn(16, *shape), "labels": torch.arange(16) % 10}, str(data))
        made[key] = (checkpoint, data)
    return made


def _config(key: str, files, method: str, tmp_path: Path, **extra) -> PruneConfig:
    arch, shape, _ = MODELS[key]
    checkpoint, data = files[key]
    kwargs = {} if key == "sample" else {"num_classes": 10}
    return PruneConfig(
        source=ModelSource(checkpoint, arch, kwargs, shape),
        budget=parse_budget("macs", "0.5"),
        scoring=ScoringOptions(method),
        output=OutputOptions(tmp_path / f"{key}-{method}.safetensors"),
        data=DataOptions(str(data), calib_images=16, batch_size=8) if get_criterion(method).needs_data else None,
        **extra,
    )


@pytest.mark.parametrize("key", list(MODELS))
@pytest.mark.parametrize("method", list_criteria())
def test_every_criterion_prunes_to_budget(key, method, files, tmp_path):
    config = _config(key, files, method, tmp_path)
    result = prune_model(config)
    assert abs(result.macs_kept - 0.5) <= ROUNDING_TOLERANCE * 0.5  # the runtime's grid is coarse for ResNet-20
    assert result.channels_removed > 0
    slim = load(config.output.path)
    shape = MODELS[key][1]
    assert slim(torch.randn(2, *shape)).shape == (2, 10)
    assert sum(p.numel() for p in slim.parameters()) == result.after.params


def test_data_criterion_without_data_names_the_method(files, tmp_path):
    config = _config("sample", files, "l1", tmp_path)
    config = PruneConfig(config.source, config.budget, scoring=ScoringOptions("hrank"), output=config.output)
    with pytest.raises(OptionError, match=r"hrank.*--data"):
        prune_model(config)
    assert not config.output.path.exists()


def test_scores_file_round_trip_gives_the_same_model(files, tmp_path):
    """`score -o` then `prune --scores` removes exactly what a direct `prune` removes."""
    direct = _config("sample", files, "dct", tmp_path)
    scores = tmp_path / "scores.json"
    score_model(ScoreConfig(direct.source, ScoringOptions("dct"), direct.data, output=scores))
    payload = json.loads(scores.read_text())
    assert payload["method"] == "dct" and len(payload["groups"]) == 12
    assert all(len(g["scores"]) == g["channels"] == len(g["ranking"]) for g in payload["groups"])
    reused = PruneConfig(direct.source, direct.budget, scoring=ScoringOptions("", scores=scores),
                         output=OutputOptions(tmp_path / "reused.safetensors"))
    first, second = prune_model(direct), prune_model(reused)
    assert [c.out_after for c in first.layers] == [c.out_after for c in second.layers]
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(load(direct.output.path)(x), load(reused.output.path)(x))


def test_scores_file_of_another_model_is_refused(files, tmp_path):
    config = _config("sample", files, "l1", tmp_path)
    scores = tmp_path / "scores.json"
    score_model(ScoreConfig(config.source, ScoringOptions("l1"), output=scores))
    other_checkpoint = tmp_path / "other.pt"
    torch.manual_seed(1)
    torch.save(resnet20().state_dict(), other_checkpoint)
    other = ModelSource(other_checkpoint, "sample:resnet20", {}, (1, 28, 28))
    with pytest.raises(DataError, match="another model"):
        prune_model(PruneConfig(other, config.budget, scoring=ScoringOptions("", scores=scores),
                                output=OutputOptions(tmp_path / "o.safetensors")))
    assert not (tmp_path / "o.safetensors").exists()
