"""settings → Plan: the services `dynkv up` starts, as data (argv, env, ports, probes, order).

`build_plan(resolved, host)` is pure; `HostFacts.detect` and `choose_model` gather the host facts.
The builder is imported lazily: `dynkv.infra` describes its services with the data types of
`dynkv.plan.model`, and the builder uses `dynkv.infra`, so an eager import here would be circular.
"""

from typing import Any

from dynkv.plan.model import (
    ContainerSpec,
    EtcdHealthProbe,
    EtcdKeyProbe,
    HttpProbe,
    NatsProbe,
    Plan,
    Probe,
    Service,
    ServiceInfo,
    TcpProbe,
    mask_argv,
    mask_env,
)
from dynkv.plan.model_source import ModelChoice, choose_model

_LAZY = {"PORT_SETTINGS", "HostFacts", "PlanError", "build_plan"}

__all__ = [
    "PORT_SETTINGS",
    "ContainerSpec",
    "EtcdHealthProbe",
    "EtcdKeyProbe",
    "HttpProbe",
    "NatsProbe",
    "HostFacts",
    "ModelChoice",
    "Plan",
    "PlanError",
    "Probe",
    "Service",
    "ServiceInfo",
    "TcpProbe",
    "build_plan",
    "choose_model",
    "mask_argv",
    "mask_env",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from dynkv.plan import build

        return getattr(build, name)
    raise AttributeError(f"module 'dynkv.plan' has no attribute {name!r}")
