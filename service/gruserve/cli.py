"""The ``gruserve`` command line: import Keras models, inspect the repository, serve, train.

Every command turns a :class:`~gruserve.errors.GruServeError` into a one-line
message on stderr and exit code 1 (2 for a bad ``GRUSERVE_*`` setting, a usage
error like a bad option); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gruserve import __version__
from gruserve.errors import GruServeError, MissingDependency, SettingsError
from gruserve.export.tolerance import ATOL, RTOL
from gruserve.settings import Settings

app = typer.Typer(
    name="gruserve",
    help="Serve Keras GRU models with per-session state.",
    no_args_is_help=True,
    add_completion=False,
    # "[default: ...]" after every option's help
    context_settings={"show_default": True},
)
console = Console()
errors = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

ModelsDir = Annotated[
    Path,
    typer.Option("--models-dir", help="Model repository folder.", envvar="GRUSERVE_MODELS_DIR"),
]


def _print_version(value: bool) -> None:
    if value:
        console.print(f"gruserve {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            help="Print gruserve's version and exit.",
            callback=_print_version,
            is_eager=True,
            show_default=False,
        ),
    ] = False,
) -> None:
    """Serve Keras GRU models with per-session state."""


def _falls_back(help_text: str, field: str) -> str:
    """``help_text`` and the default of an option that falls back to a setting."""
    default = Settings.model_fields[field].default
    return escape(f"{help_text} [default: {f'GRUSERVE_{field}'.upper()}, else {default}]")


def _reports_errors(func: F) -> F:
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except SettingsError as exc:
            for problem in exc.problems:
                errors.print(
                    f"[bold red]error:[/] {escape(problem)}", highlight=False, soft_wrap=True
                )
            raise typer.Exit(2) from None
        except GruServeError as exc:
            errors.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _require(module: str, extra: str, purpose: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingDependency(module, extra, purpose)


@app.command("import-keras")
@_reports_errors
def import_keras(
    path: Annotated[
        Path,
        typer.Argument(help="A .keras file or unzipped folder, or a Keras 3 / tf-keras .h5 file."),
    ],
    name: Annotated[str, typer.Option("--name", help="Model name in the repository.")],
    version: Annotated[
        int | None, typer.Option("--version", help="Version number (default: next).")
    ] = None,
    models_dir: ModelsDir = Path("models"),
    reference: Annotated[
        str, typer.Option(help="float32 reference of the parity check: auto, torch or numpy.")
    ] = "auto",
    strategy: Annotated[
        str,
        typer.Option(
            help="Recurrent layers as: auto (native GRU node where exact, else the loop), "
            "native, loop or unrolled."
        ),
    ] = "auto",
    atol: Annotated[
        float, typer.Option(help="Parity tolerance against Keras's float64 result: absolute.")
    ] = ATOL,
    rtol: Annotated[float, typer.Option(help="Parity tolerance: relative.")] = RTOL,
    no_verify: Annotated[
        bool,
        typer.Option(
            "--no-verify", help="Write without the parity check (recorded as unverified)."
        ),
    ] = False,
) -> None:
    """Convert a trained Keras model (no TensorFlow needed) into models/NAME/VERSION.

    PATH is a .keras file, a folder written by model.save(path, zipped=False),
    or a Keras 3 / tf-keras .h5 file.
    """
    _require("onnx", "convert", "import-keras")
    _require("h5py", "convert", "import-keras")
    from gruserve.export.exporter import export_model
    from gruserve.keras_io import load_keras_model

    with console.status(f"reading {path}"):
        loaded = load_keras_model(path)
    with console.status("building the ONNX graph and checking parity"):
        result = export_model(
            loaded.spec,
            loaded.weights,
            models_dir=models_dir,
            name=name,
            version=version,
            source=loaded.source,
            reference=reference,
            strategy=strategy,
            atol=atol,
            rtol=rtol,
            verify=not no_verify,
        )
    console.print(f"[green]wrote[/] {result.path} ({_parity_line(result.manifest.parity)})")


def _yes_no(flag: Any) -> str:
    """A manifest's true/false as the table shows it; "-" where it has none."""
    return "yes" if flag is True else "no" if flag is False else "-"


def _parity_line(parity: dict[str, Any]) -> str:
    if not parity.get("verified", True):
        return "[yellow]unverified[/]: written without the parity check"
    single = parity.get("float32_reference", "float32")
    return (
        f"parity max |diff| {parity['max_abs_diff']:.2e} vs {parity['reference']}, "
        f"{single} {parity.get('float32_max_abs_diff', 0.0):.2e}"
    )


@app.command("export-keras")
@_reports_errors
def export_keras(
    model: Annotated[Path, typer.Argument(help="models/NAME (latest) or models/NAME/VERSION.")],
    out: Annotated[Path, typer.Argument(help="The .keras file to write.")],
) -> None:
    """Write one repository version back as a .keras file that Keras 3 loads (no Keras needed)."""
    _require("onnx", "convert", "export-keras")
    _require("h5py", "convert", "export-keras")
    import onnx

    from gruserve.keras_io.writer import onnx_weights, spec_of_manifest, write_keras_file

    chosen = _load_model_version(Path(model))
    spec = spec_of_manifest(chosen.manifest)
    weights = onnx_weights(onnx.load(str(chosen.onnx_path)), spec)
    write_keras_file(spec, weights, out)
    m = chosen.manifest
    console.print(f"[green]wrote[/] {out} ({m.name} v{m.version}, {len(spec.layers)} layers)")


