"""The ``loramerge`` command line. Errors a user can fix print one line and exit with code 2."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__
from .errors import LoraMergeError, OutputPathError, UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Read, merge and convert LoRA adapters of diffusion models (SD1/2, SDXL, SD3, Flux), exactly, on ΔW.",
)
err = Console(stderr=True)
out = Console()


def run_guarded(fn: Callable[[], None]) -> None:
    """Run a command; a LoraMergeError becomes one line on stderr and exit code 2."""
    try:
        fn()
    except LoraMergeError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def parse_source(spec: str) -> tuple[str, float]:
    """'a.safetensors:0.7' → ('a.safetensors', 0.7); no weight means 1.0."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def check_output(output: Path, inputs: list[str]) -> None:
    from .formats.write import same_file

    for source in inputs:
        if Path(source).resolve() == output.resolve() or same_file(source, output):
            raise OutputPathError(f"output would overwrite the input {source}", output)


def make_progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


def _set_threads(threads: Optional[int]) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------


@app.command()
def inspect(
    file: Path = typer.Argument(..., help="LoRA file (.safetensors, or a PEFT folder)"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    arch: Optional[str] = typer.Option(None, help="Override architecture detection (sd1, sd2, sdxl, sd3, flux)."),
    no_norms: bool = typer.Option(False, "--no-norms", help="Skip the per-block ‖ΔW‖ (reads no tensor data)."),
):
    """Architecture, format, components, module count, ranks, alphas, per-block norms, provenance."""

    def body():
        from . import report
        from .merge import load

        summary = report.summarize(load(file, arch=arch), norms=not no_norms)
        if as_json:
            print(json.dumps(summary, indent=2))
        else:
            out.print(report.format_summary(summary), highlight=False, soft_wrap=True)

    run_guarded(body)


@app.command()
def merge(
    sources: List[str] = typer.Argument(..., help="LoRA files, each optionally with a weight: A.safetensors:0.7"),
    output: Path = typer.Option(..., "-o", "--output", help="Output .safetensors file."),
    method: str = typer.Option("linear", "--method", "-m", help="linear, cat, svd (see `loramerge methods`)."),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="Target rank (svd-type methods)."),
    energy: Optional[float] = typer.Option(None, "--energy", help="Keep this fraction of Σσ² per module instead of a fixed rank."),
    format: str = typer.Option("kohya", "--format", "-f", help="Output format: kohya or diffusers."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype fp16|bf16|fp32 (default: the inputs')."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    seed: int = typer.Option(0, "--seed", help="Seed for methods that draw random numbers."),
    param: List[str] = typer.Option([], "--param", "-p", help="Method parameter NAME=VALUE (repeatable)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Override architecture detection of the inputs."),
    title: Optional[str] = typer.Option(None, "--title", help="modelspec.title of the output."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
):
    """Merge LoRAs on ΔW and write one LoRA file."""

    def body():
        from .formats.write import FORMATS, resolve_dtype
        from .merge import load, merge as merge_loras

        _set_threads(threads)
        if format not in FORMATS:
            raise UsageError(f"unknown format {format!r}; use kohya or diffusers")
        resolve_dtype(dtype)
        parsed = [parse_source(s) for s in sources]
        check_output(output, [p for p, _ in parsed])
        params = _parse_params(param)
        start = time.perf_counter()
        loras = [load(p, arch=arch) for p, _ in parsed]
        with make_progress() as progress:
            task = progress.add_task(f"merging ({method})", total=None)

            def tick(done, total, key):
                progress.update(task, completed=done, total=total)

            result = merge_loras(
                loras, [w for _, w in parsed], method=method, rank=rank, energy=energy,
                seed=seed, device=device, progress=tick, **params,
            )
        extra = {"modelspec.title": title} if title else None
        result.save(output, format=format, dtype=dtype, metadata=extra)
        _print_merge_summary(result, output, time.perf_counter() - start)

    run_guarded(body)


def _parse_params(items: list[str]) -> dict[str, str]:
    params = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UsageError(f"--param expects NAME=VALUE, got {item!r}")
        params[name.strip()] = value.strip()
    return params


def _print_merge_summary(result, output: Path, seconds: float) -> None:
    ranks = sorted({m.rank for m in result})
    rank_text = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}–{ranks[-1]}"
    kept = [s["energy_kept"] for s in result.stats.values() if "energy_kept" in s]
    extra = f", min energy kept {min(kept):.4f}" if kept else ""
    err.print(
        f"wrote {output}: {len(result)} modules ({result.arch}), rank {rank_text}{extra}, {seconds:.1f} s",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def convert(
    file: Path = typer.Argument(..., help="LoRA file to convert."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .safetensors file."),
    format: str = typer.Option("kohya", "--format", "-f", help="kohya or diffusers."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype fp16|bf16|fp32 (default: the input's)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Override architecture detection."),
):
    """Rewrite a LoRA in another format (its ΔW unchanged)."""

    def body():
        from .merge import load

        check_output(output, [str(file)])
        lora = load(file, arch=arch)
        lora.save(output, format=format, dtype=dtype)
        err.print(f"wrote {output}: {len(lora)} modules ({lora.arch}, {lora.format} → {format})", highlight=False, soft_wrap=True)

    run_guarded(body)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("loramerge-demo"), "--out", help="Folder to write into."),
):
    """Merge the two bundled example LoRAs and print the merged file's summary."""

    def body():
        from importlib import resources

        from . import report
        from .merge import load, merge as merge_loras

        examples = resources.files("loramerge") / "examples"
        style, subject = load(examples / "style.safetensors"), load(examples / "subject.safetensors")
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / "merged.safetensors"
        result = merge_loras([style, subject], [0.7, 0.8], method="svd", rank=8)
        result.save(target, format="kohya")
        err.print(f"merged {style.format} 'style' × 0.7 + {subject.format} 'subject' × 0.8 → {target} (svd, rank 8)",
                  highlight=False, soft_wrap=True)
        out.print(report.format_summary(report.summarize(load(target))), highlight=False, soft_wrap=True)

    run_guarded(body)


@app.command()
def methods():
    """List the merge methods and their parameters."""
    from .methods import METHODS

    for m in sorted(METHODS.values(), key=lambda m: m.name):
        out.print(f"[bold]{m.name}[/]  {m.summary}", highlight=False)
        for p in m.params:
            out.print(f"    {p.name} = {p.default!r}  {p.help}", highlight=False)


@app.command()
def version():
    """Print the version."""
    out.print(__version__)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
