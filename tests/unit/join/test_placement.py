"""Placement rules: KV may cross hosts only over NIXL (docs/multi-host.md#placement-rules)."""

from __future__ import annotations

import pytest

from dynkv.join.placement import HANDOFF_ONE_HOST, check_placement
from dynkv.plan.errors import PlanError

AGG = {"agg": 1}
PAIR = {"prefill": 1, "decode": 2}


def check(hosts, topology="disagg", transfer="handoff", jt=None, jx=None):
    check_placement(
        hosts,
        topology=topology,
        transfer=transfer,
        joining="b",
        joining_topology=jt or topology,
        joining_transfer=jx if jx is not None else transfer,
    )


def test_agg_anywhere():
    check({"a": AGG, "b": {"agg": 3}, "c": AGG}, topology="agg", transfer=None)


def test_one_complete_local_set_over_the_handoff():
    check({"a": {}, "b": PAIR})  # a control-plane-only first host


@pytest.mark.parametrize("half", [{"prefill": 1}, {"decode": 2}])
def test_half_a_pair_over_the_handoff_is_refused(half):
    with pytest.raises(PlanError) as info:
        check({"a": PAIR, "b": half})
    assert HANDOFF_ONE_HOST in info.value.cause
    assert "DYNKV_DISAGG_TRANSFER=nixl" in info.value.fix


def test_two_hosts_with_disagg_workers_over_the_handoff_are_refused():
    with pytest.raises(PlanError) as info:
        check({"a": PAIR, "b": PAIR})
    assert HANDOFF_ONE_HOST in info.value.cause and "a already" in info.value.cause


def test_nixl_places_anything():
    check({"a": {"prefill": 2}, "b": {"decode": 1}}, transfer="nixl")


def test_topology_and_transfer_must_match_the_deployment():
    with pytest.raises(PlanError) as info:
        check({"a": AGG, "b": PAIR}, topology="agg", transfer=None, jt="disagg", jx="handoff")
    assert "--topology agg" in info.value.fix
    with pytest.raises(PlanError) as info:
        check({"a": PAIR, "b": PAIR}, transfer="nixl", jx="handoff")
    assert "DYNKV_DISAGG_TRANSFER=nixl" in info.value.fix
