"""The `dynkv` console script: the root Typer app and the registry of its commands."""

from __future__ import annotations

from typing import Annotated

import typer

from dynkv import __version__
from dynkv.cli import (
    advise_cmd,
    bench_kvbm_cmd,
    bench_router_cmd,
    config_cmd,
    deploy_cmds,
    doctor_cmd,
    export_cmd,
    join_cmds,
    restart_cmd,
    up_cmd,
)
from dynkv.cli.bench_cmd import bench_app
from dynkv.cli.group import DynkvGroup
from dynkv.cli.model_cmd import model_app

app = typer.Typer(
    cls=DynkvGroup,
    name="dynkv",
    help="One-command KV-cache offloading (GPU → CPU → disk) for vLLM.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dynkv {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", callback=_version, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """dynkv brings up vLLM with the bundled KVBM connector, etcd, NATS and a frontend."""


app.command("config")(config_cmd.config)
app.command("profiles")(config_cmd.profiles)
app.command("up")(up_cmd.up)
app.command("join-token")(join_cmds.join_token)
app.command("join")(join_cmds.join)
app.command("down")(deploy_cmds.down)
app.command("status")(deploy_cmds.status)
app.command("logs")(deploy_cmds.logs)
app.command("restart")(restart_cmd.restart)
app.command("advise")(advise_cmd.advise)
app.command("export")(export_cmd.export)
app.add_typer(model_app, name="model")
app.command("doctor")(doctor_cmd.doctor)
bench_kvbm_cmd.register(bench_app)
bench_router_cmd.register(bench_app)
app.add_typer(bench_app, name="bench")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
