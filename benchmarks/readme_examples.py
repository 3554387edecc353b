"""Run the README's examples as typed, in order, and print the figures they give (README: "each example runs as typed
in a fresh clone, in order, and the figures it quotes are what the commands print").

Every indented command of README.md runs in a scratch folder that sees the clone's ``sample_models/``. A command
that names a file the reader supplies runs once per stand-in below (the README says which it quotes); the EDP
example (3 epochs of Fashion-MNIST, most of an hour on a CPU) runs only with ``--with-edp``. Each slim model a
command writes from a sample model is evaluated on the Fashion-MNIST test set. Needs Debian's ``dataset-fashion-mnist``.

    python benchmarks/readme_examples.py            # a Markdown table on stdout, progress on stderr
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = "sample_models"
RESNET20, MOBILENETV2 = f"{SAMPLES}/resnet20_fmnist.safetensors", f"{SAMPLES}/mobilenetv2_fmnist.safetensors"
CALIB = f"{SAMPLES}/fmnist_calib.safetensors"
# what stands in for the files a reader supplies, per command (keyed by the command's output); the README quotes these
STAND_INS: dict[str, list[dict[str, str]]] = {
    "resnet50-slim.safetensors": [{"resnet50.pt": "resnet50.pt"}],  # made here: torchvision's, random weights
    "yolov8n-slim.pt": [{"yolov8n.pt": "yolov8n.pt"}],  # made here: Ultralytics' YOLOv8n from its yaml
    "model-slim.safetensors": [{"model.safetensors": RESNET20, "calibration-images/": "fashion-mnist:train"},
                               {"model.safetensors": MOBILENETV2, "calibration-images/": "fashion-mnist:train"}],
    "model-sensitivity.safetensors": [{"model.safetensors": MOBILENETV2, "calibration-images/": CALIB}],
    "slim-ft.safetensors": [{"slim.safetensors": "resnet20-slim.safetensors"}],  # the quick start's output
}


def readme_commands(readme: str) -> list[list[str]]:
    """Every indented shell command of the README, continuation lines joined, as argument lists."""
    found, lines = [], readme.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("    ") and line.strip().split(" ")[0] in ("prunecli", "python3", ".venv/bin/pytest"):
            text = line.strip()
            while text.endswith("\\"):
                i += 1
                text = text[:-1] + " " + lines[i].strip()
            found.append(shlex.split(text))
        i += 1
    return found


def runnable(readme: str, with_edp: bool) -> list[tuple[str, list[str]]]:
    """(label, arguments after ``prunecli``) for every example to run, stand-ins put in, in README order; the quick
    start's prune first, as its own line writes it."""
    first = readme.splitlines()[0].strip()
    runs = [("quick start", shlex.split(first.split("&& .venv/bin/prunecli ", 1)[1]))]
    for command in readme_commands(readme)[2:]:
        if command[0] != "prunecli" or ("--method" in command and command[command.index("--method") + 1] == "edp"
                                        and not with_edp):
            continue
        args = command[1:]
        output = args[args.index("-o") + 1] if "-o" in args else None
        for stand_in in STAND_INS.get(output, [{}]):
            label = ", ".join(f"{k} = {v}" for k, v in stand_in.items() if k != v)
            runs.append((label, [stand_in.get(a, a) for a in args]))
    return runs


def _prunecli(args: list[str], cwd: Path) -> tuple[int, str, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "prunecli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    return done.returncode, done.stdout + done.stderr, time.perf_counter() - start


def _top1(model: Path, cwd: Path) -> str:
    rc, out, _ = _prunecli(["evaluate", str(model), "--data", "fashion-mnist:test", "--json"], cwd)
    return f"{100 * json.loads(out[out.index('{'):])['metrics']['top1']:.2f}%" if rc == 0 else "evaluate failed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--with-edp", action="store_true", help="also run the EDP example (most of an hour on a CPU)")
    args = parser.parse_args()
    readme = (ROOT / "README.md").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / SAMPLES).symlink_to(ROOT / SAMPLES)
        import torch
        import torchvision
        from ultralytics import YOLO  # the [yolo] extra

        torch.save(torchvision.models.resnet50(weights=None).state_dict(), work / "resnet50.pt")
        YOLO("yolov8n.yaml").save(work / "yolov8n.pt")  # as Ultralytics writes it; random weights, nothing downloaded
        print("| example | stand-ins | exit | s | summary | top-1 (Fashion-MNIST test) |")
        print("|---|---|---|---|---|---|")
        for label, command in runnable(readme, args.with_edp):
            print("running: prunecli " + shlex.join(command), file=sys.stderr, flush=True)
            output = work / command[command.index("-o") + 1] if "-o" in command else None
            again = output is not None and output.exists()  # a second stand-in writes where the first did
            rc, out, seconds = _prunecli([*command, "--force"] if again else command, work)
            flat = " ".join(out.replace("│", " ").split())
            summary = [f"MACs {a} → {b} ({kept} kept)" for a, b, kept in re.findall(r"MACs (\S+) (\S+) (\S+%)", flat)]
            summary += re.findall(r"measured [0-9.]+ ms → [0-9.]+ ms \([0-9.]+ of the original; target [0-9.]+", flat)
            fmnist = command[1].startswith(SAMPLES) or command[1] == "resnet20-slim.safetensors"  # a Fashion-MNIST model
            top1 = _top1(output, work) if rc == 0 and output and output.suffix == ".safetensors" and fmnist else ""
            shown = " ".join(command[:2]) + (" ... " + " ".join(command[-2:]) if len(command) > 2 else "")
            print(f"| `{shown}` | {label} | {rc} | {seconds:.0f} | {'; '.join(summary) or out.strip().splitlines()[-1]} "
                  f"| {top1} |", flush=True)


if __name__ == "__main__":
    main()
