"""Package-level promises: a light import, one version, lazy API re-exports."""

import subprocess
import sys

import pytest

import prunecli


def test_import_is_light():
    heavy = ("torch", "torchvision", "torch_pruning", "rich")
    code = f"import sys, prunecli; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_version_is_single_sourced():
    from importlib.metadata import version

    assert version("prunecli") == prunecli.__version__


def test_lazy_exports_resolve():
    from prunecli import api
    from prunecli.io import formats, slim

    expected = {"load": formats.load, "save_slim": slim.save_slim, "analyze_model": api.analyze_model,
                "score_model": api.score_model, "prune_model": api.prune_model, "evaluate_model": api.evaluate_model,
                "finetune_model": api.finetune_model, "export_artifact": api.export_artifact}
    exported = {name: getattr(prunecli, name) for name in prunecli.__all__ if name != "__version__"}
    assert exported == expected  # each name is the library's own function, not a stand-in
    with pytest.raises(AttributeError, match="module 'prunecli' has no attribute 'prune'"):
        prunecli.prune  # noqa: B018 (the lazy lookup must not invent names)
