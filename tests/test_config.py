"""Every config round-trips through to_dict / from_dict, through JSON, as the artifacts embed them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prunecli.config import (
    AnalyzeConfig,
    DataOptions,
    EdpOptions,
    EvaluateConfig,
    FinetuneConfig,
    FinetuneJob,
    ModelSource,
    PruneConfig,
    ScoreConfig,
    ScoringOptions,
    parse_budget,
)

SOURCE = ModelSource(Path("m.safetensors"), "sample:resnet20", {"num_classes": 10}, (1, 28, 28), True, (Path("code"),))
DATA = DataOptions("fashion-mnist:train", Path("/data"), 128, 32, (0.5,), (0.25,))
TRAINING = FinetuneConfig(epochs=2, lr=0.05, checkpoint=Path("ck.pt"), kd="fixed")
CONFIGS = [
    SOURCE,
    DATA,
    parse_budget("flops", "2.1G"),
    ScoringOptions("icie", {"icie_lambda": 0.5}, DATA, "max", "cpu", 3),
    TRAINING,
    EdpOptions(TRAINING, 1e-3, 1e-2, "identity", DATA),
    ScoreConfig(SOURCE, ScoringOptions("l1"), Path("s.json"), True, ("fc",), parse_budget("flops", "0.5"), 30.0, 5.0),
    EvaluateConfig(SOURCE, DATA, 100, "cpu", ModelSource(Path("orig.pt")), 7),
    AnalyzeConfig(SOURCE, ("fc*",), None, True, 8, ModelSource(Path("orig.pt"))),
    FinetuneJob(SOURCE, DATA, TRAINING, DATA, ModelSource(Path("teacher.pt")), Path("out.safetensors"), True, 10, 20),
    PruneConfig(SOURCE, parse_budget("params", "0.5"), method="edp", allocation="global", ignore=("fc",),
                output=Path("o.safetensors"), data=DATA, scores=Path("s.json"), soft=TRAINING,
                edp=EdpOptions(TRAINING), evaluate=DATA, eval_limit=5, criterion_options={"dct_band": "low"}),
    PruneConfig(SOURCE, parse_budget("ratio", "0.3")),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_every_config_round_trips_through_json(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert type(config).from_dict(data) == config


def test_a_prune_config_comes_back_from_the_provenance_an_artifact_records():
    config = CONFIGS[-2]
    assert "force" not in config.provenance()
    assert PruneConfig.from_dict(json.loads(json.dumps(config.provenance()))) == config
