"""Deployment settings (`DYNKV_*`): what `dynkv up` starts, where, and on which ports."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, Field, SecretStr

from dynkv.infra.images import ETCD_IMAGE, NATS_IMAGE, PROMETHEUS_IMAGE, reference_problem
from dynkv.kvbm.env_settings import EnvSettings, env_config, flag, positive, seconds
from dynkv.kvbm.env_settings import expect as _expect
from dynkv.xdg import NAME_MAX, overlong_name, state_home

ENV_PREFIX = "DYNKV_"


class Topology(StrEnum):
    AGG = "agg"
    DISAGG = "disagg"


class DisaggTransfer(StrEnum):
    AUTO = "auto"
    HANDOFF = "handoff"
    NIXL = "nixl"


class InfraMode(StrEnum):
    EMBEDDED = "embedded"
    DOCKER = "docker"
    EXTERNAL = "external"


class Device(StrEnum):
    AUTO = "auto"
    CUDA = "cuda"
    CPU = "cpu"


class RouterPolicy(StrEnum):
    """The frontend's worker choice (dynkv.frontend.policy, docs/frontend.md#routing)."""

    ROUND_ROBIN = "round_robin"
    LEAST_OUTSTANDING = "least_outstanding"
    SESSION = "session"
    KV = "kv"  # the KV-aware router: where the prompt's prefix is cached (docs/kv-events.md)


def _image_reference(value: str) -> str:
    problem = reference_problem(value)
    if problem:
        raise ValueError(problem)
    return value


ImageRef = Annotated[str, AfterValidator(_image_reference)]


def _advertise_address(value: str | None) -> str | None:
    """An address other hosts reach this one at: one IP of this host, not a wildcard."""
    if value is None:
        return None
    import ipaddress

    try:
        ip = ipaddress.ip_address(value.strip().strip("[]"))
    except ValueError:
        raise ValueError("not an IP address") from None
    if ip.is_unspecified or ip.is_multicast:
        raise ValueError("a wildcard or multicast address is not one other hosts can reach")
    return str(ip)


AdvertiseAddr = Annotated[str | None, AfterValidator(_advertise_address)]


def _tier_weights(value: str | None) -> str | None:
    from dynkv.router.score import parse_tier_weights

    weights = parse_tier_weights(value)
    return None if weights is None else ",".join(f"{w:g}" for w in weights)


TierWeights = Annotated[str | None, AfterValidator(_tier_weights)]


def default_state_dir() -> Path:
    return state_home() / "dynkv"


def _nameable(path: Path) -> Path:
    """A directory path the file system can name (`dynkv.xdg.overlong_name`)."""
    if overlong_name(path) is not None:
        raise ValueError(f"a path component is longer than {NAME_MAX} bytes")
    return path


StateDir = Annotated[Path, AfterValidator(_nameable)]


_PORT = {"ge": 1, "le": 65535, "json_schema_extra": _expect("a TCP port 1–65535", "8000")}


