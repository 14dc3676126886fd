"""Compare configurations: bring each stack up in turn, run the same workload against it, take it
down, and keep one summary per configuration for `dynkv.bench.report`.

What a configuration is (`StackConfig`): a tier profile, whether the workers carry the KVBM
connector at all (the no-offload baseline: plain vLLM with only its own prefix cache), a
topology, and a transport (`loopback`, or `tls`: the same stack started with `--advertise`, every
hop over TLS, docs/multi-host.md#measuring-tls-overhead). `plan_configs` turns the CLI's
`--profiles PROFILE…` (plus the baseline) or `--topologies agg disagg` (one profile, each
topology) into that list, and `--transports loopback,tls` runs each of those (or the one
`--profile`) once per transport.

How the stacks start and stop is injected (`Launcher`): the CLI uses `dynkv.bench.stacks`
(`dynkv up -d` under a private name, ports and state dir); tests pass a fake. The rules kept here:
every configuration runs the same workload object with the same seed; a stack is always taken
down, after its run, after a failed run and on Ctrl-C; a stack that does not come up is recorded
as a failed configuration and the comparison goes on with the next one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from dynkv.bench import report, runner, scrape
from dynkv.bench.summary import BenchSummary, RunConfig, StackRecord
from dynkv.bench.trust import Trust
from dynkv.bench.workloads import Workload
from dynkv.errors import CauseFix

TOPOLOGIES = ("agg", "disagg")
TRANSPORTS = ("loopback", "tls")
DEFAULT_ADVERTISE = "127.0.0.2"  # the `tls` transport's address: loopback, but not 127.0.0.1
BASELINE_LABEL = "no offload"


class CompareError(CauseFix):
    """A comparison that cannot be set up as asked (a usage error: cause + fix)."""


class StackFailed(Exception):
    """A stack did not come up; `detail` says why (the end of `dynkv up`'s output)."""

    def __init__(self, label: str, detail: str) -> None:
        super().__init__(f"{label}: {detail}")
        self.label, self.detail = label, detail


@dataclass(frozen=True)
class StackConfig:
    """One configuration to compare. `profile` None: dynkv's default profile (the baseline's
    profile does not matter: without KVBM it has no tiers)."""

    label: str
    profile: str | None = None
    kvbm: bool = True
    topology: str | None = None  # None: the profile's own topology
    transport: str | None = None  # None: loopback, and not a compared axis

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.transport is None:  # a comparison without --transports records what it did
            del data["transport"]
        return data


@dataclass
class RunningStack:
    """A stack that is up: where to send the workload, and whose KVBM metrics to scrape."""

    url: str
    model: str
    metrics_urls: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # name, state dir, start-up time, ...
    trust: Trust | None = None  # the CA of its https frontend (`dynkv.bench.trust`)


class Launcher(Protocol):
    def check(self, config: StackConfig) -> None:
        """Raise CompareError when this configuration cannot start (before any stack starts)."""

    def up(self, config: StackConfig) -> RunningStack:
        """Start the stack and return once it serves; StackFailed when it does not."""

    def down(self, stack: RunningStack) -> None:
        """Stop everything of the stack; must not raise."""


def split_values(values: Sequence[str] | None) -> list[str]:
    """`--profiles a,b --profiles c` → [a, b, c] (repeated and comma-separated both work)."""
    out: list[str] = []
    for value in values or []:
        out += [v.strip() for v in value.split(",") if v.strip()]
    return out


def plan_configs(
    profiles: Sequence[str],
    topologies: Sequence[str],
    *,
    profile: str | None = None,
    baseline: bool | None = None,
    transports: Sequence[str] = (),
) -> list[StackConfig]:
    """The configurations in the order they run: the baseline first (when asked; by default with
    --profiles, not with --topologies), then each profile or each topology; with --transports,
    each of those once per transport, side by side (or the one --profile per transport)."""
    if profiles and topologies:
        raise CompareError(
            "--profiles and --topologies cannot be combined",
            "compare profiles (--profiles gpu-cpu,gpu-cpu-disk) or topologies of one profile "
            "(--topologies agg,disagg --profile gpu-cpu), in two runs",
        )
    if not profiles and not topologies and not transports:
        raise CompareError(
            "nothing to compare",
            "pass --profiles PROFILE[,PROFILE…], --topologies agg,disagg or "
            "--transports loopback,tls",
        )
    if profile is not None and profiles:
        raise CompareError(
            "--profile names the one profile of --topologies or --transports",
            "drop --profile, or list the profiles with --profiles",
        )
    configs: list[StackConfig] = []
    if baseline if baseline is not None else bool(profiles):
        configs.append(StackConfig(BASELINE_LABEL, None, kvbm=False, topology="agg"))
    for name in profiles:
        configs.append(StackConfig(name, name))
    for topology in topologies:
        if topology not in TOPOLOGIES:
            raise CompareError(f"unknown topology {topology!r}", "use --topologies agg,disagg")
        shown = profile or "default profile"
        configs.append(StackConfig(f"{topology} ({shown})", profile, topology=topology))
    if transports:
        if not profiles and not topologies:  # the one --profile, per transport
            configs.append(StackConfig("", profile))
        configs = _per_transport(configs, transports, profile)
    labels = [c.label for c in configs]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise CompareError(f"{', '.join(repeated)} is listed twice", "name each configuration once")
    return configs


def _per_transport(
    configs: list[StackConfig], transports: Sequence[str], profile: str | None
) -> list[StackConfig]:
    """Each configuration once per transport, labelled `<label>, <transport>`; the unlabelled one
    (--transports alone: the one --profile) as `<transport> (<profile>)`, as --topologies
    labels a topology."""
    unknown = [t for t in transports if t not in TRANSPORTS]
    if unknown:
        raise CompareError(
            f"unknown transport {unknown[0]!r}", f"use --transports {','.join(TRANSPORTS)}"
        )
    shown = profile or "default profile"
    return [
        dataclasses.replace(
            c,
            label=f"{c.label}, {t}" if c.label else f"{t} ({shown})",
            transport=t,
        )
        for c in configs
        for t in transports
    ]


Measure = Callable[[StackConfig, RunningStack], BenchSummary]
Event = Callable[[str, StackConfig, Any], None]  # ("up" | "measure" | "down" | "failed", config, x)


def failed_summary(config: StackConfig, detail: str, run_config: RunConfig) -> BenchSummary:
    """A summary with no numbers for a configuration whose stack did not come up."""
    empty = runner.RunResult([], 0.0)
    summary = report.summarize(report.LabelledRun(config.label, empty, run_config))
    summary.stack = StackRecord(**config.to_json(), error=detail)
    return summary


def run_compare(
    configs: Sequence[StackConfig],
    launcher: Launcher,
    measure: Measure,
    *,
    run_config: RunConfig | None = None,
    on_event: Event | None = None,
) -> list[BenchSummary]:
    """One summary per configuration, in order. Every configuration is checked before the first
    stack starts; each stack is taken down whatever happens to its run."""
    for config in configs:
        launcher.check(config)
    notify = on_event or (lambda *_: None)
    summaries = []
    for config in configs:
        notify("up", config, None)
        try:
            stack = launcher.up(config)
        except StackFailed as exc:
            notify("failed", config, exc.detail)
            summaries.append(failed_summary(config, exc.detail, run_config or RunConfig()))
            continue
        try:
            notify("measure", config, stack)
            summary = measure(config, stack)
        finally:
            notify("down", config, stack)
            launcher.down(stack)
        summary.stack = StackRecord(**{**config.to_json(), **stack.info, "error": None})
        summaries.append(summary)
    return summaries


def stack_options(options: runner.RunOptions, stack: RunningStack) -> runner.RunOptions:
    """`options` pointed at `stack`: its URL, its model unless one was named, the CA of its
    frontend (a stack's own wins: a compare stack over TLS has a CA of its own)."""
    return dataclasses.replace(
        options,
        url=stack.url,
        model=options.model or stack.model,
        trust=stack.trust or options.trust,
    )


def measure_with(
    work: Workload,
    warm: Workload | None,
    options: runner.RunOptions,
    run_config: RunConfig,
    progress: Callable[[StackConfig], runner.Progress | None] | None = None,
) -> Measure:
    """The measurement `bench serve` makes of one server, pointed at each stack in turn: its KVBM
    metrics before and after, the workload (the same object, so the same prompts) in between."""

    def measure(config: StackConfig, stack: RunningStack) -> BenchSummary:
        opts = stack_options(options, stack)
        before = scrape.scrape_all(stack.metrics_urls)
        result = runner.run(work, opts, warm, progress(config) if progress else None)
        after = scrape.scrape_all(stack.metrics_urls)
        cfg = run_config.model_copy(
            update={
                "url": stack.url,
                "model": opts.model,
                "metrics_urls": list(stack.metrics_urls),
                **(opts.trust.record() if opts.trust else {}),
            }
        )
        return report.summarize(report.LabelledRun(config.label, result, cfg, before, after))

    return measure
