"""The etcd client against a real embedded etcd: KV, leases (keep-alive, expiry, revoke), prefix
watches (sync and async, resume by revision), endpoint failover."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from dynkv.infra.etcd_client import (
    AsyncEtcdClient,
    EtcdClient,
    EtcdUnavailable,
    LeaseExpired,
    LeaseKeeper,
    prefix_range_end,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def client(etcd_url):
    with EtcdClient(etcd_url) as c:
        yield c


@pytest.fixture
def prefix() -> str:
    return f"/test/{uuid.uuid4().hex[:8]}/"


def test_prefix_range_end():
    assert prefix_range_end("/a/") == b"/a0"
    assert prefix_range_end(b"a\xff") == b"b"
    assert prefix_range_end(b"\xff") == b"\0"


def test_put_get_prefix_delete(client, prefix):
    assert client.health()
    rev = client.put(prefix + "a", {"x": 1})
    client.put(prefix + "b", "text")
    client.put(prefix + "c", b"\x00bytes")
    client.put(prefix[:-1] + "X", "outside the prefix")
    kv = client.get(prefix + "a")
    assert kv.json() == {"x": 1} and kv.mod_revision == rev and kv.lease == 0
    assert client.get(prefix + "missing") is None
    listed = client.get_prefix(prefix)
    assert [k.key for k in listed.kvs] == [prefix + "a", prefix + "b", prefix + "c"]
    assert listed.kvs[2].value == b"\x00bytes"
    assert listed.revision >= rev
    assert client.delete(prefix + "a") == 1
    assert client.delete(prefix + "a") == 0
    assert client.delete_prefix(prefix) == 2
    assert client.get_prefix(prefix).kvs == []
    assert client.get(prefix[:-1] + "X") is not None


def test_lease_keepalive_revoke(client, prefix):
    lease = client.lease_grant(5)
    client.put(prefix + "w", "v", lease=lease)
    assert client.get(prefix + "w").lease == lease
    assert client.lease_keepalive(lease) == 5
    assert 0 < client.lease_time_to_live(lease) <= 5
    client.lease_revoke(lease)
    assert client.get(prefix + "w") is None
    assert client.lease_time_to_live(lease) == -1
    with pytest.raises(LeaseExpired):
        client.lease_keepalive(lease)
    client.lease_revoke(lease)  # already gone: not an error


def test_lease_expiry_deletes_the_key_and_a_keeper_prevents_it(client, prefix):
    kept, dropped = client.lease_grant(2), client.lease_grant(2)
    client.put(prefix + "kept", "v", lease=kept)
    client.put(prefix + "dropped", "v", lease=dropped)
    keeper = LeaseKeeper(client, kept, 2).start()
    try:
        deadline = time.monotonic() + 20
        while client.get(prefix + "dropped") is not None and time.monotonic() < deadline:
            time.sleep(0.25)
        assert client.get(prefix + "dropped") is None  # expired
        assert client.get(prefix + "kept") is not None  # kept alive past its TTL
    finally:
        keeper.stop()
        client.lease_revoke(kept)


def test_keeper_reports_a_lost_lease(client):
    lease = client.lease_grant(2)
    lost = []
    keeper = LeaseKeeper(client, lease, 2, on_lost=lost.append).start()
    client.lease_revoke(lease)
    deadline = time.monotonic() + 20
    while not lost and time.monotonic() < deadline:
        time.sleep(0.1)
    keeper.stop()
    assert lost and isinstance(lost[0], LeaseExpired)


def test_watch_prefix_sees_puts_and_deletes_in_order_and_resumes(client, prefix):
    start = client.get_prefix(prefix).revision + 1
    client.put(prefix + "a", "1")
    client.put(prefix + "other/../b", "2")
    client.delete(prefix + "a")
    client.put(prefix[:-1] + "Z", "not ours")
    events = list(client.watch_prefix(prefix, start_revision=start, idle_timeout=0.5))
    assert [(e.type, e.key, e.value) for e in events] == [
        ("PUT", prefix + "a", b"1"),
        ("PUT", prefix + "other/../b", b"2"),
        ("DELETE", prefix + "a", b""),
    ]
    # resume after the first event: the rest, nothing twice
    resumed = list(
        client.watch_prefix(prefix, start_revision=events[0].revision + 1, idle_timeout=0.5)
    )
    assert [e.revision for e in resumed] == [e.revision for e in events[1:]]


def test_watch_from_now_sees_only_new_changes(client, prefix):
    import threading

    client.put(prefix + "old", "x")
    threading.Timer(0.3, lambda: client.put(prefix + "new", "y")).start()
    events = list(client.watch_prefix(prefix, idle_timeout=1.0))
    assert [e.key for e in events] == [prefix + "new"]


def test_async_client_and_watch(etcd_url, prefix):
    async def scenario():
        async with AsyncEtcdClient(etcd_url) as c:
            lease = await c.lease_grant(5)
            await c.put(prefix + "w1", {"url": "u"}, lease=lease)
            assert (await c.get(prefix + "w1")).json() == {"url": "u"}
            start = (await c.get_prefix(prefix)).revision + 1
            seen = []

            async def watch():
                async for event in c.watch_prefix(prefix, start_revision=start):
                    seen.append((event.type, event.key))
                    if len(seen) == 2:
                        return

            task = asyncio.create_task(watch())
            await asyncio.sleep(0.2)
            await c.put(prefix + "w2", "x")
            await c.lease_revoke(lease)  # deletes w1
            await asyncio.wait_for(task, 5)
            assert seen == [("PUT", prefix + "w2"), ("DELETE", prefix + "w1")]
            assert await c.lease_keepalive(await c.lease_grant(3)) == 3
            assert await c.delete_prefix(prefix) == 1

    asyncio.run(scenario())


def test_failover_and_unavailable(etcd_url, prefix):
    with EtcdClient(["http://127.0.0.1:1", etcd_url], timeout=2) as c:
        c.put(prefix + "k", "v")
        assert c.get(prefix + "k").value == b"v"
    with EtcdClient("http://127.0.0.1:1", timeout=0.5) as c:
        assert not c.health()
        with pytest.raises(EtcdUnavailable):
            c.get("x")


def test_async_failover_unavailable_and_a_revoked_lease(etcd_url, prefix):
    """The async client sends the same calls (dynkv.infra.etcd_wire) through the same endpoint
    rotation as the sync one."""

    async def scenario():
        async with AsyncEtcdClient(["http://127.0.0.1:1", etcd_url], timeout=2) as c:
            await c.put(prefix + "k", "v")
            assert (await c.get(prefix + "k")).value == b"v"
            assert c.endpoints[c._current] == etcd_url.rstrip("/")  # the one that answered
            lease = await c.lease_grant(5)
            assert 0 < await c.lease_time_to_live(lease) <= 5
            await c.lease_revoke(lease)
            await c.lease_revoke(lease)  # already gone: not an error
            assert await c.lease_time_to_live(lease) == -1
            with pytest.raises(LeaseExpired):
                await c.lease_keepalive(lease)
            assert await c.delete(prefix + "k") == 1
        async with AsyncEtcdClient("http://127.0.0.1:1", timeout=0.5) as c:
            with pytest.raises(EtcdUnavailable, match="no etcd endpoint answered"):
                await c.get("x")

    asyncio.run(scenario())
