"""Docker infra as data: the containers Dynamo's compose file runs, published on loopback only and
labelled so `down`/`status` find them again; and the SDK calls, against a fake client."""

from __future__ import annotations

import pytest

from dynkv.infra import docker as d


def _published_hosts(spec) -> set[str]:
    return {host for host, _port in spec.ports.values()}


@pytest.mark.parametrize(
    "make, requested",
    [
        (
            lambda: d.nats_container(deployment="dev", port=14222, monitor_port=18222),
            {14222, 18222},
        ),
        (
            lambda: d.etcd_container(deployment="dev", client_port=12379, peer_port=12380),
            {12379, 12380},
        ),
    ],
    ids=["nats", "etcd"],
)
def test_containers_publish_only_the_requested_ports_on_loopback(make, requested):
    spec = make()
    assert _published_hosts(spec) == {"127.0.0.1"}  # never 0.0.0.0: nothing leaves the host
    assert {port for _host, port in spec.ports.values()} == requested
    # an image is pinned to a release, never a moving tag
    name, _, tag = spec.image.rpartition(":")
    assert name and tag and tag != "latest" and tag[0] in "v0123456789"


def test_containers_are_found_again_by_their_labels_and_name():
    """`down` and `status` of another process find a deployment's containers by label, and a
    crashed run's leftover by name: both derive from (deployment, service) alone."""
    for service, spec in [
        ("nats", d.nats_container(deployment="dev", port=1, monitor_port=2)),
        ("etcd", d.etcd_container(deployment="dev", client_port=3, peer_port=4)),
    ]:
        assert dict(spec.labels) == d.labels("dev", service)
        assert spec.name == d.container_name("dev", service)
    assert d.container_name("dev", "nats") != d.container_name("prod", "nats")
    assert d.labels("dev", "nats") != d.labels("prod", "nats")


def test_nats_runs_jetstream_with_monitoring_inside_the_container():
    spec = d.nats_container(deployment="dev", port=14222, monitor_port=18222)
    cmd = list(spec.command)
    assert "-js" in cmd  # the KV event streams need JetStream
    monitor = cmd[cmd.index("-m") + 1]
    assert spec.ports[f"{monitor}/tcp"] == ("127.0.0.1", 18222)  # the health probe's port


def test_etcd_advertises_the_published_client_port():
    """Inside the container etcd listens on all its interfaces (the container's own network);
    what it advertises to clients must be the host's published loopback port."""
    spec = d.etcd_container(deployment="dev", client_port=12379, peer_port=12380)
    cmd = list(spec.command)
    listen = cmd[cmd.index("--listen-client-urls") + 1]
    inside = int(listen.rsplit(":", 1)[1])
    assert spec.ports[f"{inside}/tcp"] == ("127.0.0.1", 12379)
    assert cmd[cmd.index("--advertise-client-urls") + 1] == "http://127.0.0.1:12379"


class FakeContainer:
    def __init__(self, cid, name, labels, status="running"):
        self.id, self.name, self.labels, self.status = cid, name, labels, status
        self.stopped = self.removed = False
        self.attrs = {"State": {"ExitCode": 0}}

    def stop(self, timeout):
        self.stopped = timeout

    def remove(self, force):
        self.removed = True

    def reload(self):
        pass

    def logs(self, stream, follow, tail):
        return iter([b"line one\nline ", b"two\n"])


class FakeContainers:
    """Stands in for a Docker engine (none runs on these machines). Filtering is the engine's
    job, not ours: the fake records the filters dynkv sends and answers with the containers the
    test says match them."""

    def __init__(self):
        self.items: dict[str, FakeContainer] = {}
        self.runs = []
        self.queries: list[dict] = []
        self.answer: list[FakeContainer] = []

    def run(self, image, command, **kw):
        self.runs.append((image, command, kw))
        c = FakeContainer(f"id{len(self.items)}", kw["name"], kw["labels"])
        self.items[c.id] = c
        return c

    def list(self, all, filters):
        assert all is True  # stopped containers too: a crashed run's leftovers
        self.queries.append(dict(filters))
        return list(self.answer)

    def get(self, cid):
        import docker

        if cid not in self.items:
            raise docker.errors.NotFound("gone")
        return self.items[cid]


class FakeClient:
    def __init__(self):
        self.containers = FakeContainers()


def test_backend_runs_specs_and_replaces_leftovers():
    client = FakeClient()
    backend = d.DockerBackend(client)
    spec = d.nats_container(deployment="dev", port=1, monitor_port=2)
    first = backend.start(spec)
    assert client.containers.queries[-1] == {"name": f"^/{spec.name}$"}  # an exact-name match
    client.containers.answer = [client.containers.items[first]]  # the engine finds the leftover
    second = backend.start(spec)  # a crashed run's container of the same name is replaced
    assert client.containers.items[first].removed
    image, command, kw = client.containers.runs[-1]
    assert (image, command) == (spec.image, list(spec.command))
    assert kw["detach"] and kw["labels"] == dict(spec.labels) and kw["name"] == spec.name
    assert backend.is_running(second)
    client.containers.answer = [client.containers.items[second]]
    assert [c.id for c in backend.find("dev")] == [second]
    assert client.containers.queries[-1] == {"label": "dynkv.deployment=dev"}
    assert list(backend.logs(second, tail=5, follow=False)) == ["line one", "line two"]
    backend.stop(second, timeout=3)
    assert client.containers.items[second].stopped == 3
    backend.stop("missing", timeout=1)  # idempotent


def test_unreachable_engine_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(d.DockerUnavailable) as exc:
        d.connect()
    assert "not reachable" in exc.value.cause
    assert "--infra embedded" in exc.value.fix
