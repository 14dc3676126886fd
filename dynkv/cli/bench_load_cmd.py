"""`dynkv bench load`: a bounded loopback load on a deployment, judged on errors and on every
service's memory over time (the engine is `dynkv.bench.load`; `scripts/load` calls this).

Targets: `--url` (with or without `/v1`) of a running deployment, whose services `--name` (and
DYNKV_STATE_DIR, as for `dynkv status`) names; without `--url`, a deployment of its own
(`dynkv up -d`: tiny model, private state dir and free ports, small tiers so they fill during
the warm-up), taken down afterwards. Exit 0 when there were no errors and no service's RSS was
judged `growing`, 1 otherwise, 2 for bad options.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path
from typing import Annotated

import httpx
import typer

from dynkv.bench import load, target
from dynkv.bench.load_report import LoadReport
from dynkv.cli.bench_options import CaCertOpt, trust_or_usage
from dynkv.cli.group import EXIT_FAILURE, UserError
from dynkv.cli.options import JsonOpt
from dynkv.cli.output import emit_json
from dynkv.private_deployment import dynkv_cli


def _deployment(name: str | None) -> tuple[dict, str | None, str]:
    """The running deployment's services, its frontend's CA (an advertised one's) and name."""
    from dynkv.cli.options import resolve_from_options
    from dynkv.supervisor import read_state

    dep = resolve_from_options(name=name, require_tier=False, quiet=True).deployment
    services = load.services_of(dep.deployment_dir)
    if services is None:
        raise UserError(
            f"no deployment named {dep.name!r} is running (no state in {dep.deployment_dir})",
            "pass the --name (and DYNKV_STATE_DIR) it was started with, or leave out --url "
            "to load a deployment of its own",
        )
    state = read_state(dep.deployment_dir)
    return services, target.frontend_ca(state) if state else None, dep.name


def _own_deployment(options: load.LoadOptions) -> LoadReport:
    with tempfile.TemporaryDirectory(prefix="dynkv-load-") as tmp:
        env = load.own_stack_env(Path(tmp) / "state")
        load.say(f"starting a deployment ({env['DYNKV_NAME']}) with the tiny model…")
        up = dynkv_cli("up", "-d", "--json", env=env, timeout=600)
        if up.returncode != 0:
            raise UserError(
                f"dynkv up failed:\n{up.stderr[-4000:]}",
                "see the error above; or load a running deployment with --url and --name",
            )
        try:
            state = json.loads(up.stdout)
            frontend = next(s for s in state["services"] if s["name"] == "frontend")
            services = {s["name"]: (s["pid"], s["create_time"]) for s in state["services"]}
            return load.run(options, frontend["meta"]["url"], services)
        finally:
            down = dynkv_cli("down", env=env, timeout=180)
            load.say("down: " + (down.stderr.strip().splitlines() or ["?"])[-1])


def bench_load(
    url: Annotated[
        str | None,
        typer.Option(
            "--url", help="A running deployment's frontend, with or without /v1 (else start one)."
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Its deployment name (default: DYNKV_NAME, else default)."),
    ] = None,
    clients: Annotated[int, typer.Option("--clients", min=1, help="Streaming clients.")] = 32,
    duration: Annotated[
        float, typer.Option("--duration", min=0.001, help="Seconds of load.")
    ] = 300.0,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Output tokens per answer.")
    ] = 32,
    system_words: Annotated[
        int, typer.Option("--system-words", min=0, help="Shared system prompt size.")
    ] = 200,
    question_words: Annotated[int, typer.Option("--question-words", min=0)] = 40,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.001, help="Seconds per request, at most.")
    ] = 120.0,
    sample: Annotated[
        float, typer.Option("--sample", min=0.001, help="Seconds between RSS samples.")
    ] = 2.0,
    warmup: Annotated[
        float | None,
        typer.Option("--warmup", min=0, help="Seconds not judged for RSS (default 20%, ≤ 60)."),
    ] = None,
    rss_tolerance_pct: Annotated[float, typer.Option("--rss-tolerance-pct", min=0)] = 2.0,
    rss_tolerance_mib: Annotated[float, typer.Option("--rss-tolerance-mib", min=0)] = 16.0,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="DYNKV_API_KEY", show_default=False, help="Bearer token."),
    ] = None,
    samples: Annotated[
        bool, typer.Option("--samples", help="Include every RSS sample in --json.")
    ] = False,
    ca_cert: CaCertOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Streaming clients for a bounded time against a deployment: errors, TTFT and end-to-end
    percentiles, and whether each service's memory stayed flat."""
    options = load.LoadOptions(
        clients=clients,
        duration=duration,
        max_tokens=max_tokens,
        system_words=system_words,
        question_words=question_words,
        timeout=timeout,
        sample=sample,
        warmup=min(60.0, 0.2 * duration) if warmup is None else warmup,
        rss_tolerance_pct=rss_tolerance_pct,
        rss_tolerance_mib=rss_tolerance_mib,
        api_key=api_key,
        samples=samples,
    )
    try:
        if url:
            services, ca, found = _deployment(name)
            trust = trust_or_usage(ca_cert, deployment_ca=ca, deployment=found)
            options = dataclasses.replace(options, trust=trust)
            rep = load.run(options, target.base_url(url), services)
        else:
            rep = _own_deployment(options)
    except httpx.HTTPError as exc:
        raise UserError(
            f"the deployment did not answer: {type(exc).__name__}: {exc}",
            "check `dynkv status`, and --url / --api-key",
        ) from None
    load.summary(rep)
    if json_out:
        emit_json(rep.model_dump(mode="json"))
    if not rep.passed:
        raise typer.Exit(EXIT_FAILURE)
