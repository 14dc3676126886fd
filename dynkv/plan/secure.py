"""An advertised deployment's workers and frontend: the loopback services, switched to TLS.

`dynkv up --advertise` (docs/multi-host.md) keeps every service's shape and changes only how it is
reached: a worker's vLLM serves https with its CA-issued certificate (`--ssl-certfile`,
`--ssl-keyfile`, appended after the user's engine arguments) and registers an https URL; the
frontend binds the advertised address with its own certificate (unless the user gave one); and
each gets in its environment what makes it a client of the deployment (`DYNKV_CLIENT_*`, the NATS
token: dynkv.tls.model). Done as a step after the loopback builders so that a loopback plan is
byte-for-byte what it was.
"""

from __future__ import annotations

from dynkv.plan.frontend import connect_host
from dynkv.plan.model import EtcdKeyProbe, HttpProbe, Service
from dynkv.tls.layout import CLI
from dynkv.tls.model import TransportSecurity


def _https(url: str) -> str:
    return "https://" + url.split("://", 1)[1] if url.startswith("http://") else url


def secure_worker(worker: Service, tls: TransportSecurity, token: str | None) -> Service:
    """`worker` serving https and registering its https URL."""
    files = tls.service(worker.name).server
    assert files is not None and worker.info.url
    old_url, url = worker.info.url, _https(worker.info.url)
    split = worker.argv.index("--")
    wrapper = tuple(url if arg == old_url else arg for arg in worker.argv[:split])
    vllm = (*worker.argv[split:], "--ssl-certfile", files.cert, "--ssl-keyfile", files.key)
    cli = tls.client(CLI)
    probes = []
    for probe in worker.probes:
        if isinstance(probe, HttpProbe):
            probe = probe.replace(url=probe.url.replace(old_url, url, 1), tls=cli)
        elif isinstance(probe, EtcdKeyProbe):
            probe = probe.replace(tls=cli)
        probes.append(probe)
    env = {**worker.env, **tls.client_env(worker.name, token=token)}
    return worker.replace(
        argv=(*wrapper, *vllm),
        env=env,
        probes=tuple(probes),
        info=worker.info.model_copy(update={"url": url}),
    )


def secure_frontend(
    frontend: Service,
    tls: TransportSecurity,
    token: str | None,
    *,
    user_cert: tuple[str, str] | None,
) -> Service:
    """The frontend on the advertised address over https (its CA certificate unless the user
    gave `--tls-cert`), and a client of etcd, NATS and the workers with the deployment's CA."""
    argv = list(frontend.argv)
    if user_cert is None:
        files = tls.service("frontend").server
        assert files is not None
        argv += ["--tls-cert", files.cert, "--tls-key", files.key]
    port = frontend.ports["http"]
    url = f"https://{connect_host(tls.advertise)}:{port}"
    # the user's certificate may name a host this machine cannot verify it for: then the port
    probes = (
        frontend.probes
        if user_cert is not None
        else (HttpProbe(url=f"{url}/health", expect_json={"status": "ok"}, tls=tls.client(CLI)),)
    )
    return frontend.replace(
        argv=tuple(argv),
        env={**frontend.env, **tls.client_env("frontend", token=token)},
        probes=probes,
        info=frontend.info.model_copy(
            update={
                "url": url,
                "openai_url": f"{url}/v1",
                # clients verify the frontend against the CA (`curl --cacert`, bench)
                "ca_cert": tls.ca_cert if user_cert is None else None,
            }
        ),
    )
