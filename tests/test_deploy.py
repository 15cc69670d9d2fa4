"""deploy/ cannot run here (no container engine, no cluster), so it is checked two ways: by the
independent validators a platform team would use (the Compose spec schema, kustomize, kubernetes-validate
on two Kubernetes versions, checkov), and against the code: every flag parses with `egress serve`'s real
parser, ports and paths agree with the code and with each other, and the isolation properties hold in the
rendered manifests (what `kubectl apply -k` would send)."""

from __future__ import annotations

import argparse
import ipaddress
import re
import shutil
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.app.cli import DEFAULT_LISTEN, build_parser
from proxy.core import addresses
from proxy.sandbox import DEFAULT_DNS_PORT, DEFAULT_PROXY_PORT
from tests import validators

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
OVERLAYS = ["overlays/kind", "overlays/production"]
SANDBOX_EXAMPLE = "examples/sandbox"
KUBERNETES_VERSIONS = ["1.32.0", "1.35.0"]  # the oldest and newest minor a managed cluster runs
PROXY_PORT = int(DEFAULT_LISTEN.rsplit(":", 1)[1])
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
GATE_NS, SANDBOX_NS, MONITORING_NS = "agent-egress", "agent-sandboxes", "monitoring"
NAME_LABEL = "kubernetes.io/metadata.name"

Docs = list[dict[str, Any]]


def serve_args(argv: list[str]) -> argparse.Namespace:
    """Parse with the real `egress serve` parser (SystemExit on an unknown or malformed flag)."""
    return build_parser().parse_args(["serve", *argv])


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def host_of(listen: str) -> str:
    return listen.rsplit(":", 1)[0]


def test_the_code_agrees_with_itself() -> None:
    assert PROXY_PORT == DEFAULT_PROXY_PORT == 3128
    assert DEFAULT_DNS_PORT == 53


# -- docker compose ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return data


