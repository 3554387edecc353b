"""The README as a newcomer reads it: it opens with the two quick-start commands and names them unambiguously,
its examples do not write over each other's outputs, and (slow) the quick start prints the figures it quotes."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prunecli.cli import app
from prunecli.io.data import FASHION_MNIST_ROOT

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def commands() -> list[list[str]]:
    """Every indented shell command of the README, as ``benchmarks/readme_examples.py`` (which runs them) reads them."""
    spec = importlib.util.spec_from_file_location("readme_examples", ROOT / "benchmarks" / "readme_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.readme_commands(README)


def quick_start_prune() -> list[str]:
    first = README.splitlines()[0].strip()
    return shlex.split(first.split("&& .venv/bin/prunecli ", 1)[1])


def test_the_readme_opens_with_the_two_quick_start_commands_and_names_them():
    first, second = README.splitlines()[:2]
    assert first.startswith('    python3 -m venv .venv && .venv/bin/pip install -q -e ".[dev]" && .venv/bin/prunecli prune ')
    assert second == "    .venv/bin/pytest -q"
    assert README.splitlines()[3] == "# prunecli"
    text = " ".join(README.split())
    assert "The two commands at the very top of this page are the quick start" in text
    assert "The first (`python3 -m venv .venv && ... -o resnet20-slim.safetensors --force`) installs" in text
    assert "The second (`.venv/bin/pytest -q`) runs the test suite" in text
    assert "the first line above" not in text.lower()


def test_readme_prune_examples_write_different_files():
    outputs = [c[c.index("-o") + 1] for c in commands() if c[:2] == ["prunecli", "prune"] and "--force" not in c]
    assert len(outputs) >= 4
    assert len(set(outputs)) == len(outputs), outputs  # run in order, none fails with "already exists"


def test_the_docs_the_readme_points_to_exist():
    for path in set(re.findall(r"`(docs/[a-z-]+\.md)`", README)):
        assert (ROOT / path).is_file(), path
    assert "../shared" not in README


@pytest.mark.slow
def test_the_quick_start_prints_the_figures_the_readme_quotes(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(ROOT)  # the command's paths are relative to the clone
    args = quick_start_prune()
    assert args[args.index("-o") + 1] == "resnet20-slim.safetensors"
    output = tmp_path / "resnet20-slim.safetensors"
    args[args.index("-o") + 1] = str(output)
    run = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert run.exit_code == 0, run.output
    text = " ".join(run.stdout.replace("│", " ").split())
    assert "MACs 31.02M 15.76M 50.79%" in text and "params 272.19K 139.79K" in text
    assert "mean relative output error 0.1487 → 0.0483" in text
    quoted = " ".join(README.split())
    assert "MACs 31.02M → 15.76M (50.79% kept), params 272.19K → 139.79K" in quoted and "0.1487 → 0.0483" in quoted
    if not FASHION_MNIST_ROOT.is_dir():
        pytest.skip("the Fashion-MNIST test set (Debian's dataset-fashion-mnist) is not installed")
    evaluated = CliRunner().invoke(app, ["evaluate", str(output), "--data", "fashion-mnist:test", "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)["metrics"]
    assert (metrics["images"], f"{100 * metrics['top1']:.2f}") == (10000, "91.98")
    assert "gives 91.98% top-1 on the Fashion-MNIST test set, against 92.96% unpruned" in quoted


@pytest.mark.slow
def test_the_latency_example_runs_as_typed(tmp_path, monkeypatch):
    """Timing decides how far it prunes, so this checks that it runs, writes a faster model and says so: not its
    figures, which the README gives as one run's."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PRUNECLI_CACHE", str(tmp_path / "cache"))
    (args,) = [c[1:] for c in commands() if "--latency-target" in c]
    assert args[args.index("-o") + 1] == "mobilenetv2-fast.safetensors"
    args[args.index("-o") + 1] = str(tmp_path / "fast.safetensors")
    run = CliRunner().invoke(app, [*args, "--json"])
    assert run.exit_code == 0, run.output
    record = json.loads(run.stdout)["latency_target"]
    assert record["measured_ratio"] < 1 and (tmp_path / "fast.safetensors").is_file()
