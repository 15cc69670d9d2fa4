"""The environment that points real tools at the gate.

Inside the sandbox these variables are a convenience, not the boundary: a tool that ignores them
finds no route at all. They exist so that the tools an agent runs (curl, pip, npm, git, cargo, go,
Java build tools, gcloud, ...) *use* the gate and get its clear refusals instead of timing out.

Every tool reads a slightly different set, so both cases of the standard names are set, plus each
tool's own knob where it has one. Variables the user already set that would route around the gate
(another proxy, ``NO_PROXY=*``) are overwritten, never merged.
"""

from __future__ import annotations

import os
import shlex
import sys

from proxy.core.authority import join_authority

TYPE_CHECKING = False  # typing's constant without importing typing: see docs/startup.md
if TYPE_CHECKING:
    from collections.abc import Mapping

NO_PROXY = "localhost,127.0.0.1,::1"  # the sandbox's own loopback: reachable without the gate

# Where tools look for the CA file to trust: OpenSSL users (Go, Ruby, Python's ssl, uv, rustls with
# native roots) read SSL_CERT_FILE; the rest have their own names.
CA_BUNDLE_VARIABLES = (
    "SSL_CERT_FILE",
    "REQUESTS_CA_BUNDLE",  # requests (pip's vendored copy too), poetry, pdm
    "CURL_CA_BUNDLE",  # curl, and requests as a fallback
    "PIP_CERT",
    "NODE_EXTRA_CA_CERTS",  # node, npm, pnpm, yarn, bun (added to their built-in roots)
    "npm_config_cafile",  # npm and pnpm when a .npmrc sets its own cafile
    "YARN_CA_FILE_PATH",  # yarn >= 2
    "GIT_SSL_CAINFO",
    "CARGO_HTTP_CAINFO",
    "BUNDLE_SSL_CA_CERT",  # bundler
    "DENO_CERT",
    "COMPOSER_CAFILE",
    "HEX_CACERTS_PATH",  # mix / hex
    "AWS_CA_BUNDLE",
    "CLOUDSDK_CORE_CUSTOM_CA_CERTS_FILE",  # gcloud
    "HTTPLIB2_CA_CERTS",
    "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
    "NIX_SSL_CERT_FILE",
)

# Names a user may have set to route around the gate; all are replaced or removed.
_STANDARD = ("http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy", "rsync_proxy")


class ProxyAddress:
    """Where the sandbox reaches the gate, plus an optional per-sandbox credential. A plain value
    class: every `egress run` builds one, and a NamedTuple would import typing (docs/startup.md)."""

    __slots__ = ("host", "password", "port", "username")

    def __init__(
        self, host: str, port: int, username: str | None = None, password: str | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.username = username
        self.password = password

    def _fields(self) -> tuple[str, int, str | None, str | None]:
        return (self.host, self.port, self.username, self.password)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ProxyAddress):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        user = "" if self.username is None else f", username={self.username!r}, password=..."
        return f"ProxyAddress(host={self.host!r}, port={self.port!r}{user})"

    @property
    def hostport(self) -> str:
        return join_authority(self.host, self.port)

    @property
    def url(self) -> str:
        return f"http://{self._userinfo()}{self.hostport}"

    def _userinfo(self) -> str:
        if self.username is None:
            return ""
        from urllib.parse import quote  # imported when used: every `egress run` loads this module

        user = quote(self.username, safe="")
        if self.password is None:
            return f"{user}@"
        return f"{user}:{quote(self.password, safe='')}@"

    @classmethod
    def parse(cls, url: str) -> ProxyAddress:
        """``http://[user[:pass]@]host:port``; raises ValueError naming the problem."""
        from urllib.parse import unquote, urlsplit

        from proxy.core.hosts import parse_endpoint

        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http":
            raise ValueError(f"proxy URL {url!r}: only http:// proxies are supported")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError(f"proxy URL {url!r}: expected http://HOST:PORT with no path")
        hostport = parts.netloc.rpartition("@")[2]
        try:
            host, port = parse_endpoint(hostport)
        except ValueError as exc:
            raise ValueError(f"proxy URL {url!r}: {exc}") from None
        return cls(
            host=host,
            port=port,
            username=unquote(parts.username) if parts.username is not None else None,
            password=unquote(parts.password) if parts.password is not None else None,
        )


def connect_command() -> str:
    """The command line of ``egress connect`` as ssh's ProxyCommand can run it inside the sandbox.

    The sandbox shares the host's file system, so the same interpreter and package work there. The
    ``egress`` script next to the interpreter is preferred (what a user would type); otherwise the
    module is run with this interpreter.
    """
    script = os.path.join(os.path.dirname(sys.executable), "egress")
    if os.access(script, os.X_OK):
        return f"{shlex.quote(script)} connect"
    import shutil

    found = shutil.which("egress")
    if found:
        return f"{shlex.quote(found)} connect"
    return f"{shlex.quote(sys.executable)} -m proxy.sandbox.connect"


