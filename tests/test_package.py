"""Package-level promises: a light import, one version, lazy API re-exports."""

import subprocess
import sys

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
    for name in prunecli.__all__:
        assert getattr(prunecli, name) is not None
