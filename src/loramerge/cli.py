"""The ``loramerge`` command line.

One error boundary (:func:`run_guarded` for the commands, :func:`main` for option parsing):
every failure a user can reach prints ONE plain-text line on stderr (``error: …``; control
characters escaped, rich markup never interpreted) and exits with code 2; an unexpected
internal error prints one line too (``internal error: …; please report it``) and exits with
code 3, unless ``LORAMERGE_DEBUG`` is set (then the traceback). Warnings print as one line
(``warning: …``) and do not change the exit code.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

try:  # typer ≥ 0.22 vendors click; older typer uses the click package
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors

from .version import __version__
from .errors import ClientWarning, LoraMergeError, UsageError, one_line
from .outputs import check_output
from .recipe import parse_source

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Read, merge, convert, fuse, extract and live-mix LoRA adapters of diffusion models "
    "(SD1/2, SDXL, SD3, Flux and today's DiTs), exactly, on ΔW.",
)
# Plain consoles: file names, keys and titles are printed as they are, never read as markup.
err = Console(stderr=True, markup=False)
out = Console(markup=False)

EXIT_USER = 2  # a failure the user can act on: one line
EXIT_INTERNAL = 3  # a bug: one line (LORAMERGE_DEBUG=1 for the traceback)
EXIT_INTERRUPTED = 130
MAX_THREADS = 1024

FOLLOW_SYMLINKS_HELP = "Write through an output path that is a symbolic link (to its target)."


def say(prefix: str, text: object) -> None:
    """One line on stderr, literally (control characters escaped)."""
    sys.stderr.write(one_line(f"{prefix}{text}") + "\n")
    sys.stderr.flush()


def note(text: object) -> None:
    """A progress or result line on stderr (one line, literal)."""
    say("", text)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    say("warning: ", message)


def run_guarded(fn: Callable[[], None], threads: Optional[int] = None) -> None:
    """Run a command inside the error boundary (see the module's docstring)."""
    with warnings.catch_warnings():  # restores the filters and showwarning afterwards
        warnings.showwarning = _show_warning
        warnings.simplefilter("always", ClientWarning)  # one line per file written, every time
        try:
            _set_threads(threads)
            fn()
        except LoraMergeError as exc:
            say("error: ", exc)
            raise typer.Exit(EXIT_USER) from None
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            say("", "interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:  # noqa: BLE001 — the boundary: anything else is a bug
            if os.environ.get("LORAMERGE_DEBUG"):
                raise
            say("internal error: ", f"{type(exc).__name__}: {exc}; please report it "
                "(LORAMERGE_DEBUG=1 prints the traceback)")
            raise typer.Exit(EXIT_INTERNAL) from None


def quiet_libraries() -> None:
    """diffusers' and transformers' own progress bars and notices (pipeline components loading,
    torchvision fallbacks) off: commands that load pipelines print only loramerge's lines."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


def make_progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,  # piped stderr gets the result lines only
    )


def _set_threads(threads: Optional[int]) -> None:
    """--threads, else LORAMERGE_THREADS, else torch's default — except on machines with two
    cores or fewer, where a second intra-op thread mostly spins (per-module work is small) and
    can make small matrix products 5–100× slower while anything else runs."""
    import torch

    if threads is not None and not 0 <= threads <= MAX_THREADS:
        raise UsageError(f"--threads takes 1 to {MAX_THREADS} (0: the default), got {threads}")
    if not threads:
        threads = _env_threads()
    threads = threads or (1 if (os.cpu_count() or 1) <= 2 else 0)
    if threads:
        torch.set_num_threads(threads)


def _env_threads() -> int:
    text = os.environ.get("LORAMERGE_THREADS", "").strip()
    try:
        value = int(text or "0")
    except ValueError:
        value = -1
    if not 0 <= value <= MAX_THREADS:
        raise UsageError(f"LORAMERGE_THREADS must be an integer from 1 to {MAX_THREADS} (0: the default), "
                         f"got {text!r}")
    return value


# --------------------------------------------------------------------------------------------


@app.command()
def inspect(
    file: Path = typer.Argument(..., help="LoRA file (.safetensors, or a PEFT folder)"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Override architecture detection (see `loramerge archs`)."),
    no_norms: bool = typer.Option(False, "--no-norms", help="Skip the per-block ‖ΔW‖ (reads no tensor data)."),
    recipe: bool = typer.Option(False, "--recipe", help="Print only the recipe the file was merged by, as YAML "
                                "(`loramerge merge --recipe` re-runs it)."),
):
    """Architecture, format, components, module count, ranks, alphas, per-block norms, provenance."""

    def body():
        from . import report
        from .clients import check as check_clients
        from .io import load

        if recipe:
            from .formats.sources import open_source
            from .recipe import embedded, to_yaml

            source = open_source(file)
            found = embedded(source.metadata, file)
            if found is None:
                raise UsageError(f"{file} carries no loramerge recipe (it was not made by loramerge merge)")
            print(to_yaml(found, near=file), end="")
            return
        lora = load(file, arch=arch)
        summary = report.summarize(lora, norms=not no_norms)
        summary["clients"] = {v.client: {"exact": v.exact, "summary": v.summary()}
                              for v in check_clients(file, arch=lora.arch).verdicts}
        if as_json:
            print(json.dumps(summary, indent=2))
        else:
            out.print(report.format_summary(summary))

    run_guarded(body)


@app.command()
def merge(
    sources: Optional[List[str]] = typer.Argument(None, help="LoRA files, each optionally with a weight: A.safetensors:0.7"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output .safetensors file."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="A YAML recipe (sources, method, params, output)."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="Merge method (see `loramerge methods`; default linear)."),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="Target rank (methods that re-factorise)."),
    energy: Optional[float] = typer.Option(None, "--energy", help="Keep this fraction of Σσ² per module instead of a fixed rank."),
    space: Optional[str] = typer.Option(None, "--space", help="core or full: where sparsifying methods work."),
    param: List[str] = typer.Option([], "--param", "-p", help="Method parameter NAME=VALUE (repeatable)."),
    block_weights: Optional[str] = typer.Option(None, "--block-weights", help="Per-block weights for every source: preset, comma list or JSON."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help="Output format: kohya, comfyui or diffusers, as the architecture writes them (`loramerge archs`; default: its own, which every client loads)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype fp16|bf16|fp32 (default: the inputs')."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for methods that draw random numbers (default 0)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Override architecture detection of the inputs."),
    title: Optional[str] = typer.Option(None, "--title", help="modelspec.title of the output."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
    base: Optional[Path] = typer.Option(None, "--base", help="Base model (a diffusers folder, or a .safetensors single "
                                        "file): DoRA, IA3, OFT, BOFT and GLoRA modules become their exact ΔW on it; "
                                        "learned methods (ziplora, soups_cat) train on it (a pipeline folder)."),
    prompts: List[str] = typer.Option([], "--prompts", help="Prompt template for learned methods; {trigger} = the LoRA's trigger phrase (repeatable)."),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help=FOLLOW_SYMLINKS_HELP),
):
    """Merge LoRAs on ΔW and write one LoRA file (from arguments, or from --recipe)."""
    content_flags = {"--method": method, "--rank": rank, "--energy": energy, "--space": space, "--param": param or None,
                     "--block-weights": block_weights, "--format": format, "--dtype": dtype, "--device": device,
                     "--seed": seed, "--arch": arch, "--title": title}

    def body():
        from .formats.write import formats, resolve_dtype
        from .io import load_all, save
        from .merge import merge as merge_loras, resolve_device, source_date_epoch
        from .methods import get_method
        from .recipe import Recipe, Source, load_recipe

        if recipe is not None:
            if sources:
                raise UsageError("give the sources in the recipe or on the command line, not both")
            _refuse_with_recipe(content_flags)
            plan = load_recipe(recipe)
        else:
            if not sources:
                raise UsageError("nothing to merge: give LoRA files or --recipe")
            params = _parse_params(param)
            if space is not None:
                params["space"] = space
            plan = Recipe(
                sources=[Source(Path(p), w) for p, w in map(parse_source, sources)],
                method=method or "linear", params=params, rank=rank, energy=energy, seed=seed or 0,
                block_weights=block_weights, format=format, dtype=dtype, title=title, device=device, arch=arch,
            )
        if plan.compose:
            raise UsageError(f"this recipe composes the LoRAs at inference time (compose.method "
                             f"{plan.compose['method']}); use it with loramerge.compose_recipe, there is no file to merge")
        declared = {p.name for p in get_method(plan.method).params}
        if prompts:
            if "prompts" not in declared:
                raise UsageError(f"--prompts applies to learned methods (ziplora, soups_cat), not {plan.method!r}")
            plan.params["prompts"] = "|".join(prompts)
        target = output or plan.output
        if target is None:
            raise UsageError("no output: give -o or output.path in the recipe")
        if plan.format is not None and plan.format not in formats():
            raise UsageError(f"unknown format {plan.format!r}; use {' or '.join(formats())}")
        resolve_dtype(plan.dtype)
        resolve_device(plan.device)
        source_date_epoch()
        target = check_output(target, [str(s.path) for s in plan.sources] + ([str(base)] if base else []),
                              follow_symlinks=follow_symlinks)
        start = time.perf_counter()
        from .basemodel import open_base

        base_model = open_base(base) if base is not None else None  # header only, until a module needs it
        prefer = base_model.arch if base_model else None  # a file fitting several architectures: the base's
        loras = load_all([s.path for s in plan.sources], arch=plan.arch, prefer=prefer)
        with make_progress() as progress:
            task = progress.add_task(f"merging ({plan.method})", total=None)

            def tick(done, total, key):
                stage = "training" if key == "training" else "merging"
                progress.update(task, completed=done, total=total, description=f"{stage} ({plan.method})")

            result = merge_loras(loras, progress=tick, base=base_model, **plan.merge_kwargs())
        extra = {"modelspec.title": plan.title} if plan.title else None
        save(result, target, format=plan.format, dtype=plan.dtype, metadata=extra)
        _print_merge_summary(result, target, time.perf_counter() - start)

    run_guarded(body, threads)


def _refuse_with_recipe(flags: dict) -> None:
    """A recipe is the whole description of a merge: flags that would change its result are
    refused rather than silently ignored or silently mixed in (edit the recipe instead)."""
    given = [name for name, value in flags.items() if value is not None]
    if given:
        raise UsageError(f"{', '.join(given)} cannot be combined with --recipe (the recipe decides; edit it, "
                         "or merge without --recipe); only -o and --threads may be given with it")


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
    errors = [s["refactor_error"] for s in result.stats.values() if "refactor_error" in s]
    if errors:
        extra += f", re-factorisation error max {max(errors):.3g} mean {sum(errors) / len(errors):.3g}"
    note(f"wrote {output}: {len(result)} modules ({result.arch}), rank {rank_text}{extra}, {seconds:.1f} s")


@app.command()
def convert(
    file: Path = typer.Argument(..., help="LoRA file to convert."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .safetensors file."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help="kohya, comfyui or diffusers, as the architecture writes them (`loramerge archs`; default: its own, which every client loads)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype fp16|bf16|fp32 (default: the input's)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Override architecture detection."),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="Truncate every module to this rank (best approximation; error reported)."),
    energy: Optional[float] = typer.Option(None, "--energy", help="Per module, the smallest rank keeping this fraction of Σσ²."),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help=FOLLOW_SYMLINKS_HELP),
):
    """Rewrite a LoRA in another format (its ΔW unchanged, unless --rank/--energy truncates it)."""

    def body():
        from .io import load, save
        from .merge import merge as merge_loras

        target = check_output(output, [str(file)], follow_symlinks=follow_symlinks)
        lora = load(file, arch=arch)
        if rank is not None or energy is not None:
            lora = merge_loras([lora], method="svd", rank=rank, energy=energy, device="cpu")
        written = save(lora, target, format=format, dtype=dtype)
        kept = [s["energy_kept"] for s in lora.stats.values() if "energy_kept" in s]
        truncated = f", truncated: min energy kept {min(kept):.6f}" if kept else ""
        note(f"wrote {output}: {len(lora)} modules ({lora.arch}, → {written}){truncated}")
        if not kept:
            _note_growth(file, target, lora)

    run_guarded(body)


def _note_growth(source: Path, output: Path, lora) -> None:
    """LyCORIS modules become exact LoRA factors whose rank multiplies (LoKr, LoHa): say so when
    the file grows, and how to bound it."""
    from .formats.sources import weights_file

    before, after = weights_file(source).stat().st_size, output.stat().st_size
    if after > 2 * before:
        top = max(m.rank for m in lora)
        note(f"note: {output.name} is {after / before:.1f}× the size of {source.name} ({after / 2**20:.1f} MB vs "
                  f"{before / 2**20:.2f} MB): the exact factors reach rank {top}; --rank N or --energy F bounds it "
                  "(the error is reported)")


@app.command(name="check")
def check_command(
    file: Path = typer.Argument(..., help="LoRA file (.safetensors, or a PEFT folder)."),
    client: str = typer.Option("all", "--client", help="diffusers, comfyui, a1111, forge, a comma list, or all."),
    as_json: bool = typer.Option(False, "--json", help="Print the full report as JSON."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Override architecture detection."),
    fix: bool = typer.Option(False, "--fix", help="Rewrite the file in a format every chosen client loads exactly (needs -o)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Where --fix writes."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype of --fix (default: the file's)."),
):
    """What diffusers, ComfyUI, A1111 and Forge will apply from a LoRA file, and what they lose.

    Exit code 0 when every chosen client applies everything exactly, 1 otherwise, 2 on bad input."""

    def body():
        from .clients import check, fix_file, format_report, resolve_clients

        names = resolve_clients(client)
        if fix:
            if output is None:
                raise UsageError("--fix writes a new file: give -o OUT")
            check_output(output, [str(file)])
            written, report = fix_file(file, names, output, arch=arch, dtype=dtype)
            err.print(f"wrote {output} in {written} format", highlight=False, soft_wrap=True)
        else:
            if output is not None:
                raise UsageError("-o is for --fix")
            report = check(file, names, arch)
        if as_json:
            print(json.dumps(report.as_dict(), indent=2))
        else:
            out.print(format_report(report), highlight=False, soft_wrap=True, markup=False)
        if not report.exact:
            raise typer.Exit(1)

    run_guarded(body)


@app.command()
def fuse(
    base: Path = typer.Option(..., "--base", help="Base model: a .safetensors single file or a diffusers folder."),
    lora: List[str] = typer.Option([], "--lora", help="LoRA file with an optional weight, A.safetensors:0.7 (repeatable)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output file (single-file base) or new folder (diffusers base)."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="Merge the LoRAs by a recipe first (method, weights, blocks)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Output dtype fp16|bf16|fp32 (default: the base's)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Override architecture detection of the LoRAs."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help=FOLLOW_SYMLINKS_HELP),
):
    """Fuse LoRAs into a base checkpoint, streamed tensor by tensor (float32 math, one cast)."""

    def body():
        from .formats.write import resolve_dtype
        from .fuse import fuse as fuse_into
        from .recipe import load_recipe

        resolve_dtype(dtype)
        fuse_arch = arch
        if recipe is not None:
            if lora:
                raise UsageError("give the LoRAs in the recipe or with --lora, not both")
            _refuse_with_recipe({"--arch": arch})
            plan = load_recipe(recipe)
            kwargs = plan.merge_kwargs()
            weights = kwargs.pop("weights")
            kwargs.pop("device", None), kwargs.pop("dtype", None)  # the recipe's output dtype is not the checkpoint's
            paths, fuse_arch = [s.path for s in plan.sources], plan.arch
        else:
            if not lora:
                raise UsageError("nothing to fuse: give --lora FILE[:WEIGHT] or --recipe")
            parsed = [parse_source(x) for x in lora]
            paths, weights, kwargs = [Path(p) for p, _ in parsed], [w for _, w in parsed], {"method": "cat"}
        target = check_output(output, [str(base)] + [str(p) for p in paths], follow_symlinks=follow_symlinks,
                              folder=base.is_dir(), not_inside=[base])
        with make_progress() as progress:
            task = progress.add_task("fusing", total=None)
            report = fuse_into(base, paths, target, weights=weights, dtype=dtype, arch=fuse_arch,
                               progress=lambda done, total, key: progress.update(task, completed=done), **kwargs)
        note(f"wrote {report.output}: {report.modules} LoRA modules into {report.tensors_touched} of "
                  f"{report.tensors_total} tensors ({', '.join(report.components)}), {report.seconds:.1f} s")

    run_guarded(body, threads)


@app.command()
def extract(
    base: Path = typer.Option(..., "--base", help="The base model (single file or diffusers folder)."),
    tuned: Path = typer.Option(..., "--tuned", help="The fine-tuned model, same layout family."),
    output: Path = typer.Option(..., "-o", "--output", help="Output LoRA .safetensors file."),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="Rank of every module."),
    energy: Optional[float] = typer.Option(None, "--energy", help="Per module, the smallest rank keeping this fraction of ‖Δ‖²."),
    format: Optional[str] = typer.Option(None, "--format", "-f", help="kohya, comfyui or diffusers, as the architecture writes them (default: its own)."),
    dtype: Optional[str] = typer.Option("fp16", "--dtype", help="Output dtype fp16|bf16|fp32."),
    threshold: float = typer.Option(0.0, "--threshold", help="Skip modules whose ‖Δ‖_F is at most this."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help=FOLLOW_SYMLINKS_HELP),
):
    """Extract a LoRA from the difference of two checkpoints (randomized SVD per module)."""

    def body():
        from .extract import extract as extract_lora
        from .formats.write import formats, resolve_dtype
        from .io import save

        if format is not None and format not in formats():
            raise UsageError(f"unknown format {format!r}; use {' or '.join(formats())}")
        resolve_dtype(dtype)
        target = check_output(output, [str(base), str(tuned)], follow_symlinks=follow_symlinks)
        with make_progress() as progress:
            task = progress.add_task("extracting", total=None)
            lora, report = extract_lora(base, tuned, rank=rank, energy=energy, threshold=threshold,
                                        progress=lambda d, t, k: progress.update(task, completed=d, total=t))
        save(lora, target, format=format, dtype=dtype)
        errors = sorted(report.errors.items(), key=lambda kv: -kv[1])
        for key, error in errors[:10]:
            out.print(f"{error:9.3e}  {key}")
        mean = sum(report.errors.values()) / len(report.errors)
        note(f"wrote {output}: {report.modules} modules ({lora.arch}), {report.skipped_unchanged} unchanged skipped; "
                  f"relative error max {errors[0][1]:.3e} mean {mean:.3e} (worst 10 above)")

    run_guarded(body, threads)


@app.command()
def generate(
    base: Path = typer.Option(..., "--base", help="A local diffusers pipeline folder."),
    lora: List[str] = typer.Option([], "--lora", help="LoRA file with an optional weight, A.safetensors:0.7 (repeatable)."),
    prompt: List[str] = typer.Option(..., "--prompt", help="Prompt; one grid row each (repeatable)."),
    grid: Optional[str] = typer.Option(None, "--grid", help="Columns: weight=0,0.5,1 (scales every LoRA weight) or method=linear,ties,…"),
    seed: int = typer.Option(0, "--seed"),
    steps: int = typer.Option(20, "--steps"),
    guidance: float = typer.Option(5.0, "--guidance"),
    output: Path = typer.Option(..., "-o", "--output", help="Output PNG."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
    follow_symlinks: bool = typer.Option(False, "--follow-symlinks", help=FOLLOW_SYMLINKS_HELP),
):
    """Images from a local pipeline with LoRAs mixed in: a labelled grid over weights or methods."""

    def body():
        from .generate import generate_grid, parse_axis

        quiet_libraries()

        axis = parse_axis(grid)
        target = check_output(output, [str(base)] + [p for p, _ in map(parse_source, lora)],
                              follow_symlinks=follow_symlinks)
        path = generate_grid(base, [parse_source(x) for x in lora], prompt, target, axis, seed, steps, guidance)
        note(f"wrote {path}: {len(prompt)} prompt(s) × {len(axis.values)} {axis.name} value(s)")

    run_guarded(body, threads)


@app.command()
def analyze(
    files: List[Path] = typer.Argument(..., help="Two or more LoRA files."),
    out_dir: Path = typer.Option(Path("loramerge-analysis"), "--out", help="Folder for analysis.json and the plots."),
    density: float = typer.Option(0.2, "--density", help="Density at which sign conflicts are counted."),
    method: str = typer.Option("svd", "--method", "-m", help="Candidate merge whose energy retention is reported."),
    rank: Optional[int] = typer.Option(None, "--rank", "-r", help="Rank of the candidate merge (svd-type methods)."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Override architecture detection."),
):
    """Per block: cosine similarity, sign conflicts, spectra and effective rank, energy a merge keeps."""

    def body():
        from .analysis import analyze as run_analysis, report_paths, write_report
        from .io import load_all
        from .merge import merge as merge_loras

        if len(files) < 2:
            raise UsageError("analyze needs at least two LoRA files")
        report_paths(out_dir, files)  # before anything is computed
        loras = load_all(files, arch=arch)
        from .methods import get_method

        candidate = merge_loras(loras, method=method, rank=rank if get_method(method).uses_rank else None)
        result = run_analysis(loras, [f.stem for f in files], density=density, merged=candidate)
        paths = write_report(result, out_dir)
        for name, row in result["blocks"].items():
            cos = ", ".join(f"{v:+.2f}" for v in row["cosine"].values())
            conf = ", ".join(f"{v:.2f}" for v in row["sign_conflict"].values())
            kept = ", ".join(f"{v:.2f}" if v is not None else "-" for v in row.get("energy_retained", []))
            out.print(f"{name:<34} cos {cos:<14} conflicts {conf:<12} kept by {method} {kept}")
        note("wrote " + ", ".join(str(p) for p in paths))

    run_guarded(body)


@app.command()
def demo(
    out_dir: Path = typer.Option(Path("loramerge-demo"), "--out", help="Folder to write into."),
    styles: str = typer.Option("bold,slanted", "--styles", help="Two bundled style LoRAs to merge."),
    samples: int = typer.Option(3, "--samples", help="Samples per digit for each mix."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
):
    """Merge two style LoRAs of the bundled digit world with several methods, fuse, live-mix, score, write index.html."""

    def body():
        from .tinyworld.demo import run_demo

        quiet_libraries()
        chosen = tuple(s.strip() for s in styles.split(",") if s.strip())
        if len(chosen) != 2:
            raise UsageError("--styles takes two style names, e.g. bold,slanted")
        note(f"tiny digit world: merging {' + '.join(chosen)} …")
        page = run_demo(out_dir, chosen, samples, log=lambda line: out.print(line))
        out.print(f"wrote {page} (open it in a browser) and the merged LoRAs, grids and a fused pipeline beside it")

    run_guarded(body, threads)


@app.command()
def tune(
    sources: List[str] = typer.Argument(..., help="Two or more LoRA files."),
    objective: str = typer.Option("tinyworld", "--objective", help="tinyworld, clip:CLIP_DIR or module:function (higher is better)."),
    method: str = typer.Option("linear", "--method", "-m", help="A merge method, or compose:switch|composite|klora|mix (inference time)."),
    space: str = typer.Option("weights", "--space", help="What to search: weights, blocks, params, guidance (comma list)."),
    budget: int = typer.Option(24, "--budget", help="Number of evaluations."),
    popsize: int = typer.Option(6, "--popsize", help="Candidates per generation (asked together, told together)."),
    sampler: str = typer.Option("cmaes", "--sampler", help="cmaes, tpe or random (optuna)."),
    seed: int = typer.Option(0, "--seed"),
    base: Optional[Path] = typer.Option(None, "--base", help="Pipeline folder (default for tinyworld: the bundled one)."),
    prompts: List[str] = typer.Option([], "--prompts", help="Prompts for the clip objective (repeatable)."),
    digits: str = typer.Option("0-4", "--digits", help="tinyworld: the digits scored while tuning (keep the rest for testing)."),
    samples: int = typer.Option(4, "--samples", help="Samples per digit (tinyworld) or per prompt."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Denoising steps per image (default: the objective's)."),
    param: List[str] = typer.Option([], "--param", "-p", help="Fixed method or compose parameter NAME=VALUE (repeatable)."),
    ray: bool = typer.Option(False, "--ray", help="Evaluate on a local Ray cluster (one actor per CPU slot / GPU)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="Evaluate on an existing Ray cluster."),
    workers: Optional[int] = typer.Option(None, "--workers", help="Ray actors (default: one per CPU slot or GPU)."),
    journal: Optional[Path] = typer.Option(None, "--journal", help="Journal file (default OUT/journal.jsonl); a rerun resumes it."),
    out_dir: Path = typer.Option(Path("loramerge-tune"), "--out", help="Folder for best.yaml, trials.csv/.md, tune.png."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
):
    """Search weights, block weights and method parameters against an objective (CMA-ES or optuna; serial or Ray)."""

    def body():
        from .tune import TuneConfig, tune as run_tune

        fixed = {k: _number_or_text(v) for k, v in _parse_params(param).items()}
        config = TuneConfig(
            sources=[str(Path(s).resolve()) for s in sources], objective=objective, method=method,
            space=tuple(x.strip() for x in space.split(",") if x.strip()), budget=budget, popsize=popsize,
            sampler=sampler, seed=seed, base=str(base.resolve()) if base else None, prompts=list(prompts),
            digits=_digit_range(digits), samples=samples, steps=steps,
            compose_params=fixed if method.startswith("compose:") else {},
            method_params={} if method.startswith("compose:") else fixed,
        )
        if method.startswith("compose:"):
            from .composer import COMPOSE_METHODS

            if method.split(":", 1)[1] not in COMPOSE_METHODS:
                raise UsageError(f"unknown composition method {method.split(':', 1)[1]!r}; available: {', '.join(COMPOSE_METHODS)}")
        else:
            from .methods import get_method

            get_method(method).resolve_params(fixed)
        with make_progress() as progress:
            task = progress.add_task("tuning", total=budget)
            best = [float("-inf")]

            def tick(done, total, score):
                best[0] = max(best[0], score)
                progress.update(task, completed=done, description=f"tuning (best {best[0]:.3f})")

            result = run_tune(config, out_dir, journal=journal, ray=ray, ray_address=ray_address, workers=workers,
                              progress=tick)
        b = result.best
        out.print(f"best: trial {b['trial']} score {b['result']['score']:.4f}  "
                  + "  ".join(f"{k} {v:.3f}" for k, v in b["candidate"]["values"].items()), highlight=False, soft_wrap=True)
        err.print("wrote " + ", ".join(str(p) for p in result.outputs), highlight=False, soft_wrap=True)

    run_guarded(body, threads)


def _number_or_text(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def _digit_range(text: str) -> tuple[int, ...]:
    digits: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        try:
            digits += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
        except ValueError:
            raise UsageError(f"--digits takes digits and ranges such as 0-4 or 0,2,5; got {text!r}") from None
    if not digits or any(not 0 <= d <= 9 for d in digits):
        raise UsageError(f"--digits must name digits 0-9; got {text!r}")
    return tuple(digits)


@app.command()
def methods():
    """List the merge methods and their parameters."""
    from .methods import METHODS

    for m in sorted(METHODS.values(), key=lambda m: m.name):
        out.print(f"[bold]{m.name}[/]  {m.summary}", markup=True)
        for p in m.params:
            out.print(f"    {p.name} = {p.default!r}  {p.help}")


@app.command(name="archs")
def list_archs(as_json: bool = typer.Option(False, "--json", help="Print as JSON.")):
    """List the architectures: variants, components, formats read and written."""
    from .formats.archs import describe

    rows = describe()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        out.print(f"{row['name']:<14} {row['label']}")
        out.print(f"{'':<14} variants: {', '.join(row['variants'])}")
        out.print(f"{'':<14} reads: {', '.join(row['reads'])}")
        out.print(f"{'':<14} writes: {', '.join(row['writes'])} (default {row['default_format']})")


@app.command()
def version():
    """Print the version."""
    out.print(__version__)


def main(argv: Optional[List[str]] = None) -> None:
    """The entry point: click's own errors (an unknown option, a value of the wrong type) are
    one line and exit code 2 like every other user error."""
    try:
        code = app(args=argv, standalone_mode=False, prog_name="loramerge")
    except click_errors.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else "loramerge --help")
        code = 0
    except click_errors.ClickException as exc:
        say("error: ", exc.format_message())
        code = EXIT_USER
    except typer.Abort:
        say("", "aborted")
        code = EXIT_INTERRUPTED
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
