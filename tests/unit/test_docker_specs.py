"""Docker infra as data: the containers Dynamo's compose file runs, published on loopback only and
labelled so `down`/`status` find them again; and the SDK calls, against a fake client."""

from __future__ import annotations

import pytest

from dynkv.infra import docker as d


def test_nats_container_matches_the_guide():
    spec = d.nats_container(deployment="dev", port=14222, monitor_port=18222)
    assert spec.image == "nats:2.11.4"
    assert spec.command == ("-js", "--trace", "-m", "8222")
    assert dict(spec.ports) == {"4222/tcp": ("127.0.0.1", 14222), "8222/tcp": ("127.0.0.1", 18222)}
    assert dict(spec.labels) == {"dynkv.deployment": "dev", "dynkv.service": "nats"}
    assert spec.name == "dynkv-dev-nats"


def test_etcd_container_is_etcd_36_listening_inside_and_published_on_loopback():
    spec = d.etcd_container(deployment="dev", client_port=12379, peer_port=12380)
    assert spec.image.startswith("quay.io/coreos/etcd:v3.6.")
    cmd = list(spec.command)
    assert cmd[0] == "/usr/local/bin/etcd"
    assert cmd[cmd.index("--listen-client-urls") + 1] == "http://0.0.0.0:2379"
    assert cmd[cmd.index("--advertise-client-urls") + 1] == "http://127.0.0.1:12379"
    assert dict(spec.ports) == {"2379/tcp": ("127.0.0.1", 12379), "2380/tcp": ("127.0.0.1", 12380)}
    assert all(host == "127.0.0.1" for host, _ in spec.ports.values())
    assert dict(spec.labels) == {"dynkv.deployment": "dev", "dynkv.service": "etcd"}


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
    def __init__(self):
        self.items: dict[str, FakeContainer] = {}
        self.runs = []

    def run(self, image, command, **kw):
        self.runs.append((image, command, kw))
        c = FakeContainer(f"id{len(self.items)}", kw["name"], kw["labels"])
        self.items[c.id] = c
        return c

    def list(self, all, filters):
        out = list(self.items.values())
        if "label" in filters:
            key, value = filters["label"].split("=")
            out = [c for c in out if c.labels.get(key) == value]
        if "name" in filters:
            name = filters["name"].strip("^/$")
            out = [c for c in out if c.name == name]
        return out

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
    second = backend.start(spec)  # a crashed run's container of the same name is replaced
    assert client.containers.items[first].removed
    image, command, kw = client.containers.runs[-1]
    assert image == "nats:2.11.4" and command == ["-js", "--trace", "-m", "8222"]
    assert kw["detach"] and kw["labels"]["dynkv.deployment"] == "dev"
    assert backend.is_running(second)
    assert [c.id for c in backend.find("dev") if not c.removed] == [second]
    assert backend.find("other") == []
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
