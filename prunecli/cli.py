"""Typer commands: parse options into a config, call one API function, render the result."""

from __future__ import annotations

import sys
from contextlib import nullcontext
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from prunecli import __version__
from prunecli.errors import PrunecliError

app = typer.Typer(
    name="prunecli",
    help="Make trained PyTorch CNNs smaller and faster by structured filter pruning.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()
_state = {"debug": False}


def _methods() -> list[str]:
    from prunecli.criteria import list_criteria

    return list_criteria()


Method = Enum("Method", {name: name for name in _methods()}, type=str)


class Allocation(str, Enum):
    uniform = "uniform"
    global_ = "global"
    dispersion = "dispersion"


class Reduction(str, Enum):
    mean = "mean"
    max = "max"
    sum = "sum"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"prunecli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


def _fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _run(call):
    """Domain errors become one line and exit 1; Ctrl-C exits 130; anything else is an internal error."""
    if _state["debug"]:
        return call()
    try:
        return call()
    except PrunecliError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted; no output was written", 130)
    except MemoryError:
        _fail("out of memory; try a smaller --input-shape or batch size")
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        _fail(f"internal error ({type(exc).__name__}: {first[:200]}); rerun with --debug and report it")


ModelArg = Annotated[Path, typer.Argument(help="Model file: prunecli .safetensors, a state dict (.safetensors/.pt/.pth) or a pickled model.", show_default=False)]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="Base architecture: torchvision:resnet50, sample:resnet20, pkg.module:factory or file.py:factory. Detected for torchvision weights and slim files.")]
ArchKwargsOpt = Annotated[str | None, typer.Option("--arch-kwargs", help='JSON keyword arguments for the factory, e.g. \'{"num_classes": 10}\'.')]
InputShapeOpt = Annotated[str | None, typer.Option("--input-shape", help="Input CxHxW, e.g. 3x224x224 (default: by architecture, or stored in slim files).")]
TrustPickleOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow full pickles that name your own classes. Unpickling runs code from the file: only for files you trust.")]
ImportPathOpt = Annotated[list[Path] | None, typer.Option("--import-path", help="Folder added to sys.path so your classes resolve (repeatable).")]
IgnoreOpt = Annotated[list[str] | None, typer.Option("--ignore", help="Glob of layer names whose output channels stay (repeatable). The layers that feed the model output are always kept.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout and nothing else.")]
QuietOpt = Annotated[bool, typer.Option("-q", "--quiet", help="No progress output.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds allowed for tracing the model's dependencies.", min=1)]


def _source(model, arch, arch_kwargs, input_shape, trust_pickle, import_path):
    from prunecli.config import ModelSource
    from prunecli.io.arch import parse_arch_kwargs, parse_input_shape

    return ModelSource(
        path=model,
        arch=arch,
        arch_kwargs=parse_arch_kwargs(arch_kwargs),
        input_shape=parse_input_shape(input_shape) if input_shape else None,
        trust_pickle=trust_pickle,
        import_paths=tuple(import_path or ()),
    )


def _status(quiet: bool, as_json: bool):
    """A spinner on stderr that the API's progress messages update; silent with -q or --json."""
    if quiet or as_json or not err.is_terminal:
        return nullcontext(None)
    return err.status("starting")


@app.command()
def analyze(
    model: ModelArg,
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    input_shape: InputShapeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    import_path: ImportPathOpt = None,
    ignore: IgnoreOpt = None,
    timeout: TimeoutOpt = 300.0,
    as_json: JsonOpt = False,
) -> None:
    """Layers, parameters, MACs (conv + linear multiply-accumulates, the thop convention the papers use)
    and the prunable channel groups of a model."""

    def call():
        from prunecli.api import analyze_model
        from prunecli.config import AnalyzeConfig
        from prunecli.report import print_json, render_analyze

        config = AnalyzeConfig(
            _source(model, arch, arch_kwargs, input_shape, trust_pickle, import_path), tuple(ignore or ()), timeout
        )
        result = analyze_model(config)
        print_json(result) if as_json else render_analyze(result, out)

    _run(call)


@app.command()
def prune(
    model: ModelArg,
    method: Annotated[Method, typer.Option("--method", "-m", help="Importance criterion (see `prunecli score --help` for each one's source).")] = "l1",
    flops_target: Annotated[str | None, typer.Option("--flops-target", help="MACs to keep: a fraction (0.5), a percentage (50%) or a count (2.1G).")] = None,
    params_target: Annotated[str | None, typer.Option("--params-target", help="Parameters to keep: a fraction, a percentage or a count (11M).")] = None,
    ratio: Annotated[str | None, typer.Option("--ratio", help="Share of each prunable group's channels to remove, e.g. 0.3.")] = None,
    allocation: Annotated[Allocation, typer.Option("--allocation", help="uniform: the same ratio in every group; global: one threshold on normalised scores across groups; dispersion: SFP's kernel dispersion sets each group's ratio.")] = Allocation.uniform,
    max_layer_ratio: Annotated[float, typer.Option("--max-layer-ratio", help="Most of one group's channels that may go (at least one always stays).")] = 0.9,
    round_to: Annotated[int, typer.Option("--round-to", help="Keep channel counts at multiples of N (hardware-friendly).", min=1)] = 1,
    ignore: IgnoreOpt = None,
    group_reduction: Annotated[Reduction, typer.Option("--group-reduction", help="How the layers of a coupled group combine their (per-layer normalised) scores.")] = Reduction.mean,
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Output file (.safetensors); default <input>.slim.safetensors beside the input.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output file.")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (random criterion, sampling).")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")] = "auto",
    arch: ArchOpt = None,
    arch_kwargs: ArchKwargsOpt = None,
    input_shape: InputShapeOpt = None,
    trust_pickle: TrustPickleOpt = False,
    import_path: ImportPathOpt = None,
    timeout: TimeoutOpt = 300.0,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Physically remove channels to reach a MACs, parameter or ratio budget, and write a slim model."""
    budgets = [(k, v) for k, v in (("flops", flops_target), ("params", params_target), ("ratio", ratio)) if v is not None]
    if len(budgets) != 1:
        err.print("[bold red]error:[/] give exactly one budget: --flops-target, --params-target or --ratio")
        raise typer.Exit(2)

    def call():
        from prunecli.api import prune_model, resolve_device
        from prunecli.config import PruneConfig, parse_budget
        from prunecli.report import print_json, render_prune

        config = PruneConfig(
            source=_source(model, arch, arch_kwargs, input_shape, trust_pickle, import_path),
            budget=parse_budget(*budgets[0]),
            method=method.value if isinstance(method, Enum) else method,
            allocation=allocation.value,
            max_layer_ratio=max_layer_ratio,
            round_to=round_to,
            ignore=tuple(ignore or ()),
            group_reduction=group_reduction.value,
            output=output,
            force=force,
            seed=seed,
            device=str(resolve_device(device)),
            timeout=timeout,
        )
        with _status(quiet, as_json) as status:
            result = prune_model(config, progress=status.update if status else None)
        print_json(result) if as_json else render_prune(result, out)

    _run(call)


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
