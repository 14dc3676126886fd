"""etcd and NATS for a deployment: embedded binaries, docker containers, or external endpoints."""