def _load_model_version(path: Path) -> Any:
    """``models/NAME/VERSION``, or the newest version of ``models/NAME``."""
    from gruserve.repository import load_version, versions

    if path.name.isdigit():
        return load_version(path)
    available = versions(path)
    if not available:
        raise GruServeError(f"{path}: no model versions found (expected {path}/1/model.json)")
    return load_version(path / str(available[-1]))


@app.command()
@_reports_errors
def inspect(
    model: Annotated[Path, typer.Argument(help="models/NAME or models/NAME/VERSION.")],
) -> None:
    """Print a readable summary of one model in the repository."""
    from gruserve.repository import load_version, versions

    path = Path(model)
    if path.name.isdigit():
        chosen, available = load_version(path), versions(path.parent)
    else:
        available = versions(path)
        if not available:
            raise GruServeError(f"{path}: no model versions found (expected {path}/1/model.json)")
        chosen = load_version(path / str(available[-1]))
    console.print(_summary(chosen, available))


def _summary(chosen: Any, available: list[int]) -> Table:
    m = chosen.manifest
    overview = Table.grid(padding=(0, 2))
    overview.add_row(
        "[bold]model[/]", f"{m.name} v{m.version} (versions: {', '.join(map(str, available))})"
    )
    overview.add_row(
        "[bold]onnx[/]",
        f"{chosen.onnx_path} opset {m.opset}, IR {m.ir_version}, sha256 {m.onnx_sha256[:16]}…",
    )
    overview.add_row("[bold]source[/]", ", ".join(f"{k}={v}" for k, v in m.source.items()) or "-")
    layout = "time-major" if m.time_major else "batch-major"
    overview.add_row(
        "[bold]layout[/]",
        f"{layout}; Keras {m.keras_version} semantics; "
        f"{'one output per timestep' if m.output_per_timestep else 'one output per sequence'}",
    )
    tensors = Table("role", "tensor", "dtype", "shape", box=None)
    tensors.columns[1].overflow = "fold"  # names are identifiers: wrap, never truncate
    for role, items in (("input", m.inputs), ("output", m.outputs)):
        for t in items:
            tensors.add_row(role, t.name, t.dtype, escape(str(t.shape)))
    for s in m.states:
        tensors.add_row("state in", s.input, "float32", escape(str(["batch", s.units])))
        tensors.add_row("state out", s.output, "float32", escape(str(["batch", s.units])))
    layers = Table("layer", "class", "export", "cuDNN", "notes", box=None)
    for layer in m.layers:
        export = layer.export or {}
        layers.add_row(
            layer.name,
            layer.class_name,
            export.get("strategy", "-"),
            _yes_no(export.get("cudnn_eligible")),
            "; ".join(export.get("notes", [])),
        )
    parity = m.parity
    if not parity.get("verified", True):
        overview.add_row("[bold]parity[/]", f"[yellow]unverified[/] ({parity.get('reason', '')})")
    else:
        verdict = "[green]passed[/]" if parity.get("passed") else "[red]FAILED[/]"
        cases = ", ".join(f"{c['case']} {c['max_abs_diff']:.1e}" for c in parity.get("cases", []))
        overview.add_row(
            "[bold]parity[/]",
            f"{verdict} vs {parity.get('reference')}: max |diff| "
            f"{parity.get('max_abs_diff', float('nan')):.2e} ({cases})",
        )
    if m.metrics:
        overview.add_row("[bold]metrics[/]", ", ".join(f"{k}={v}" for k, v in m.metrics.items()))
    outer = Table.grid()
    outer.add_row(overview)
    outer.add_row("")
    outer.add_row(tensors)
    outer.add_row("")
    outer.add_row(layers)
    return outer


@app.command()
@_reports_errors
def serve(
    models_dir: Annotated[
        Path | None,
        typer.Option(
            "--models-dir",
            help=_falls_back("Model repository folder.", "models_dir"),
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str | None,
        typer.Option(help=_falls_back("Bind address.", "host"), show_default=False),
    ] = None,
    port: Annotated[
        int | None, typer.Option(help=_falls_back("Port.", "port"), show_default=False)
    ] = None,
    grpc_port: Annotated[
        int | None,
        typer.Option(
            help=_falls_back("gRPC port (KServe v2 / Triton); 0: no gRPC.", "grpc_port"),
            show_default=False,
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help=_falls_back("Worker processes sharing the port (needs a Redis store).", "workers"),
            min=1,
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve every model in the repository over HTTP and gRPC.

    Every other setting comes from GRUSERVE_* variables or a .env file (README,
    "Settings"); an unknown GRUSERVE_* name is warned about, a bad value exits with 2.
    """
    from gruserve.server import run_server

    run_server(models_dir=models_dir, host=host, port=port, grpc_port=grpc_port, workers=workers)


@app.command()
@_reports_errors
def train(
    config: Annotated[Path, typer.Argument(help="Training configuration (YAML).")],
    models_dir: ModelsDir = Path("models"),
) -> None:
    """Train a Keras-style model in torch and export it into the repository."""
    _require("torch", "train", "gruserve train")
    from gruserve.train.command import run_training

    run_training(config, models_dir=models_dir)


def main() -> None:  # pragma: no cover - console-script shim
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
