"""The options `bench serve` and `bench compare` share, declared once with their bounds and
choices, so a bad value is refused by the option itself and reported as cause + fix by the CLI's
one error path (`dynkv.cli.group`); plus the workload they both build and the progress bar.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dynkv.bench import workloads
from dynkv.bench.summary import RunConfig
from dynkv.cli.group import EXIT_USAGE, UserError
from dynkv.cli.output import err


class WorkloadName(StrEnum):
    MULTI_TURN = "multi-turn"
    LONG_DOC = "long-doc"


class Endpoint(StrEnum):
    CHAT = "chat"
    COMPLETIONS = "completions"


class RepeatMode(StrEnum):
    TILE = "tile"
    RANDOM = "random"
    INTERLEAVE = "interleave"


WorkloadOpt = Annotated[
    WorkloadName, typer.Option("--workload", "-w", help="The workload to send.")
]
EndpointOpt = Annotated[
    Endpoint, typer.Option("--endpoint", help="chat (/v1/chat/completions) or completions.")
]
UsersOpt = Annotated[int | None, typer.Option(min=1, help="multi-turn: users (default 4).")]
RoundsOpt = Annotated[
    int | None, typer.Option(min=1, help="multi-turn: rounds per user (default 4).")
]
SystemTokensOpt = Annotated[
    int | None,
    typer.Option(min=1, help="multi-turn: shared system prompt tokens (default 512)."),
]
QuestionTokensOpt = Annotated[
    int | None, typer.Option(min=1, help="multi-turn: tokens of each new question (default 64).")
]
DocsOpt = Annotated[int | None, typer.Option(min=1, help="long-doc: documents (default 6).")]
DocTokensOpt = Annotated[
    int | None, typer.Option(min=1, help="long-doc: tokens per document (default 3600).")
]
RepeatsOpt = Annotated[
    int | None, typer.Option(min=1, help="long-doc: sends of each document (default 2).")
]
ModeOpt = Annotated[RepeatMode | None, typer.Option(help="long-doc: repeat order (default tile).")]
AnswerTokensOpt = Annotated[
    int | None,
    typer.Option(min=1, help="max_tokens of each answer (default multi-turn 32, long-doc 1)."),
]
TokenizerOpt = Annotated[
    Path | None,
    typer.Option(help="Local tokenizer directory: size prompts exactly (else an estimate)."),
]
ConcurrencyOpt = Annotated[
    int | None,
    typer.Option(
        "--concurrency", "-c", min=1, help="Requests in flight (default 1; no cap with --rate)."
    ),
]
RateOpt = Annotated[
    float | None,
    typer.Option("--rate", min=0.001, help="Requests/s, Poisson arrivals (seeded)."),
]
WarmupOpt = Annotated[
    int, typer.Option("--warmup", min=0, help="Warm-up requests first, not counted.")
]
SeedOpt = Annotated[int, typer.Option("--seed", help="Prompts and arrivals; same seed, same run.")]
IgnoreEosOpt = Annotated[
    bool, typer.Option("--ignore-eos", help="Always generate --answer-tokens (vLLM extension).")
]
TimeoutOpt = Annotated[float, typer.Option("--timeout", min=0.001, help="Seconds per request.")]
MarkdownOpt = Annotated[
    Path | None, typer.Option("--markdown", help="Write the report as a markdown table.")
]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Write a PNG of TTFT per round.")]

# Options of one workload only; giving one to the other workload is a usage error.
_ONLY = {
    "multi-turn": ("--users", "--rounds", "--system-tokens", "--question-tokens"),
    "long-doc": ("--docs", "--doc-tokens", "--repeats", "--mode"),
}


def workload_flags(
    users: int | None,
    rounds: int | None,
    system_tokens: int | None,
    question_tokens: int | None,
    docs: int | None,
    doc_tokens: int | None,
    repeats: int | None,
    mode: RepeatMode | None,
) -> dict[str, Any]:
    """The workload options by flag, for `build_workload` (None: not given)."""
    return {
        "--users": users,
        "--rounds": rounds,
        "--system-tokens": system_tokens,
        "--question-tokens": question_tokens,
        "--docs": docs,
        "--doc-tokens": doc_tokens,
        "--repeats": repeats,
        "--mode": mode,
    }


def run_config(
    work: workloads.Workload,
    *,
    endpoint: Endpoint,
    concurrency: int | None,
    rate: float | None,
    warmup: int,
    seed: int,
    ignore_eos: bool,
    tokenizer: Path | None,
) -> RunConfig:
    """How a run was made, as the report records it (the server it ran against is added by the
    command that knows it)."""
    return RunConfig(
        endpoint=str(endpoint),
        workload=work.name,
        params=work.params,
        concurrency=concurrency,
        rate=rate,
        warmup=warmup,
        seed=seed,
        ignore_eos=ignore_eos,
        tokenizer=str(tokenizer) if tokenizer else None,
    )


def usage(cause: str, fix: str) -> UserError:
    return UserError(cause, fix, EXIT_USAGE)


def build_workload(
    workload: WorkloadName,
    given: dict[str, Any],
    *,
    seed: int,
    tokenizer: Path | None,
    answer_tokens: int | None,
    warmup: int,
) -> tuple[workloads.Workload, workloads.Workload]:
    """The measured workload and its warm-up. `given` maps each workload flag to its value
    (None: not given); a flag of the other workload is a usage error."""
    for other, flags in _ONLY.items():
        wrong = [f for f in flags if other != workload and given.get(f) is not None]
        if wrong:
            raise usage(
                f"{', '.join(wrong)} {'applies' if len(wrong) == 1 else 'apply'} to "
                f"--workload {other}, not {workload}",
                f"drop {', '.join(wrong)}, or pass --workload {other}",
            )
    params = {
        flag[2:].replace("-", "_"): str(v) if isinstance(v, StrEnum) else v
        for flag, v in given.items()
    }
    try:
        count = workloads.tokenizer_counter(tokenizer) if tokenizer else None
        work = workloads.build(str(workload), seed, count, answer_tokens=answer_tokens, **params)
        return work, workloads.warmup(warmup, seed=seed)
    except workloads.WorkloadError as exc:
        raise usage(exc.cause, exc.fix) from None


def progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )
