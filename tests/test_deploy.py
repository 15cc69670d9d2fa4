"""deploy/ cannot run here (no container engine, no cluster), so check that it agrees with the code:
every flag it passes parses with `egress serve`'s real parser, ports match the defaults the code
exports and each other, and the sandbox side points at the gate and nowhere else."""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.app.cli import DEFAULT_LISTEN, build_parser
from proxy.sandbox import DEFAULT_DNS_PORT, DEFAULT_PROXY_PORT

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
PROXY_PORT = int(DEFAULT_LISTEN.rsplit(":", 1)[1])


def serve_args(argv: list[str]) -> argparse.Namespace:
    """Parse with the real `egress serve` parser (SystemExit on an unknown or malformed flag)."""
    return build_parser().parse_args(["serve", *argv])


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def test_the_code_agrees_with_itself() -> None:
    assert PROXY_PORT == DEFAULT_PROXY_PORT == 3128
    assert DEFAULT_DNS_PORT == 53


# -- docker compose ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return data


def test_compose_gate_command_parses_and_uses_the_default_ports(compose: dict[str, Any]) -> None:
    gate = compose["services"]["gate"]
    args = serve_args(gate["command"])
    assert port_of(args.listen) == DEFAULT_PROXY_PORT
    assert port_of(args.dns_listen) == DEFAULT_DNS_PORT
    assert args.policy == "/app/allowlists/default.yaml"
    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    assert f"EXPOSE {DEFAULT_PROXY_PORT}" in dockerfile
    assert "/app/allowlists" in dockerfile
    # port 53 as a non-root user: the sysctl must cover it
    assert gate["sysctls"]["net.ipv4.ip_unprivileged_port_start"] <= DEFAULT_DNS_PORT


def test_compose_sandbox_is_only_on_the_internal_network(compose: dict[str, Any]) -> None:
    networks = compose["networks"]
    assert networks["sandbox"]["internal"] is True
    assert networks["sandbox"].get("enable_ipv6") is False
    assert not networks["outside"].get("internal", False)
    sandbox = compose["services"]["sandbox"]
    assert list(sandbox["networks"]) == ["sandbox"]
    assert set(compose["services"]["gate"]["networks"]) == {"outside", "sandbox"}
    assert "ports" not in sandbox


def test_compose_sandbox_points_at_the_gate_for_proxy_and_dns(compose: dict[str, Any]) -> None:
    gate_ip = compose["services"]["gate"]["networks"]["sandbox"]["ipv4_address"]
    subnet = compose["networks"]["sandbox"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(gate_ip) in ipaddress.ip_network(subnet)
    env = compose["services"]["sandbox"]["environment"]
    expected = f"http://{gate_ip}:{DEFAULT_PROXY_PORT}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "PIP_PROXY"):
        assert env[name] == expected, name
    assert "*" not in env["NO_PROXY"]
    assert compose["services"]["sandbox"]["dns"] == [gate_ip]


def test_compose_metrics_are_not_reachable_from_the_sandbox_network(
    compose: dict[str, Any],
) -> None:
    """Compose cannot filter ports inside a network: /metrics must be bound to the gate's address on
    `outside`, never to 0.0.0.0 or an address on the sandbox network."""
    gate = compose["services"]["gate"]
    args = serve_args(gate["command"])
    host = args.metrics.rsplit(":", 1)[0]
    assert host == gate["networks"]["outside"]["ipv4_address"]
    outside = compose["networks"]["outside"]["ipam"]["config"][0]["subnet"]
    sandbox = compose["networks"]["sandbox"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(host) in ipaddress.ip_network(outside)
    assert ipaddress.ip_address(host) not in ipaddress.ip_network(sandbox)


# -- kubernetes ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    docs: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def _gate(k8s: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return k8s[("Deployment", "agent-egress-gate")]


def test_k8s_gate_deployment(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployment = _gate(k8s)
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    container = pod["spec"]["containers"][0]
    args = serve_args(container["args"])
    ports = {(p["containerPort"], p["protocol"]) for p in container["ports"]}
    assert port_of(args.listen) == DEFAULT_PROXY_PORT
    assert (port_of(args.listen), "TCP") in ports
    dns = port_of(args.dns_listen)
    assert {(dns, "UDP"), (dns, "TCP")} <= ports
    assert (port_of(args.metrics), "TCP") in ports
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(args.policy).parent) in mounts
    assert str(Path(args.journal).parent) in mounts
    config = k8s[("ConfigMap", "agent-egress-policy")]
    assert Path(args.policy).name in config["data"]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_k8s_service_maps_to_the_gate_ports(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    service = k8s[("Service", "agent-egress-gate")]
    labels = _gate(k8s)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    container = _gate(k8s)["spec"]["template"]["spec"]["containers"][0]
    pod_ports = {(p["containerPort"], p["protocol"]) for p in container["ports"]}
    published = {(p["port"], p["protocol"]): p["targetPort"] for p in service["spec"]["ports"]}
    assert published[(DEFAULT_PROXY_PORT, "TCP")] == DEFAULT_PROXY_PORT
    for proto in ("UDP", "TCP"):
        assert (published[(DEFAULT_DNS_PORT, proto)], proto) in pod_ports
    assert all((target, proto) in pod_ports for (_, proto), target in published.items())
    assert "9464" not in str(service["spec"]["ports"])  # metrics are not published to sandboxes


def test_k8s_sandboxes_reach_only_the_gate(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    policy = k8s[("NetworkPolicy", "agent-sandbox-egress-only-via-gate")]["spec"]
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["ingress"] == []
    [rule] = policy["egress"]
    [peer] = rule["to"]
    assert set(peer) == {"podSelector"}  # no ipBlock, no namespaceSelector: only gate pods
    labels = _gate(k8s)["spec"]["template"]["metadata"]["labels"]
    assert peer["podSelector"]["matchLabels"].items() <= labels.items()
    container = _gate(k8s)["spec"]["template"]["spec"]["containers"][0]
    args = serve_args(container["args"])
    allowed = {(p["port"], p["protocol"]) for p in rule["ports"]}
    dns = port_of(args.dns_listen)
    assert allowed == {(DEFAULT_PROXY_PORT, "TCP"), (dns, "UDP"), (dns, "TCP")}
    assert port_of(args.metrics) not in {p for p, _ in allowed}


def test_k8s_sample_sandbox_is_covered_and_points_at_the_gate(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    pod = k8s[("Pod", "agent-sandbox-example")]
    selector = k8s[("NetworkPolicy", "agent-sandbox-egress-only-via-gate")]["spec"]["podSelector"]
    assert selector["matchLabels"].items() <= pod["metadata"]["labels"].items()
    cluster_ip = k8s[("Service", "agent-egress-gate")]["spec"]["clusterIP"]
    spec = pod["spec"]
    assert spec["dnsPolicy"] == "None"
    assert spec["dnsConfig"]["nameservers"] == [cluster_ip]
    env = {e["name"]: e["value"] for e in spec["containers"][0]["env"]}
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        assert env[name] == f"http://{cluster_ip}:{DEFAULT_PROXY_PORT}"
    assert spec["automountServiceAccountToken"] is False


def test_everything_is_in_one_namespace(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    namespaces = {
        doc["metadata"].get("namespace") for (kind, _), doc in k8s.items() if kind != "Namespace"
    }
    assert namespaces == {k8s[("Namespace", "agent-egress")]["metadata"]["name"]}
