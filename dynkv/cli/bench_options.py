"""The options `bench serve` and `bench compare` share, declared once with their bounds and
choices, so a bad value is refused by the option itself and reported as cause + fix by the CLI's
one error path (`dynkv.cli.group`); plus the workload they both build (`WorkloadArgs`, which a
command takes as one parameter through `workload_options`) and the progress bar.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, get_type_hints

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from dynkv.bench import workloads
from dynkv.bench.summary import RunConfig
from dynkv.cli.group import EXIT_USAGE, UserError
from dynkv.cli.output import err

if TYPE_CHECKING:
    from dynkv.bench.runner import RunOptions
    from dynkv.bench.trust import Trust


class WorkloadName(StrEnum):
    MULTI_TURN = "multi-turn"
    LONG_DOC = "long-doc"
    SHARED_PREFIX = "shared-prefix"


class Affinity(StrEnum):
    PREFIX = "prefix"
    USER = "user"


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
UsersOpt = Annotated[
    int | None, typer.Option(min=1, help="multi-turn, shared-prefix: users (default 4, 16).")
]
RoundsOpt = Annotated[
    int | None,
    typer.Option(
        min=1, help="multi-turn: rounds per user; shared-prefix: questions per user (default 4, 2)."
    ),
]
SystemTokensOpt = Annotated[
    int | None,
    typer.Option(
        min=1, help="multi-turn, shared-prefix: system prompt tokens (default 512, 2048)."
    ),
]
QuestionTokensOpt = Annotated[
    int | None,
    typer.Option(
        min=1, help="multi-turn, shared-prefix: tokens of each new question (default 64, 32)."
    ),
]
PerUserSystemOpt = Annotated[
    bool,
    typer.Option(
        "--per-user-system",
        help="multi-turn: each user has a system prompt of its own (--system-tokens long).",
    ),
]
AffinityOpt = Annotated[
    Affinity | None,
    typer.Option(
        help="shared-prefix: the x-session-id each request carries: the prefix's one key "
        "(default), or each user's."
    ),
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

CaCertOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca-cert",
        help="Verify an https server against this CA file (PEM). Default: $DYNKV_CLIENT_CA, else "
        "the CA of the deployment found by --name or --url (`dynkv up --advertise`), else the "
        "system's store.",
        show_default=False,
    ),
]

SendSessionOpt = Annotated[
    bool,
    typer.Option(
        "--send-session",
        help="Send each simulated user's (or document's) session as the OpenAI `user` field, "
        "for the frontend's session router (docs/frontend.md#routing).",
    ),
]

# The workloads each workload option applies to; giving it to another is a usage error.
_MT, _SP, _LD = "multi-turn", "shared-prefix", "long-doc"
_APPLIES = {
    "--users": (_MT, _SP),
    "--rounds": (_MT, _SP),
    "--system-tokens": (_MT, _SP),
    "--question-tokens": (_MT, _SP),
    "--per-user-system": (_MT,),
    "--affinity": (_SP,),
    "--docs": (_LD,),
    "--doc-tokens": (_LD,),
    "--repeats": (_LD,),
    "--mode": (_LD,),
}


@dataclass(frozen=True)
class WorkloadArgs:
    """The workload and client options of `bench serve` and `bench compare`, as given; a
    command declares them once with `workload_options`."""

    workload: WorkloadOpt = WorkloadName.MULTI_TURN
    endpoint: EndpointOpt = Endpoint.CHAT
    users: UsersOpt = None
    rounds: RoundsOpt = None
    system_tokens: SystemTokensOpt = None
    question_tokens: QuestionTokensOpt = None
    per_user_system: PerUserSystemOpt = False
    affinity: AffinityOpt = None
    docs: DocsOpt = None
    doc_tokens: DocTokensOpt = None
    repeats: RepeatsOpt = None
    mode: ModeOpt = None
    answer_tokens: AnswerTokensOpt = None
    tokenizer: TokenizerOpt = None
    concurrency: ConcurrencyOpt = None
    rate: RateOpt = None
    warmup: WarmupOpt = 0
    seed: SeedOpt = 0
    ignore_eos: IgnoreEosOpt = False
    timeout: TimeoutOpt = 600.0
    send_session: SendSessionOpt = False

    @property
    def cap(self) -> int | None:
        """Requests in flight: --concurrency, else 1, else (with --rate) no cap."""
        return 1 if self.concurrency is None and self.rate is None else self.concurrency

    def build(self) -> tuple[workloads.Workload, workloads.Workload]:
        """The measured workload and its warm-up; a flag of the other workload is a usage
        error."""
        given = {
            "--users": self.users,
            "--rounds": self.rounds,
            "--system-tokens": self.system_tokens,
            "--question-tokens": self.question_tokens,
            "--per-user-system": self.per_user_system or None,
            "--affinity": self.affinity,
            "--docs": self.docs,
            "--doc-tokens": self.doc_tokens,
            "--repeats": self.repeats,
            "--mode": self.mode,
        }
        workload = str(self.workload)
        wrong = [f for f, v in given.items() if v is not None and workload not in _APPLIES[f]]
        if wrong:
            # grouped by the workloads they do apply to, the first group named in the message
            owners = _APPLIES[wrong[0]]
            wrong = [f for f in wrong if _APPLIES[f] == owners]
            raise usage(
                f"{', '.join(wrong)} {'applies' if len(wrong) == 1 else 'apply'} to "
                f"--workload {' or '.join(owners)}, not {workload}",
                f"drop {', '.join(wrong)}, or pass --workload {owners[0]}",
            )
        params = {
            flag[2:].replace("-", "_"): str(v) if isinstance(v, StrEnum) else v
            for flag, v in given.items()
        }
        try:
            count = workloads.tokenizer_counter(self.tokenizer) if self.tokenizer else None
            work = workloads.build(
                str(workload), self.seed, count, answer_tokens=self.answer_tokens, **params
            )
            return work, workloads.warmup(self.warmup, seed=self.seed)
        except workloads.WorkloadError as exc:
            raise usage(exc.cause, exc.fix) from None

    def run_options(
        self, url: str = "", model: str = "", api_key: str | None = None, trust: Trust | None = None
    ):
        """How the runner sends (a compare run fills url, model and trust in per stack)."""
        from dynkv.bench.runner import RunOptions

        return RunOptions(
            url=url,
            model=model,
            endpoint=str(self.endpoint),  # type: ignore[arg-type]
            concurrency=self.cap,
            rate=self.rate,
            seed=self.seed,
            timeout_s=self.timeout,
            ignore_eos=self.ignore_eos,
            api_key=api_key,
            send_session=self.send_session,
            trust=trust,
        )

    def run_config(self, work: workloads.Workload) -> RunConfig:
        """How a run was made, as the report records it (the server it ran against is added
        by the command that knows it); `send_session` only when it was on, so reports of runs
        without it keep their shape."""
        config = RunConfig(
            endpoint=str(self.endpoint),
            workload=work.name,
            params=work.params,
            concurrency=self.cap,
            rate=self.rate,
            warmup=self.warmup,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            tokenizer=str(self.tokenizer) if self.tokenizer else None,
        )
        return config.model_copy(update={"send_session": True}) if self.send_session else config


@dataclass(frozen=True)
class BenchJob:
    """What a benchmark runs and where its report goes: the one bundle `bench serve` and
    `bench compare` hand to whichever runner (stacks or router policies) does the work."""

    work: workloads.Workload
    warm: workloads.Workload | None
    options: RunOptions
    run_config: RunConfig
    markdown: Path | None
    plot: Path | None
    json_out: bool


def workload_options(command: Callable[..., None]) -> Callable[..., None]:
    """`command`'s `work: WorkloadArgs` parameter becomes the options of `WorkloadArgs`, in its
    place, for typer; they are collected into a `WorkloadArgs` when the command runs."""
    shared = [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=t)
        for f, t in zip(
            dataclasses.fields(WorkloadArgs),
            get_type_hints(WorkloadArgs, include_extras=True).values(),
            strict=True,
        )
    ]
    names = [p.name for p in shared]
    signature = inspect.signature(command, eval_str=True)
    params: list[inspect.Parameter] = []
    for param in signature.parameters.values():
        if param.name == "work":
            params += shared
        else:
            params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(command)
    def with_work(**kwargs: Any) -> None:
        work = WorkloadArgs(**{name: kwargs.pop(name) for name in names})
        command(work=work, **kwargs)

    with_work.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
    with_work.__annotations__ = {p.name: p.annotation for p in params}
    return with_work


def trust_or_usage(
    ca_cert: Path | None, *, deployment_ca: str | None = None, deployment: str | None = None
) -> Trust | None:
    """The CA the bench verifies an https server against (`dynkv.bench.trust.choose`); a CA
    file that does not load is a usage error."""
    import os

    from dynkv.bench import trust

    try:
        return trust.choose(ca_cert, os.environ, deployment_ca=deployment_ca, deployment=deployment)
    except trust.TrustError as exc:
        raise usage(exc.cause, exc.fix) from None


def usage(cause: str, fix: str) -> UserError:
    return UserError(cause, fix, EXIT_USAGE)


def progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=False,
    )
