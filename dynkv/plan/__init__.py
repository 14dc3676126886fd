"""settings → Plan: the services `dynkv up` starts, as data (argv, env, ports, probes, order).

`build_plan(resolved, host)` is pure; `HostFacts.detect` and `choose_model` gather the host facts.
"""

from dynkv.plan.build import PORT_SETTINGS, HostFacts, PlanError, build_plan
from dynkv.plan.model import ContainerSpec, Plan, Probe, Service, mask_argv, mask_env
from dynkv.plan.model_source import ModelChoice, choose_model

__all__ = [
    "PORT_SETTINGS",
    "ContainerSpec",
    "HostFacts",
    "ModelChoice",
    "Plan",
    "PlanError",
    "Probe",
    "Service",
    "build_plan",
    "choose_model",
    "mask_argv",
    "mask_env",
]