def test_compose_file_matches_the_compose_spec() -> None:
    proc = validators.run(
        "check-jsonschema", "--builtin-schema", "vendor.compose-spec", "deploy/docker-compose.yml"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_gate_command_parses_and_listens_on_the_sandbox_side_only(
    compose: dict[str, Any],
) -> None:
    gate = compose["services"]["gate"]
    args = serve_args(gate["command"])
    sandbox_ip = gate["networks"]["sandbox"]["ipv4_address"]
    assert args.listen == f"{sandbox_ip}:{DEFAULT_PROXY_PORT}"
    assert args.dns_listen == f"{sandbox_ip}:{DEFAULT_DNS_PORT}"
    assert args.policy == "/app/allowlists/default.yaml"
    assert args.audit_required
    # port 53 as a non-root user: the sysctl must cover it
    assert gate["sysctls"]["net.ipv4.ip_unprivileged_port_start"] <= DEFAULT_DNS_PORT
    # the healthcheck probes the address the gate really listens on
    assert f"('{sandbox_ip}', {DEFAULT_PROXY_PORT})" in " ".join(gate["healthcheck"]["test"])


def test_compose_gate_writes_only_to_its_state_volume(compose: dict[str, Any]) -> None:
    gate = compose["services"]["gate"]
    args = serve_args(gate["command"])
    assert gate["read_only"] is True
    assert gate["cap_drop"] == ["ALL"] and "no-new-privileges:true" in gate["security_opt"]
    [mount] = gate["volumes"]
    volume, target = mount.split(":")[:2]
    assert volume in compose["volumes"]
    assert args.state_dir == target
    assert Path(args.journal).parent == Path(target)


def test_compose_builds_a_versioned_image_and_limits_resources(compose: dict[str, Any]) -> None:
    gate = compose["services"]["gate"]
    assert gate["pull_policy"] == "build"
    assert gate["image"] == f"agent-egress:{VERSION}"
    for name, service in compose["services"].items():
        assert service["pids_limit"] > 0, name
        assert service["mem_limit"], name
        assert service["read_only"] is True, name


def test_compose_sandbox_is_non_root_and_only_on_the_isolated_network(
    compose: dict[str, Any],
) -> None:
    networks = compose["networks"]
    sandbox_net = networks["sandbox"]
    assert sandbox_net["internal"] is True
    assert sandbox_net.get("enable_ipv6") is False
    assert sandbox_net["driver_opts"]["com.docker.network.bridge.gateway_mode_ipv4"] == "isolated"
    assert not networks["outside"].get("internal", False)
    sandbox = compose["services"]["sandbox"]
    assert list(sandbox["networks"]) == ["sandbox"]
    assert set(compose["services"]["gate"]["networks"]) == {"outside", "sandbox"}
    assert "ports" not in sandbox
    uid = str(sandbox["user"]).split(":")[0]
    assert uid not in ("0", "root") and int(uid) > 0
    assert "@sha256:" in sandbox["image"]


def test_compose_sandbox_points_at_the_gate_for_proxy_and_dns(compose: dict[str, Any]) -> None:
    gate_ip = compose["services"]["gate"]["networks"]["sandbox"]["ipv4_address"]
    subnet = compose["networks"]["sandbox"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(gate_ip) in ipaddress.ip_network(subnet)
    env = compose["services"]["sandbox"]["environment"]
    expected = f"http://{gate_ip}:{DEFAULT_PROXY_PORT}"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "PIP_PROXY"):
        assert env[name] == expected, name
    assert "*" not in env["NO_PROXY"]
    # Docker's embedded DNS forwards every name it does not own to the gate's DNS gate.
    assert compose["services"]["sandbox"]["dns"] == [gate_ip]
    args = serve_args(compose["services"]["gate"]["command"])
    assert host_of(args.dns_listen) == gate_ip


def test_compose_metrics_are_not_reachable_from_the_sandbox_network(
    compose: dict[str, Any],
) -> None:
    """Compose cannot filter ports inside a network: /metrics must be bound to the gate's address on
    `outside`, never to 0.0.0.0 or an address on the sandbox network."""
    gate = compose["services"]["gate"]
    host = host_of(serve_args(gate["command"]).metrics)
    assert host == gate["networks"]["outside"]["ipv4_address"]
    outside = compose["networks"]["outside"]["ipam"]["config"][0]["subnet"]
    sandbox = compose["networks"]["sandbox"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(host) in ipaddress.ip_network(outside)
    assert ipaddress.ip_address(host) not in ipaddress.ip_network(sandbox)


# -- kubernetes: render, validate ----------------------------------------------------------------


def _load(text: str) -> Docs:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every overlay and the sample sandbox, rendered by kustomize exactly as `kubectl apply -k`."""
    out = tmp_path_factory.mktemp("rendered")
    files = {}
    for name in [*OVERLAYS, SANDBOX_EXAMPLE]:
        path = out / f"{name.replace('/', '-')}.yaml"
        path.write_text(validators.kustomize(K8S / name))
        files[name] = path
    return files


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, rendered: dict[str, Path]) -> Docs:
    return _load(rendered[request.param].read_text())


@pytest.fixture(scope="module")
def sandbox_example(rendered: dict[str, Path]) -> Docs:
    return _load(rendered[SANDBOX_EXAMPLE].read_text())


def one(docs: Docs, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    found = [
        d
        for d in docs
        if d["kind"] == kind
        and d["metadata"]["name"] == name
        and (namespace is None or d["metadata"].get("namespace") == namespace)
    ]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def of_kind(docs: Docs, kind: str) -> Docs:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_rendered_manifests_are_valid_kubernetes(rendered: dict[str, Path], version: str) -> None:
    proc = validators.run(
        "kubernetes-validate", "--strict", "--quiet", "-k", version, *map(str, rendered.values())
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_checkov_passes_and_every_skip_says_why(rendered: dict[str, Path]) -> None:
    directory = next(iter(rendered.values())).parent
    reports = validators.checkov("-d", str(directory), "--framework", "kubernetes")
    failed, skipped = validators.checkov_findings(reports)
    assert failed == []
    for check, reason in skipped.items():
        assert len(reason.split()) >= 4, f"{check}: a skipped check needs its reason"
    assert sum(r["summary"]["passed"] for r in reports) > 100


# -- kubernetes: the gate ------------------------------------------------------------------------


def gate_deployment(docs: Docs) -> dict[str, Any]:
    return one(docs, "Deployment", "agent-egress-gate", GATE_NS)


def gate_container(docs: Docs) -> dict[str, Any]:
    [container] = gate_deployment(docs)["spec"]["template"]["spec"]["containers"]
    return container


def gate_args(docs: Docs) -> argparse.Namespace:
    return serve_args(gate_container(docs)["args"])


def gate_labels(docs: Docs) -> dict[str, str]:
    labels: dict[str, str] = gate_deployment(docs)["spec"]["template"]["metadata"]["labels"]
    return labels


def container_ports(docs: Docs) -> set[tuple[int, str]]:
    return {(p["containerPort"], p["protocol"]) for p in gate_container(docs)["ports"]}


def test_gate_args_parse_and_match_ports_and_mounts(overlay: Docs) -> None:
    container = gate_container(overlay)
    args = gate_args(overlay)
    ports = container_ports(overlay)
    assert port_of(args.listen) == DEFAULT_PROXY_PORT and (DEFAULT_PROXY_PORT, "TCP") in ports
    dns = port_of(args.dns_listen)
    assert {(dns, "UDP"), (dns, "TCP")} <= ports
    assert (port_of(args.metrics), "TCP") in ports
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts[str(Path(args.policy).parent)]["readOnly"] is True
    assert args.state_dir in mounts
    assert str(Path(args.journal).parent) in mounts
    assert args.audit_required
    configmap = next(
        v["configMap"]["name"]
        for v in gate_deployment(overlay)["spec"]["template"]["spec"]["volumes"]
        if v["name"] == mounts[str(Path(args.policy).parent)]["name"]
    )
    assert Path(args.policy).name in one(overlay, "ConfigMap", configmap, GATE_NS)["data"]


def test_gate_metrics_bind_to_the_pod_address_not_everywhere(overlay: Docs) -> None:
    container = gate_container(overlay)
    assert host_of(gate_args(overlay).metrics) == "$(POD_IP)"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_gate_pod_is_hardened_and_meets_restricted(overlay: Docs) -> None:
    pod = gate_deployment(overlay)["spec"]["template"]["spec"]
    container = gate_container(overlay)
    assert pod["automountServiceAccountToken"] is False
    sa = one(overlay, "ServiceAccount", pod["serviceAccountName"], GATE_NS)
    assert sa["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    for namespace in of_kind(overlay, "Namespace"):
        labels = namespace["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted", namespace


def test_gate_image_is_versioned_and_not_re_pulled(overlay: Docs) -> None:
    for deployment in of_kind(overlay, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            image = container["image"]
            assert "@sha256:" in image or ":" in image.rsplit("/", 1)[-1], image
            assert not image.endswith(":latest"), image
            assert container["imagePullPolicy"] == "IfNotPresent"
    assert gate_container(overlay)["image"].endswith(f"agent-egress:{VERSION}")


def test_gate_survives_a_node_drain(overlay: Docs) -> None:
    deployment = gate_deployment(overlay)
    assert deployment["spec"]["replicas"] >= 2
    labels = gate_labels(overlay)
    pdb = one(overlay, "PodDisruptionBudget", "agent-egress-gate", GATE_NS)
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    spread = deployment["spec"]["template"]["spec"]["topologySpreadConstraints"]
    by_key = {c["topologyKey"]: c for c in spread}
    assert by_key["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    assert "topology.kubernetes.io/zone" in by_key
    for constraint in spread:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_journal_and_state_are_on_sized_volumes(overlay: Docs) -> None:
    pod = gate_deployment(overlay)["spec"]["template"]["spec"]
    args = gate_args(overlay)
    mounts = {m["mountPath"]: m["name"] for m in gate_container(overlay)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    journal = volumes[mounts[str(Path(args.journal).parent)]]
    state = volumes[mounts[args.state_dir]]
    assert journal["emptyDir"]["sizeLimit"]
    assert state["emptyDir"] == {"medium": "Memory", "sizeLimit": state["emptyDir"]["sizeLimit"]}


def test_service_selects_gate_pods_in_the_gate_namespace_by_name(overlay: Docs) -> None:
    service = one(overlay, "Service", "agent-egress-gate", GATE_NS)
    spec = service["spec"]
    assert "clusterIP" not in spec  # allocated by the cluster: no fixed address to collide
    assert spec["selector"].items() <= gate_labels(overlay).items()
    named = {
        p["name"]: (p["containerPort"], p["protocol"]) for p in gate_container(overlay)["ports"]
    }
    published = {(p["port"], p["protocol"]): named[p["targetPort"]] for p in spec["ports"]}
    assert published[(DEFAULT_PROXY_PORT, "TCP")] == (DEFAULT_PROXY_PORT, "TCP")
    dns = port_of(gate_args(overlay).dns_listen)
    assert published[(DEFAULT_DNS_PORT, "UDP")] == (dns, "UDP")
    assert published[(DEFAULT_DNS_PORT, "TCP")] == (dns, "TCP")
    metrics = port_of(gate_args(overlay).metrics)
    assert all(port != metrics for port, _ in published.values())  # never published to sandboxes


def test_otlp_export_goes_to_a_collector_service_the_gate_may_reach(
    rendered: dict[str, Path],
) -> None:
    docs = _load(rendered["overlays/kind"].read_text())
    env = {e["name"]: e.get("value") for e in gate_container(docs)["env"]}
    endpoint = env["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "grpc"
    assert any(
        "OTEL_EXPORTER_OTLP_ENDPOINT" in source.read_text()
        for source in (ROOT / "proxy" / "evidence").rglob("*.py")
    ), "the OTel exporter no longer reads OTEL_EXPORTER_OTLP_ENDPOINT"
    host, port = endpoint.removeprefix("http://").rsplit(":", 1)
    name, namespace = host.split(".")[:2]
    service = one(docs, "Service", name, namespace)
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    collector_labels = one(docs, "Deployment", name, namespace)["spec"]["template"]["metadata"][
        "labels"
    ]
    policy = one(docs, "NetworkPolicy", "agent-egress-gate", GATE_NS)["spec"]
    assert any(
        peer.get("namespaceSelector", {}).get("matchLabels") == {NAME_LABEL: namespace}
        and peer["podSelector"]["matchLabels"].items() <= collector_labels.items()
        and {"protocol": "TCP", "port": int(port)} in rule["ports"]
        for rule in policy["egress"]
        for peer in rule["to"]
    )


def test_gate_network_policy_admits_sandboxes_and_monitoring_only(overlay: Docs) -> None:
    policy = one(overlay, "NetworkPolicy", "agent-egress-gate", GATE_NS)["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= gate_labels(overlay).items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    args = gate_args(overlay)
    dns = port_of(args.dns_listen)
    ingress = {
        next(iter(rule["from"]))["namespaceSelector"]["matchLabels"][NAME_LABEL]: {
            (p["port"], p["protocol"]) for p in rule["ports"]
        }
        for rule in policy["ingress"]
    }
    assert ingress == {
        SANDBOX_NS: {(DEFAULT_PROXY_PORT, "TCP"), (dns, "UDP"), (dns, "TCP")},
        MONITORING_NS: {(port_of(args.metrics), "TCP")},
    }
    # egress: cluster DNS, the collector, and 80/443 to anything but private ranges
    ports = [{(p["port"], p["protocol"]) for p in rule["ports"]} for rule in policy["egress"]]
    assert {(53, "UDP"), (53, "TCP")} in ports
    [web] = [r for r in policy["egress"] if {p["port"] for p in r["ports"]} == {80, 443}]
    excepted = {e for peer in web["to"] for e in peer["ipBlock"]["except"]}
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= excepted
    assert all(len(rule["to"]) >= 1 for rule in policy["egress"])  # no rule open to everything


def _embedded(prefix: str, v4: ipaddress.IPv4Network) -> ipaddress.IPv6Network:
    """The IPv6 addresses of ``prefix`` (a /96) carrying an address of ``v4`` in their last 32 bits."""
    base = int(ipaddress.IPv6Network(prefix).network_address)
    return ipaddress.IPv6Network((base | int(v4.network_address), 96 + v4.prefixlen))


def test_gate_network_policy_excepts_every_range_the_gate_refuses(overlay: Docs) -> None:
    """The second wall holds where the first does: every internal range of the gate's own table
    (proxy.core.addresses) is excepted from the destinations rule, and so is every IPv6 prefix
    that carries an internal IPv4 address (NAT64's by range; the local-use NAT64 range, 6to4 and
    Teredo whole: their IPv4 address is not at a fixed place, or is obfuscated). IPv4-mapped
    addresses leave as IPv4 and are held to the IPv4 list."""
    policy = one(overlay, "NetworkPolicy", "agent-egress-gate", GATE_NS)["spec"]
    [web] = [r for r in policy["egress"] if {p["port"] for p in r["ports"]} == {80, 443}]
    excepted = [
        ipaddress.ip_network(e) for peer in web["to"] for e in peer["ipBlock"].get("except", [])
    ]

    # The API server checks an except with Go's IPNet.Contains, which reads an IPv4-mapped address
    # as IPv4: such an entry is never inside ::/0, and the whole policy would be refused.
    assert [str(e) for e in excepted if e.version == 6 and e.network_address.ipv4_mapped] == []
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")

    def covered(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
        if net.version == 6 and net.subnet_of(mapped):  # type: ignore[arg-type]
            # sent as IPv4: under the IPv4 list
            low = net.network_address.ipv4_mapped  # type: ignore[union-attr]
            prefix = max(0, net.prefixlen - 96)
            net = ipaddress.IPv4Network((low, prefix))
        return any(
            net.version == e.version and net.subnet_of(e)  # type: ignore[arg-type]
            for e in excepted
        )

    internal_v4 = [ipaddress.IPv4Network(cidr) for cidr, _ in addresses._V4_RANGES]
    wanted: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = [*internal_v4]
    wanted += [ipaddress.IPv6Network(cidr) for cidr, _ in addresses._V6_RANGES]
    for net, mask, _, _ in addresses._V6_EMBEDDED:
        prefix = ipaddress.IPv6Network((net, bin(mask).count("1")))
        if prefix.prefixlen == 96:
            wanted += [_embedded(str(prefix), v4) for v4 in internal_v4]
        else:  # 6to4 and Teredo
            wanted.append(prefix)
    net, mask, _, _ = addresses._NAT64_LOCAL
    wanted.append(ipaddress.IPv6Network((net, bin(mask).count("1"))))
    assert len(wanted) > 40, "the gate's table was not read"
    assert [str(n) for n in wanted if not covered(n)] == []
    # and no public address the gate lets through is excepted, plain or through NAT64 (whole
    # prefixes are excepted only where they are deprecated or not routed: 6to4, Teredo, the
    # IPv4-compatible and -translated forms)
    for public in ("93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", "64:ff9b::5db8:d70e"):
        address = ipaddress.ip_address(public)
        assert addresses.internal_range(address) is None
        assert not any(address in e for e in excepted), public


# -- kubernetes: the sandbox namespace fails closed ------------------------------------------------


def test_sandbox_namespace_denies_everything_by_default(overlay: Docs) -> None:
    policies = [
        p for p in of_kind(overlay, "NetworkPolicy") if p["metadata"]["namespace"] == SANDBOX_NS
    ]
    deny = one(policies, "NetworkPolicy", "default-deny")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    # Every other policy there only adds egress to the gate, for every pod (labels are not trusted).
    for policy in policies:
        spec = policy["spec"]
        assert spec["podSelector"] == {}
        assert "ingress" not in spec
    sa = one(overlay, "ServiceAccount", "default", SANDBOX_NS)
    assert sa["automountServiceAccountToken"] is False


def test_sandboxes_reach_only_gate_pods_in_the_gate_namespace(overlay: Docs) -> None:
    policy = one(overlay, "NetworkPolicy", "egress-only-via-gate", SANDBOX_NS)["spec"]
    assert policy["policyTypes"] == ["Egress"]
    [rule] = policy["egress"]
    [peer] = rule["to"]
    # Both selectors in ONE peer (AND): a pod labelled like the gate in any other namespace, the
    # sandbox namespace included, is not a destination.
    assert set(peer) == {"namespaceSelector", "podSelector"}
    assert peer["namespaceSelector"] == {"matchLabels": {NAME_LABEL: GATE_NS}}
    assert peer["podSelector"]["matchLabels"].items() <= gate_labels(overlay).items()
    args = gate_args(overlay)
    dns = port_of(args.dns_listen)
    allowed = {(p["port"], p["protocol"]) for p in rule["ports"]}
    assert allowed == {(DEFAULT_PROXY_PORT, "TCP"), (dns, "UDP"), (dns, "TCP")}
    assert port_of(args.metrics) not in {p for p, _ in allowed}


def test_a_pod_labelled_like_the_gate_in_the_sandbox_namespace_gains_nothing(overlay: Docs) -> None:
    """The Service and every policy that grants the gate anything live in the gate's namespace."""
    labels = gate_labels(overlay)
    for doc in overlay:
        selector = (doc.get("spec") or {}).get("selector") or (doc.get("spec") or {}).get(
            "podSelector"
        )
        if isinstance(selector, dict):
            match = selector.get("matchLabels", selector)
            if match and match.items() <= labels.items():
                assert doc["metadata"]["namespace"] == GATE_NS, doc["metadata"]


def test_sample_sandbox_uses_the_gate_by_looked_up_address(sandbox_example: Docs) -> None:
    pod = one(sandbox_example, "Pod", "agent-sandbox-example", SANDBOX_NS)
    spec = pod["spec"]
    address = one(
        sandbox_example,
        "ConfigMap",
        spec["containers"][0]["env"][0]["valueFrom"]["configMapKeyRef"]["name"],
        SANDBOX_NS,
    )["data"]["GATE_IP"]
    ipaddress.ip_address(address)
    assert spec["dnsPolicy"] == "None"
    assert spec["dnsConfig"]["nameservers"] == [address]
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    assert env["EGRESS_GATE_IP"]["valueFrom"]["configMapKeyRef"]["key"] == "GATE_IP"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        assert env[name]["value"] == f"http://$(EGRESS_GATE_IP):{DEFAULT_PROXY_PORT}"
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] > 0
    assert spec["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True


# -- kubernetes: policy changes roll out ----------------------------------------------------------


@pytest.fixture
def k8s_copy(tmp_path: Path) -> Iterator[Path]:
    target = tmp_path / "kubernetes"
    shutil.copytree(K8S, target)
    yield target


def test_a_changed_policy_rolls_the_gate(k8s_copy: Path) -> None:
    """The ConfigMap is named after its content, so the Deployment's pod template changes with it."""

    def policy_volume(path: Path) -> str:
        docs = _load(validators.kustomize(path / "overlays/kind"))
        volumes = gate_deployment(docs)["spec"]["template"]["spec"]["volumes"]
        return str(next(v["configMap"]["name"] for v in volumes if "configMap" in v))

    before = policy_volume(k8s_copy)
    policy = k8s_copy / "base" / "policy.yaml"
    policy.write_text(policy.read_text().replace("  - gitlab", "  - huggingface"))
    after = policy_volume(k8s_copy)
    assert before != after and before.startswith("agent-egress-policy-")


def test_the_shipped_policy_loads(tmp_path: Path) -> None:
    from proxy.policy.loader import load_policy

    policy = load_policy(K8S / "base" / "policy.yaml")
    assert policy.rules


# -- kubernetes: the inspection CA -------------------------------------------------------------------


def test_every_replica_issues_from_one_ca_secret_only_the_gate_reads(overlay: Docs) -> None:
    args = gate_args(overlay)
    assert args.ca_cert and args.ca_key
    assert Path(args.ca_cert).parent == Path(args.ca_key).parent
    mounts = {m["mountPath"]: m for m in gate_container(overlay)["volumeMounts"]}
    mount = mounts[str(Path(args.ca_key).parent)]
    assert mount["readOnly"] is True
    volumes = {
        v["name"]: v for v in gate_deployment(overlay)["spec"]["template"]["spec"]["volumes"]
    }
    secret = volumes[mount["name"]]["secret"]
    assert secret["secretName"] == "agent-egress-ca"
    assert secret["defaultMode"] == 0o440  # owner and the gate's group (fsGroup) only
    assert "optional" not in secret  # no Secret, no gate: never a CA per replica
    assert (Path(args.ca_cert).name, Path(args.ca_key).name) == ("tls.crt", "tls.key")
    assert args.state_dir not in str(Path(args.ca_key).parent)


def test_the_sample_sandbox_trusts_the_gate_ca_certificate_only(sandbox_example: Docs) -> None:
    pod = one(sandbox_example, "Pod", "agent-sandbox-example", SANDBOX_NS)["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "secret" not in str(volumes)  # the sandbox never mounts the CA's Secret
    assert volumes["gate-ca"]["configMap"]["name"] == "agent-egress-ca-cert"
    [init] = pod["initContainers"]
    assert "/etc/egress-ca/ca.crt" in " ".join(init["command"])
    [agent] = pod["containers"]
    env = {e["name"]: e.get("value") for e in agent["env"]}
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "GIT_SSL_CAINFO", "NODE_EXTRA_CA_CERTS"):
        assert env[name] == "/trust/ca-bundle.pem"
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert mounts["/trust"]["readOnly"] is True


def test_kind_replicas_share_an_approval_store_only_they_reach(rendered: dict[str, Path]) -> None:
    docs = _load(rendered["overlays/kind"].read_text())
    state = gate_args(docs).state
    assert state.startswith("redis://")
    host, port = state.removeprefix("redis://").split("/", 1)[0].rsplit(":", 1)
    name, namespace = host.split(".")[:2]
    service = one(docs, "Service", name, namespace)
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    store_labels = one(docs, "Deployment", name, namespace)["spec"]["template"]["metadata"][
        "labels"
    ]
    # the gate may reach the store ...
    gate_policy = one(docs, "NetworkPolicy", "agent-egress-gate", GATE_NS)["spec"]
    assert any(
        peer["podSelector"].get("matchLabels", {None: None}).items() <= store_labels.items()
        and {"protocol": "TCP", "port": int(port)} in rule["ports"]
        for rule in gate_policy["egress"]
        for peer in rule["to"]
        if "podSelector" in peer and "namespaceSelector" not in peer
    )
    # ... and only the gate: the store's own policy admits the gate's pods and sends nothing
    [store_policy] = [
        p["spec"]
        for p in of_kind(docs, "NetworkPolicy")
        if p["metadata"]["namespace"] == namespace
        and p["spec"]["podSelector"].get("matchLabels")
        and p["spec"]["podSelector"]["matchLabels"].items() <= store_labels.items()
    ]
    assert set(store_policy["policyTypes"]) == {"Ingress", "Egress"}
    assert store_policy["egress"] == []
    [rule] = store_policy["ingress"]
    assert [peer["podSelector"]["matchLabels"] for peer in rule["from"]] == [
        {"app.kubernetes.io/name": "agent-egress-gate"}
    ]
    assert namespace == GATE_NS  # a podSelector-only peer means this namespace: the gate's


DOC_PAGES = [ROOT / "README.md", DEPLOY / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", DOC_PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_kubectl_apply_commands_apply_a_kustomization(page: Path) -> None:
    """Every page that tells you to apply the manifests names a kustomization (the one whose
    default-deny sandbox namespace the guarantees rely on), never a plain directory with -f."""
    for flag, target in re.findall(
        r"kubectl apply (-[fk]) (deploy/kubernetes\S*)", page.read_text()
    ):
        assert flag == "-k", f"{page.name}: `kubectl apply {flag} {target}`"
        directory = ROOT / target.strip("`")
        assert (directory / "kustomization.yaml").is_file(), f"{page.name}: {target}"