class DeploymentSettings(EnvSettings):
    """Field `x` is environment variable `DYNKV_X`; `extra="ignore"` because orchestrators inject
    unrelated `DYNKV_`-looking variables and that must not break a launch."""

    model_config = env_config(ENV_PREFIX)

    name: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
        description="Deployment name: its state dir, its labels, its etcd namespace.",
        json_schema_extra=_expect(
            "letters, digits, '.', '_' or '-', starting with a letter/digit", "prod-1"
        ),
    )
    model: str | None = Field(
        None,
        description="Model path, Hugging Face id or catalogue name (docs/models.md); unset on a CPU host: smollm2-135m-instruct.",
        json_schema_extra=_expect("a model directory or a Hugging Face id", "Qwen/Qwen3-0.6B"),
    )
    topology: Topology = Field(
        Topology.AGG,
        description="agg: workers that serve whole requests; disagg: prefill and decode workers.",
        json_schema_extra=_expect("agg or disagg", "agg"),
    )
    workers: int = Field(
        1,
        ge=0,  # 0: a first host that only serves the control plane (--advertise; fleet.check_counts)
        le=64,
        description="agg: how many workers (vLLM engines) to run, each with its own ports, "
        "cores or GPUs, G3 pool and registration (docs/fleet.md).",
        json_schema_extra=_expect("a whole number of workers, 1–64", "2"),
    )
    prefill_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="disagg: how many prefill workers.",
        json_schema_extra=_expect("a whole number of workers, 1–64", "1"),
    )
    decode_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="disagg: how many decode workers.",
        json_schema_extra=_expect("a whole number of workers, 1–64", "2"),
    )
    gpus: str | None = Field(
        None,
        pattern=r"^\s*[A-Za-z0-9-]+\s*(,\s*[A-Za-z0-9-]+\s*)*$",
        description="CUDA: the GPUs the workers share out, comma-separated (indices or UUIDs); "
        "each worker takes tensor_parallel_size of them. Unset: CUDA_VISIBLE_DEVICES, else 0, 1, ….",
        json_schema_extra=_expect("GPU indices or UUIDs, comma-separated", "0,1,2,3"),
    )
    device: Device = Field(
        Device.AUTO,
        description="Where G1 (vLLM's KV cache) lives: auto picks cuda when an NVIDIA GPU is visible.",
        json_schema_extra=_expect("auto, cuda or cpu", "auto"),
    )
    block_size: int = Field(
        32,
        ge=1,
        le=1024,
        description="Tokens per KV block (vLLM on CPU needs a multiple of 32).",
        json_schema_extra=_expect("a whole number of tokens, e.g. 32", "32"),
    )
    max_model_len: int | None = Field(
        None,
        ge=16,
        description="Longest sequence a worker accepts (vLLM's --max-model-len).",
        json_schema_extra=_expect("a whole number of tokens ≥ 16", "4096"),
    )
    device_kv_gb: float | None = positive(
        None,
        "G1 size per worker in decimal GB (vLLM's kv_cache_memory_bytes).",
        "a number of decimal GB > 0, such as 0.5",
        "0.5",
    )
    frontend_host: str = Field(
        "127.0.0.1",
        description="Address the OpenAI-compatible frontend binds (loopback by default).",
        json_schema_extra=_expect("an IP address such as 127.0.0.1", "127.0.0.1"),
    )
    frontend_port: int = Field(8000, description="Port of the OpenAI-compatible frontend.", **_PORT)
    advertise: AdvertiseAddr = Field(
        None,
        description="Serve other hosts at this address: etcd, NATS and the frontend bind it, "
        "with TLS from a per-deployment CA everywhere (docs/multi-host.md). Unset: loopback only.",
        json_schema_extra=_expect("an IP address of this host", "10.0.0.5"),
    )
    worker_port: int = Field(
        8100, description="First worker's HTTP port; further workers take the next ones.", **_PORT
    )
    infra: InfraMode = Field(
        InfraMode.EMBEDDED,
        description="etcd and NATS: embedded binaries, docker containers, or external endpoints.",
        json_schema_extra=_expect("embedded, docker or external", "embedded"),
    )
    etcd_endpoints: str = Field(
        "http://127.0.0.1:2379",
        description="etcd client URL(s), comma-separated; used as given in external mode.",
        json_schema_extra=_expect("URLs such as http://127.0.0.1:2379", "http://127.0.0.1:2379"),
    )
    nats_url: str = Field(
        "nats://127.0.0.1:4222",
        description="NATS URL; used as given in external mode.",
        json_schema_extra=_expect("a URL such as nats://127.0.0.1:4222", "nats://127.0.0.1:4222"),
    )
    etcd_port: int = Field(2379, description="Embedded/docker etcd client port.", **_PORT)
    etcd_peer_port: int = Field(2380, description="Embedded/docker etcd peer port.", **_PORT)
    nats_port: int = Field(4222, description="Embedded/docker NATS client port.", **_PORT)
    nats_monitor_port: int = Field(8222, description="NATS monitoring (health) port.", **_PORT)
    state_dir: StateDir = Field(
        default_factory=default_state_dir,
        validate_default=True,  # $XDG_STATE_HOME is the user's too
        description="Where deployments keep pids, ports and logs ($XDG_STATE_HOME/dynkv).",
        json_schema_extra=_expect(
            "a directory path (default $XDG_STATE_HOME/dynkv), each name at most 255 bytes",
            "~/.local/state/dynkv",
        ),
    )
    router: RouterPolicy = Field(
        RouterPolicy.ROUND_ROBIN,
        description="How the frontend spreads requests over workers.",
        json_schema_extra=_expect("round_robin, least_outstanding, session or kv", "round_robin"),
    )
    router_temperature: float = Field(
        0.0,
        ge=0,
        allow_inf_nan=False,
        description="kv router: 0 picks the lowest estimated TTFT; > 0 samples among near-ties.",
        json_schema_extra=_expect("a number >= 0", "0.1"),
    )
    router_tier_weights: TierWeights = Field(
        None,
        description="kv router: G1,G2,G3 weights of a cached block instead of measured rates "
        "('dynamo' = 1,0.75,0.25, Dynamo's constants, for comparison).",
        json_schema_extra=_expect("three numbers G1,G2,G3 in [0, 1], or dynamo", "1,0.75,0.25"),
    )
    api_key: SecretStr | None = Field(
        None,
        description="When set, the frontend requires 'Authorization: Bearer <key>'. Never printed.",
        json_schema_extra=_expect("a string", "<secret>"),
    )
    api_key_file: Path | None = Field(
        None,
        description="Read the frontend's API key from this file (keeps it out of `ps`).",
        json_schema_extra=_expect("a file path", "~/.config/dynkv/api-key"),
    )
    tls_cert: Path | None = Field(
        None,
        description="Serve the frontend over HTTPS with this certificate (PEM; with tls_key).",
        json_schema_extra=_expect("a PEM file path", "/etc/dynkv/cert.pem"),
    )
    tls_key: Path | None = Field(
        None,
        description="Private key of tls_cert (PEM).",
        json_schema_extra=_expect("a PEM file path", "/etc/dynkv/key.pem"),
    )
    insecure: bool = flag(
        False,
        "Allow a non-loopback frontend without an API key, or a non-loopback KVBM "
        "metrics address (see docs/security.md).",
        "false",
    )
    lease_ttl_secs: int = Field(
        10,
        ge=2,
        le=3600,
        description="etcd lease TTL of a worker registration: a dead worker leaves within it.",
        json_schema_extra=_expect("a whole number of seconds, 2–3600", "10"),
    )
    startup_timeout_secs: float = seconds(
        900.0,
        "How long `up` waits for one service to become healthy.",
        "900",
    )
    kvbm: bool = flag(
        True,
        "Start the workers with the bundled KVBM connector; false: plain vLLM with "
        "only its own prefix cache (the no-offload baseline of a comparison).",
        "true",
    )
    observability: bool = flag(
        False,
        "Also start Prometheus, scraping the frontend and every worker's KVBM metrics.",
        "true",
    )
    etcd_image: ImageRef = Field(
        ETCD_IMAGE,
        description="etcd's container image (--infra docker); pin it: name:tag@sha256:<digest>.",
        json_schema_extra=_expect("an image reference", f"{ETCD_IMAGE}@sha256:<digest>"),
    )
    nats_image: ImageRef = Field(
        NATS_IMAGE,
        description="NATS's container image (--infra docker); pin it: name:tag@sha256:<digest>.",
        json_schema_extra=_expect("an image reference", f"{NATS_IMAGE}@sha256:<digest>"),
    )
    prometheus_image: ImageRef = Field(
        PROMETHEUS_IMAGE,
        description="Prometheus's container image (observability without a prometheus binary); "
        "pin it: name:tag@sha256:<digest>.",
        json_schema_extra=_expect("an image reference", f"{PROMETHEUS_IMAGE}@sha256:<digest>"),
    )
    prometheus_port: int = Field(
        9090, description="Port of Prometheus (with observability), on 127.0.0.1.", **_PORT
    )
    disagg_fallback: bool = flag(
        False,
        "disagg: when the prefill worker is down, serve on the decode worker alone.",
        "false",
    )
    disagg_transfer: DisaggTransfer = Field(
        DisaggTransfer.AUTO,
        description="disagg: how the prompt's KV reaches the decode worker: handoff (dynkv's "
        "shared-memory pool, one host), nixl (vLLM's NixlConnector, CUDA), auto (nixl on CUDA "
        "when the nixl package imports, else handoff).",
        json_schema_extra=_expect("auto, handoff or nixl", "handoff"),
    )
    nixl_side_channel_port: int = Field(
        5600,
        description="disagg with nixl: first worker's NIXL side-channel port (127.0.0.1); "
        "further workers take the next ones.",
        **_PORT,
    )
    # restart on failure (docs/restart.md)
    restart_limit: int = Field(
        5,
        ge=0,
        le=1000,
        description="Restarts of a service that exits on its own within restart_window_secs "
        "(back-off 1 s doubling to 60 s); one more leaves it down. 0: never restart.",
        json_schema_extra=_expect("a whole number ≥ 0 (0 disables restarts)", "5"),
    )
    restart_window_secs: float = seconds(
        300.0,
        "The window restart_limit counts restarts in; older ones are forgotten.",
        "300",
    )

    @property
    def deployment_dir(self) -> Path:
        return self.state_dir / self.name
