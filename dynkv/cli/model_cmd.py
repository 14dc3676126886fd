"""`dynkv model create`: a local Llama-shaped test model with random weights, no download."""

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
    help="Local test models: Llama-shaped, random weights, no download.",
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
