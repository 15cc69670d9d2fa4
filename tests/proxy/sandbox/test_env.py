"""The proxy environment: every tool's knob points at the gate, nothing routes around it."""

from __future__ import annotations

import shlex

import pytest

from proxy.sandbox.env import NO_PROXY, ProxyAddress, connect_command, proxy_environment

GATE = ProxyAddress("127.0.0.1", 3128)


def test_standard_names_in_both_cases_replace_the_users() -> None:
    base = {
        "HTTPS_PROXY": "http://elsewhere:8080",
        "no_proxy": "*",
        "Http_Proxy": "http://mixed-case:1",
        "PATH": "/usr/bin",
    }
    env = proxy_environment(base, GATE)
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        assert env[name] == env[name.upper()] == "http://127.0.0.1:3128"
    assert env["NO_PROXY"] == env["no_proxy"] == NO_PROXY
    assert "Http_Proxy" not in env
    assert env["PATH"] == "/usr/bin"
    assert "*" not in env["NO_PROXY"]


def test_tool_specific_settings() -> None:
    env = proxy_environment({"JAVA_TOOL_OPTIONS": "-Xmx1g"}, GATE, connect="/opt/egress connect")
    url = "http://127.0.0.1:3128"
    assert env["PIP_PROXY"] == url
    assert env["npm_config_proxy"] == env["npm_config_https_proxy"] == url
    assert env["YARN_HTTP_PROXY"] == env["YARN_HTTPS_PROXY"] == url
    assert env["CARGO_HTTP_PROXY"] == url
    assert env["CLOUDSDK_PROXY_TYPE"] == "http"
    assert env["CLOUDSDK_PROXY_ADDRESS"] == "127.0.0.1"
    assert env["CLOUDSDK_PROXY_PORT"] == "3128"
    java = env["JAVA_TOOL_OPTIONS"]
    assert java.startswith("-Xmx1g ")
    for prop in (
        "-Dhttp.proxyHost=127.0.0.1",
        "-Dhttp.proxyPort=3128",
        "-Dhttps.proxyHost=127.0.0.1",
        "-Dhttps.proxyPort=3128",
    ):
        assert prop in java.split()
    assert "GOPROXY" not in env and "GOFLAGS" not in env  # go uses HTTPS_PROXY; defaults kept
    assert env["GIT_PROXY_COMMAND"] == "/opt/egress connect"


def test_git_ssh_goes_through_egress_connect() -> None:
    env = proxy_environment({}, GATE, connect="/opt/egress connect")
    argv = shlex.split(env["GIT_SSH_COMMAND"])
    assert argv[:2] == ["ssh", "-o"]
    assert argv[2] == "ProxyCommand=/opt/egress connect %h %p"


def test_credentials_are_carried_and_quoted() -> None:
    proxy = ProxyAddress("127.0.0.1", 3128, "sbx-1", "t:k/@")
    env = proxy_environment({}, proxy)
    assert env["HTTPS_PROXY"] == "http://sbx-1:t%3Ak%2F%40@127.0.0.1:3128"
    assert ProxyAddress.parse(env["HTTPS_PROXY"]) == proxy
    assert env["CLOUDSDK_PROXY_USERNAME"] == "sbx-1"


def test_ca_bundle_when_the_gate_intercepts() -> None:
    env = proxy_environment({}, GATE, ca_bundle="/ca.pem")
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS", "PIP_CERT"):
        assert env[name] == "/ca.pem"
    assert "SSL_CERT_FILE" not in proxy_environment({}, GATE)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:3128", ProxyAddress("127.0.0.1", 3128)),
        ("127.0.0.1:3128", ProxyAddress("127.0.0.1", 3128)),
        ("http://[::1]:8080/", ProxyAddress("::1", 8080)),
        ("http://a%40b:pw@gate:1", ProxyAddress("gate", 1, "a@b", "pw")),
    ],
)
def test_parse(url: str, expected: ProxyAddress) -> None:
    assert ProxyAddress.parse(url) == expected


@pytest.mark.parametrize(
    "url",
    ["https://gate:3128", "socks5://gate:1080", "http://gate", "http://gate:1/x", "http://:3"],
)
def test_parse_rejects(url: str) -> None:
    with pytest.raises(ValueError):
        ProxyAddress.parse(url)


def test_ipv6_proxy_hostport() -> None:
    assert ProxyAddress("::1", 3128).url == "http://[::1]:3128"


def test_connect_command_is_runnable() -> None:
    argv = shlex.split(connect_command())
    assert argv[-1] == "connect" or argv[-2:] == ["-m", "proxy.sandbox.connect"]
