"""Every checkpoint reader under mutation (issue 26 item 6): files that prunecli reads (slim safetensors, plain
safetensors and torch.save state dicts, containers, whole-model pickles in the zip and the legacy format, the
config.json and model.safetensors of a Hugging Face folder) with bytes
flipped, spliced, truncated or extended, property-based with hypothesis. Each read either gives a model or raises a
``PrunecliError`` (one line at the CLI), writes nothing, and never runs the code a pickle carries: a payload that
would create a marker file is planted in one seed. A bounded number of examples runs in the default suite; the
slow marker runs many more."""

from __future__ import annotations

import io
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

from prunecli.config import ModelSource
from prunecli.errors import PrunecliError
from prunecli.io.formats import open_checkpoint
from prunecli.io.slim import save_slim
from prunecli.samples import resnet20

HF = "hf-folder"  # the seeds' Hugging Face folder (config.json, model.safetensors)


class Payload:
    """Unpickling this would run ``exec`` and create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _seeds(folder: Path) -> dict[str, bytes]:
    """One valid file of every kind a reader claims (and one malicious pickle), as bytes."""
    model = resnet20()
    files: dict[str, bytes] = {}

    def saved(name: str, write) -> None:
        path = folder / name
        write(path)
        files[name] = path.read_bytes()
        path.unlink()

    saved("slim.safetensors", lambda p: save_slim(model, p, arch="sample:resnet20", input_shape=(1, 28, 28)))
    saved("weights.safetensors", lambda p: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(p)))
    saved("state.pt", lambda p: torch.save(model.state_dict(), p))
    saved("container.ckpt", lambda p: torch.save({"epoch": 3, "state_dict": model.state_dict(), "optimizer": {}}, p))
    whole = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    saved("whole.pt", lambda p: torch.save(whole, p))
    saved("legacy.pt", lambda p: torch.save(whole, p, _use_new_zipfile_serialization=False))
    buffer = io.BytesIO()
    pickle.dump({"model": Payload(str(folder / "PWNED"))}, buffer)
    files["payload.pt"] = buffer.getvalue()
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_channels=1,
                                       num_labels=3, image_size=32)
    transformers.ResNetForImageClassification(config).save_pretrained(folder / HF)
    for path in sorted((folder / HF).iterdir()):
        files[f"{HF}/{path.name}"] = path.read_bytes()
    return files


@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    folder = tmp_path_factory.mktemp("fuzz")
    return folder, _seeds(folder)


@st.composite
def mutated(draw, seeds: dict[str, bytes]) -> tuple[str, bytes]:
    """A seed file with a few bytes flipped (mostly near the start, where headers and pickle opcodes are), a run of
    bytes copied from elsewhere in it, a truncation or random bytes appended."""
    name = draw(st.sampled_from(sorted(seeds)))
    data = bytearray(seeds[name])
    head = min(len(data), 4096)
    for _ in range(draw(st.integers(0, 8))):
        at = draw(st.integers(0, head - 1) if draw(st.booleans()) else st.integers(0, len(data) - 1))
        data[at] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        start, length = draw(st.integers(0, len(data) - 1)), draw(st.integers(1, 64))
        to = draw(st.integers(0, len(data) - 1))
        data[to:to + length] = data[start:start + length]
    cut = draw(st.sampled_from(["none", "truncate", "extend"]))
    if cut == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif cut == "extend":
        data += draw(st.binary(min_size=1, max_size=256))
    return name, bytes(data)


def _read_one(folder: Path, name: str, data: bytes, seeds: dict[str, bytes], strict: bool = False) -> None:
    """Read ``data`` as the file ``name``; a file of a Hugging Face folder is read as that folder, its other files
    as they were saved. ``strict``: the PrunecliError is raised on, not checked and dropped."""
    case = folder / "case"
    shutil.rmtree(case, ignore_errors=True)
    path = case / name
    path.parent.mkdir(parents=True)
    for other, content in seeds.items():
        if other != name and other.startswith(f"{HF}/") and name.startswith(f"{HF}/"):
            (case / other).write_bytes(content)
    path.write_bytes(data)
    model_path = case / HF if name.startswith(f"{HF}/") else path
    before = sorted(str(p) for p in case.rglob("*"))
    try:
        open_checkpoint(ModelSource(model_path))  # without --trust-pickle
    except PrunecliError as exc:
        assert str(exc).strip(), "an error with nothing to say"
        if strict:
            raise
    finally:
        assert sorted(str(p) for p in case.rglob("*")) == before, "a reader wrote a file"
    assert not (folder / "PWNED").exists(), "a pickle ran code"


def _fuzz(seeds, examples: int) -> None:
    folder, files = seeds

    @settings(max_examples=examples, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(case=mutated(files))
    def check(case):
        _read_one(folder, *case, files)

    check()


def test_every_seed_reads_or_is_refused_in_one_line(seeds):
    folder, files = seeds
    for name, data in files.items():
        _read_one(folder, name, data, files)


@pytest.mark.parametrize(("name", "data", "words"), [
    ("legacy.pt", b"\x80", "is not a readable PyTorch checkpoint"),  # torch's safe unpickler: IndexError
    ("legacy.pt", b"\x80\x02R.", "is not a readable PyTorch checkpoint"),  # REDUCE on an empty stack: IndexError
    (f"{HF}/model.safetensors", b"", "too short for a safetensors file"),  # struct.error
], ids=["protocol-only", "reduce-on-empty-stack", "empty-folder-weights"])
def test_what_fuzzing_found_is_refused_in_one_line(seeds, name, data, words):
    """These raised other errors than prunecli's (a traceback at the CLI) before they were read as damage."""
    folder, files = seeds
    with pytest.raises(PrunecliError, match=words):
        _read_one(folder, name, data, files, strict=True)


def test_mutated_checkpoints_give_a_model_or_a_prunecli_error(seeds):
    _fuzz(seeds, 25)


@pytest.mark.slow
def test_mutated_checkpoints_at_length(seeds):
    _fuzz(seeds, 1000)