def proxy_environment(
    base: Mapping[str, str],
    proxy: ProxyAddress,
    *,
    sandbox_id: str | None = None,
    ca_bundle: str | None = None,
    connect: str | None = None,
) -> dict[str, str]:
    """``base`` with every proxy setting pointed at ``proxy``.

    ``ca_bundle`` is set for the tools that need to be told about an intercepting gate's CA.
    """
    env = {k: v for k, v in base.items() if k.lower() not in _STANDARD}
    url = proxy.url
    for name in ("http_proxy", "https_proxy", "all_proxy"):
        env[name] = url
        env[name.upper()] = url
    env["no_proxy"] = env["NO_PROXY"] = NO_PROXY
    env["WS_PROXY"] = env["WSS_PROXY"] = url  # websocket clients (undici, Bun)
    env["RSYNC_PROXY"] = proxy.hostport  # rsync daemon protocol over CONNECT

    # pip reads PIP_PROXY; it also honours HTTPS_PROXY, but a pip.conf proxy would win over that.
    env["PIP_PROXY"] = url
    # npm, pnpm and yarn 1 read npm_config_*; yarn >= 2 reads YARN_*; node >= 24 reads the
    # standard names only with NODE_USE_ENV_PROXY; global-agent users read GLOBAL_AGENT_*.
    env["npm_config_proxy"] = env["npm_config_https_proxy"] = url
    env["npm_config_noproxy"] = NO_PROXY
    env["YARN_HTTP_PROXY"] = env["YARN_HTTPS_PROXY"] = url
    env["NODE_USE_ENV_PROXY"] = "1"
    env["GLOBAL_AGENT_HTTP_PROXY"] = env["GLOBAL_AGENT_HTTPS_PROXY"] = url
    env["GLOBAL_AGENT_NO_PROXY"] = NO_PROXY
    # cargo reads CARGO_HTTP_PROXY (and http.proxy in its config, which this overrides).
    env["CARGO_HTTP_PROXY"] = url
    # go uses HTTPS_PROXY for the module proxy; GOPROXY/GOFLAGS stay as the user set them.
    # git uses http(s)_proxy for smart HTTP; ssh remotes need a ProxyCommand through CONNECT,
    # which the gate allows only where a rule lists port 22.
    command = connect or connect_command()
    env["GIT_SSH_COMMAND"] = f"ssh -o ProxyCommand={shlex.quote(command + ' %h %p')}"
    env["GIT_PROXY_COMMAND"] = command  # git:// (9418): git appends HOST PORT, as for ssh
    # JVM: system properties through JAVA_TOOL_OPTIONS (Maven, Gradle, sbt, plain java).
    java = (
        f"-Dhttp.proxyHost={proxy.host} -Dhttp.proxyPort={proxy.port} "
        f"-Dhttps.proxyHost={proxy.host} -Dhttps.proxyPort={proxy.port} "
        f"-Dhttp.nonProxyHosts=localhost|127.0.0.1|[::1] -Djava.net.useSystemProxies=false"
    )
    if proxy.username is not None:
        java += f" -Dhttp.proxyUser={proxy.username} -Dhttps.proxyUser={proxy.username}"
    previous = base.get("JAVA_TOOL_OPTIONS", "").strip()
    env["JAVA_TOOL_OPTIONS"] = f"{previous} {java}".strip()
    # gcloud / Google Cloud SDK.
    env["CLOUDSDK_PROXY_TYPE"] = "http"
    env["CLOUDSDK_PROXY_ADDRESS"] = proxy.host
    env["CLOUDSDK_PROXY_PORT"] = str(proxy.port)
    if proxy.username is not None:
        env["CLOUDSDK_PROXY_USERNAME"] = proxy.username
        env["CLOUDSDK_PROXY_PASSWORD"] = proxy.password or ""
    if ca_bundle:
        # The bundle holds the system's CAs too, so tools that replace their trust store with it
        # (rather than adding to it) keep trusting everything else. Java reads a truststore of its
        # own and is not covered (see docs/inspection.md).
        for name in CA_BUNDLE_VARIABLES:
            env[name] = ca_bundle
    if sandbox_id is not None:
        env["EGRESS_SANDBOX_ID"] = (
            sandbox_id  # informational only: identity comes from the listener
        )
    env["EGRESS_PROXY"] = url
    return env
