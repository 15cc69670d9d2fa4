"""The inspection CA: created once with a private key only its owner reads, or supplied and checked;
``egress ca path|export|init``; the trust bundle the sandbox gets."""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy.app.ca import CaError, CaFiles, ensure_ca, system_bundle, write_bundle

EGRESS = shutil.which("egress", path=str(Path(sys.executable).parent)) or "egress"


def make_ca(
    directory: Path, *, ca: bool = True, days: int = 30, name: str = "supplied"
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=2))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_created_once_key_owner_only(tmp_path: Path) -> None:
    confdir = tmp_path / "state" / "mitmproxy"
    files = ensure_ca(confdir)
    assert files.exists()
    assert files.combined.stat().st_mode & 0o777 == 0o600
    assert not list(confdir.glob("*.p12"))  # no extra copies of the key
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    assert "agent-egress" in cert.subject.rfc4514_string()
    assert b"PRIVATE KEY" not in files.cert.read_bytes()
    first = files.combined.read_bytes()
    assert ensure_ca(confdir).combined.read_bytes() == first  # not recreated


def test_mitmproxy_loads_what_was_created(tmp_path: Path) -> None:
    from mitmproxy.certs import CertStore

    files = ensure_ca(tmp_path / "conf")
    store = CertStore.from_store(files.confdir, "mitmproxy", 2048)
    assert store.default_ca.cn == "agent-egress inspection CA"


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    files = ensure_ca(tmp_path / "conf")
    os.chmod(files.combined, 0o644)
    with pytest.raises(CaError, match="readable by others"):
        ensure_ca(files.confdir)


def test_a_supplied_ca_is_checked_and_installed(tmp_path: Path) -> None:
    from mitmproxy.certs import CertStore

    cert, key = make_ca(tmp_path / "in")
    files = ensure_ca(tmp_path / "conf", str(cert), str(key))
    assert files.combined.stat().st_mode & 0o777 == 0o600
    assert files.cert.read_bytes() == cert.read_bytes()
    assert CertStore.from_store(files.confdir, "mitmproxy", 2048).default_ca.cn == "supplied CA"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ca": False}, "is not a CA certificate"),
        ({"days": -1}, "expired"),
    ],
)
def test_a_supplied_ca_that_cannot_issue_is_refused(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    cert, key = make_ca(tmp_path / "in", **kwargs)  # type: ignore[arg-type]
    with pytest.raises(CaError, match=message):
        ensure_ca(tmp_path / "conf", str(cert), str(key))
    assert not CaFiles(tmp_path / "conf").exists()


def test_a_key_of_another_certificate_is_refused(tmp_path: Path) -> None:
    cert, _ = make_ca(tmp_path / "a", name="a")
    _, other_key = make_ca(tmp_path / "b", name="b")
    with pytest.raises(CaError, match="is not the key of the certificate"):
        ensure_ca(tmp_path / "conf", str(cert), str(other_key))
    with pytest.raises(CaError, match="go together"):
        ensure_ca(tmp_path / "conf", str(cert), None)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    with pytest.raises(CaError, match="not a PEM certificate"):
        ensure_ca(tmp_path / "conf", str(garbage), str(other_key))


def test_the_bundle_holds_the_system_cas_and_the_gates(tmp_path: Path) -> None:
    files = ensure_ca(tmp_path / "conf")
    bundle = write_bundle(tmp_path, files.cert)
    text = bundle.read_text()
    assert files.cert.read_text().strip() in text
    assert "PRIVATE KEY" not in text
    system = system_bundle()
    if system is not None:
        assert text.count("BEGIN CERTIFICATE") > 1
    assert bundle.stat().st_mode & 0o777 == 0o644


def egress(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "EGRESS_STATE_DIR"}
    return subprocess.run(
        [EGRESS, *args, "--state-dir", str(state)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def test_egress_ca_commands(tmp_path: Path) -> None:
    state = tmp_path / "state"
    missing = egress("ca", "path", state=state)
    assert missing.returncode != 0 and "egress ca init" in missing.stderr
    init = egress("ca", "init", state=state)
    assert init.returncode == 0, init.stderr
    path = Path(init.stdout.strip())
    assert path == state / "mitmproxy" / "mitmproxy-ca-cert.pem" and "created" in init.stderr
    assert egress("ca", "path", state=state).stdout.strip() == str(path)
    exported = egress("ca", "export", state=state).stdout
    assert exported == path.read_text() and "PRIVATE KEY" not in exported
    again = egress("ca", "init", state=state)
    assert "exists" in again.stderr
    cert, key = make_ca(tmp_path / "in")
    installed = egress("ca", "init", "--ca-cert", str(cert), "--ca-key", str(key), state=state)
    assert installed.returncode == 0 and "installed" in installed.stderr
    assert path.read_bytes() == cert.read_bytes()


def test_an_extra_upstream_ca_adds_to_the_system_store(tmp_path: Path) -> None:
    from proxy.app.ca import upstream_trust

    cert, _ = make_ca(tmp_path / "in")
    system = system_bundle()
    assert upstream_trust(tmp_path, None) == (str(system) if system else None)
    combined = Path(str(upstream_trust(tmp_path, str(cert))))
    text = combined.read_text()
    assert cert.read_text().strip() in text
    if system is not None:
        assert system.read_text().strip()[:200] in text  # not instead of the system's CAs
    with pytest.raises(CaError, match="--upstream-ca"):
        upstream_trust(tmp_path, str(tmp_path / "missing.pem"))


def test_the_sandbox_trusts_the_gate_only_when_it_inspects_and_never_sees_the_key(
    tmp_path: Path,
) -> None:
    from proxy.app.ca import Inspection
    from proxy.app.private_gate import sandbox_trust
    from proxy.policy.loader import load_policy

    def policy(text: str) -> object:
        path = tmp_path / "p.yaml"
        path.write_text("version: 1\nrules:\n  - name: r\n    hosts: [a.test]\n" + text)
        return load_policy(path)

    state = tmp_path / "state"
    setup = sandbox_trust(Inspection(state_dir=str(state)))
    inspecting = setup(policy("    methods: [GET]\n"))  # type: ignore[arg-type]
    assert inspecting is not None and inspecting.bundle is not None
    assert str(state.absolute()) in inspecting.hidden
    bundle = Path(inspecting.bundle).read_text()
    assert (state / "mitmproxy" / "mitmproxy-ca-cert.pem").read_text().strip() in bundle
    assert "PRIVATE KEY" not in bundle
    inspecting.cleanup()
    assert not Path(inspecting.bundle).exists()
    plain = setup(policy(""))  # type: ignore[arg-type]
    assert plain is not None and plain.bundle is None and str(state.absolute()) in plain.hidden
    # joining a gate elsewhere: its certificate only, and a supplied key is hidden too
    cert, key = make_ca(tmp_path / "in")
    joined = sandbox_trust(Inspection(state_dir=str(state), ca_cert=str(cert)))(None)
    assert joined is not None and joined.bundle is not None
    assert cert.read_text().strip() in Path(joined.bundle).read_text()
    joined.cleanup()
    private = sandbox_trust(Inspection(state_dir=str(state), ca_cert=str(cert), ca_key=str(key)))
    supplied = private(policy("    methods: [GET]\n"))  # type: ignore[arg-type]
    assert supplied is not None and str(key) in supplied.hidden
    supplied.cleanup()
    with pytest.raises(ValueError, match="go together"):
        sandbox_trust(Inspection(state_dir=str(state), ca_cert=str(cert)))(policy(""))  # type: ignore[arg-type]
