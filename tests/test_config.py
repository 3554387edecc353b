"""Every config round-trips through to_dict / from_dict, through JSON, as the artifacts embed them; the flat
provenance prunecli 0.1 wrote still reads; each option check lives with its config and is a usage error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from prunecli.budget import Budget, parse_budget
from prunecli.config import (
    AccuracyOptions,
    AnalyzeConfig,
    DataOptions,
    EdpOptions,
    EvaluateConfig,
    FinetuneConfig,
    FinetuneJob,
    LatencyOptions,
    LatencyTarget,
    ModelSource,
    OutputOptions,
    PlanOptions,
    PruneConfig,
    ReconstructOptions,
    RecoveryOptions,
    RunOptions,
    ScoreConfig,
    ScoringOptions,
    SoftOptions,
)
from prunecli.errors import OptionError

SOURCE = ModelSource(Path("m.safetensors"), "sample:resnet20", {"num_classes": 10}, (1, 28, 28), True, (Path("code"),))
DATA = DataOptions("fashion-mnist:train", Path("/data"), 128, 32, (0.5,), (0.25,))
TRAINING = FinetuneConfig(epochs=2, lr=0.05, checkpoint=Path("ck.pt"), kd="fixed")
RUN = RunOptions(3, "cpu", 30.0, 5.0, 2)
CONFIGS = [
    SOURCE,
    DATA,
    RUN,
    parse_budget("macs", "2.1G"),
    ScoringOptions("icie", {"icie_lambda": 0.5}, "max", "producers", Path("s.json")),
    TRAINING,
    EdpOptions(TRAINING, 1e-3, 1e-2, "identity", DATA),
    ScoreConfig(SOURCE, ScoringOptions("l1"), DATA, RUN, ("fc",), parse_budget("macs", "0.5"), Path("s.json"), True),
    EvaluateConfig(SOURCE, DATA, 100, "cpu", ModelSource(Path("orig.pt")), 7),
    AnalyzeConfig(SOURCE, ("fc*",), None, True, 8, ModelSource(Path("orig.pt"))),
    FinetuneJob(SOURCE, DATA, TRAINING, DATA, ModelSource(Path("teacher.pt")), Path("out.safetensors"), True, 10, 20),
    PruneConfig(SOURCE, parse_budget("params", "0.5"), DATA, ScoringOptions("edp", {"dct_band": "low"}),
                PlanOptions(ignore=("fc",)), RecoveryOptions(edp=EdpOptions(TRAINING)),
                AccuracyOptions(DATA, 5), output=OutputOptions(Path("o.safetensors"), True), run=RUN),
    PruneConfig(SOURCE, parse_budget("latency", "0.5"), DATA, ScoringOptions("l1", scores=Path("s.json")),
                PlanOptions("efficiency", 0.8, 8), RecoveryOptions(2, ReconstructOptions()),
                latency=LatencyOptions(True, 4, LatencyTarget("torch"))),
    PruneConfig(SOURCE, parse_budget("ratio", "0.3"), DATA, recovery=RecoveryOptions(soft=SoftOptions(TRAINING, 3))),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: type(c).__name__)
def test_every_config_round_trips_through_json(config):
    data = json.loads(json.dumps(config.to_dict()))
    assert type(config).from_dict(data) == config


def test_a_prune_config_comes_back_from_the_provenance_an_artifact_records():
    config = CONFIGS[-3]
    assert "force" not in config.provenance()["output"]
    again = PruneConfig.from_dict(json.loads(json.dumps(config.provenance())))
    assert again.output == OutputOptions(Path("o.safetensors"), False)
    assert again.scoring == config.scoring and again.recovery == config.recovery and again.run == config.run


def test_the_flat_provenance_prunecli_0_1_wrote_reads_as_the_nested_config():
    path = Path(__file__).parent / "data" / "resnet20-v0.1.0-slim.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        flat = json.loads(handle.metadata()["prunecli"])["config"]
    assert "method" in flat and "scoring" not in flat  # written before the config was nested
    config = PruneConfig.from_dict(flat)
    assert config.budget == Budget("macs", 0.2, False, "0.2")
    assert config.scoring == ScoringOptions("l1", {"dct_band": "full", "icie_capacity": "weight", "icie_lambda": 1.0},
                                            "mean", "all")
    assert config.data == DataOptions("sample_models/fmnist_calib.safetensors", calib_images=128, batch_size=64)
    assert config.plan == PlanOptions("uniform", 0.9, 1, ())
    assert config.recovery == RecoveryOptions(2, ReconstructOptions(1e-3, 64, 8, 0))
    assert config.latency == LatencyOptions(False, 16, None)
    assert config.output == OutputOptions(Path("/tmp/fx/resnet20-v0.1.0-slim.safetensors"), False)
    assert config.run == RunOptions(0, "cpu", 120.0, None, None)


def test_edp_takes_global_allocation_unless_told_otherwise_in_the_config_itself():
    edp = PruneConfig(SOURCE, parse_budget("macs", "0.5"), DATA, ScoringOptions("edp"),
                      recovery=RecoveryOptions(edp=EdpOptions(TRAINING)))
    assert edp.plan.allocation == "global"
    assert PruneConfig(SOURCE, parse_budget("macs", "0.5")).plan.allocation == "uniform"
    told = PruneConfig(SOURCE, parse_budget("macs", "0.5"), DATA, ScoringOptions("edp"), PlanOptions("uniform"),
                       RecoveryOptions(edp=EdpOptions(TRAINING)))
    assert told.plan.allocation == "uniform"


@pytest.mark.parametrize("build, message", [
    (lambda: PlanOptions("greedy"), "--allocation 'greedy' is not one of uniform, global, efficiency"),
    (lambda: PlanOptions(max_layer_ratio=1.0), "--max-layer-ratio 1.0 must lie strictly between 0 and 1"),
    (lambda: PlanOptions(round_to=0), "--round-to 0 must be a positive integer"),
    (lambda: ScoringOptions(group_reduction="median"), "--group-reduction 'median' is not one of mean, max, sum"),
    (lambda: RunOptions(threads=0), "--threads 0 must be at least 1"),
    (lambda: DataOptions("x", calib_images=0), "--calib-images 0 must be at least 1"),
    (lambda: LatencyOptions(batch=0), "--latency-batch 0 must be at least 1"),
    (lambda: SoftOptions(TRAINING, -1), "--reselect-every -1 must not be negative"),
    (lambda: PruneConfig(SOURCE, parse_budget("macs", "0.5"), recovery=RecoveryOptions(recalibrate_bn=2)),
     "--recalibrate-bn, --reconstruct, --soft-epochs and --allocation sensitivity need images"),
    (lambda: PruneConfig(SOURCE, parse_budget("macs", "0.5"), DATA, ScoringOptions("edp"),
                         recovery=RecoveryOptions(reconstruct=ReconstructOptions(), edp=EdpOptions(TRAINING))),
     "--reconstruct does not apply to --method edp"),
    (lambda: PruneConfig(SOURCE, parse_budget("macs", "0.5"), DATA, plan=PlanOptions("sensitivity"),
                         recovery=RecoveryOptions(soft=SoftOptions(TRAINING))),
     "--allocation sensitivity measures the model once before pruning"),
    (lambda: parse_budget("macs", "abc"), "--flops-target 'abc' is not a number"),
    (lambda: parse_budget("ratio", "1.2"), "--ratio '1.2' must be a fraction of channels to remove"),
])
def test_each_option_check_lives_with_its_config_and_is_a_usage_error(build, message):
    with pytest.raises(OptionError, match=message.replace("(", r"\(")):
        build()
