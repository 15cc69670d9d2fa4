"""The inspection CA: the authority the gate issues certificates from for hosts whose requests it reads.

It lives in mitmproxy's confdir inside the gate's state directory (``mitmproxy-ca.pem`` holds key and
certificate, mode 0600; ``mitmproxy-ca-cert.pem`` the certificate alone). It is created once, by
mitmproxy's own certificate store code, or supplied (``--ca-cert``/``--ca-key``, e.g. from a Kubernetes
Secret, so every replica issues from the same CA); a supplied pair is checked (a CA certificate, the key
that matches it, not expired) and installed into the confdir on every start, replacing what was there.

Only the certificate ever leaves the gate: ``egress ca export`` prints it, ``egress run`` puts it into
the sandbox's trust bundle and hides the state directory (and a supplied key) from the sandbox.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where used (datetime, tempfile too): `egress run` loads this module
    from cryptography import x509

BASENAME = "mitmproxy"  # mitmproxy's CONF_BASENAME: the names its TLS layer loads
KEY_SIZE = 2048
ORGANIZATION = "agent-egress"
COMMON_NAME = "agent-egress inspection CA"


class CaError(Exception):
    """The CA cannot be created, read or installed; the message names the file."""


@dataclass(frozen=True)
class CaFiles:
    confdir: Path

    @property
    def combined(self) -> Path:
        """Key and certificate (mitmproxy loads this one): never readable by anyone else."""
        return self.confdir / f"{BASENAME}-ca.pem"

    @property
    def cert(self) -> Path:
        return self.confdir / f"{BASENAME}-ca-cert.pem"

    def exists(self) -> bool:
        return self.combined.is_file() and self.cert.is_file()


def ensure_ca(confdir: Path, ca_cert: str | None = None, ca_key: str | None = None) -> CaFiles:
    """The CA in ``confdir``: the supplied pair installed, or the existing one, or a new one."""
    files = CaFiles(confdir)
    if (ca_cert is None) != (ca_key is None):
        raise CaError("--ca-cert and --ca-key go together")
    if ca_cert is not None and ca_key is not None:
        install(files, Path(ca_cert), Path(ca_key))
    elif not files.exists():
        create(files)
    else:
        _check_private(files.combined)
    return files


def create(files: CaFiles) -> None:
    from mitmproxy.certs import CertStore

    try:
        files.confdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        CertStore.create_store(
            files.confdir, BASENAME, KEY_SIZE, organization=ORGANIZATION, cn=COMMON_NAME
        )
        for path in files.confdir.glob(f"{BASENAME}-ca*.p12"):
            path.unlink()  # copies of the key (and cert) for Windows and Android: not needed here
        os.chmod(files.combined, 0o600)
    except OSError as exc:
        raise CaError(f"cannot create the CA in {files.confdir}: {exc.strerror or exc}") from None


def install(files: CaFiles, cert_path: Path, key_path: Path) -> None:
    """Check a supplied CA and write it where mitmproxy loads it (atomically, 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

    try:
        cert_pem = cert_path.read_bytes()
        key_pem = key_path.read_bytes()
    except OSError as exc:
        raise CaError(f"cannot read {exc.filename}: {exc.strerror}") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise CaError(f"{cert_path}: not a PEM certificate") from None
    try:
        key: PrivateKeyTypes = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise CaError(f"{key_path}: not an unencrypted PEM private key") from None
    _check_ca(cert, cert_path)
    if key.public_key().public_bytes(  # type: ignore[union-attr]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise CaError(f"{key_path} is not the key of the certificate in {cert_path}")
    key_out = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    cert_out = cert.public_bytes(serialization.Encoding.PEM)
    try:
        files.confdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write(files.combined, key_out + cert_out, 0o600)
        _write(files.cert, cert_out, 0o644)
    except OSError as exc:
        raise CaError(f"cannot install the CA in {files.confdir}: {exc.strerror or exc}") from None


def _check_ca(cert: x509.Certificate, where: Path) -> None:
    import datetime

    from cryptography import x509

    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise CaError(f"{where} is not a CA certificate (basicConstraints CA:TRUE is missing)")
    now = datetime.datetime.now(datetime.UTC)
    if cert.not_valid_after_utc <= now:
        raise CaError(f"{where} expired on {cert.not_valid_after_utc:%Y-%m-%d}")


def _write(path: Path, data: bytes, mode: int) -> None:
    from proxy.runtime.scratch import create_exclusive

    fd, tmp = create_exclusive(path.parent, f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _check_private(path: Path) -> None:
    """An existing key readable by others is refused rather than used."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CaError(
            f"{path} holds the CA key but is readable by others (mode {mode:o}); "
            f"chmod 600 it, or remove it to create a new CA"
        )


# -- trust ------------------------------------------------------------------------------------------

SYSTEM_BUNDLES = (
    "/etc/ssl/certs/ca-certificates.crt",  # Debian, Ubuntu, Alpine, Arch
    "/etc/pki/tls/certs/ca-bundle.crt",  # Fedora, RHEL
    "/etc/ssl/ca-bundle.pem",  # openSUSE
    "/etc/ssl/cert.pem",  # macOS, BSDs
)


def system_bundle() -> Path | None:
    """The system's CA bundle: what clients trust when nobody points them elsewhere."""
    import ssl

    paths = ssl.get_default_verify_paths()
    for candidate in (paths.cafile, paths.openssl_cafile, *SYSTEM_BUNDLES):
        if candidate and os.path.isfile(candidate):
            return Path(candidate)
    try:
        import certifi

        return Path(certifi.where())
    except ImportError:  # pragma: no cover - certifi ships with mitmproxy
        return None


def write_bundle(directory: Path, gate_cert: Path, extra: Path | None = None) -> Path:
    """A PEM bundle: the system's CAs and the gate's CA (and ``extra``), for clients inside the
    sandbox that replace rather than extend their trust store when told about a CA file."""
    from proxy.sandbox.trust import BUNDLE_NAME, pem_bundle

    bundle = directory / BUNDLE_NAME
    bundle.write_bytes(pem_bundle(p for p in (system_bundle(), gate_cert, extra) if p is not None))
    bundle.chmod(0o644)
    return bundle


UPSTREAM_TRUST = "upstream-trust.pem"


def upstream_trust(directory: Path, extra: str | None, *, written: bool = False) -> str | None:
    """What the gate verifies inspected upstreams against: the system's CAs, plus ``extra``.

    mitmproxy loads a configured file *instead of* its default store, so an extra bundle is
    combined with the system's into ``directory/upstream-trust.pem``; ``written``: an earlier call
    has done so (``egress run``, before its sandbox existed), and ``extra`` is not read again."""
    system = system_bundle()
    if extra is None:
        return str(system) if system is not None else None
    if written:
        return str(directory / UPSTREAM_TRUST)
    parts = [system.read_bytes()] if system is not None else []
    try:
        parts.append(Path(extra).read_bytes())
        combined = directory / UPSTREAM_TRUST
        _write(combined, b"\n".join(p.rstrip(b"\n") + b"\n" for p in parts), 0o644)
    except OSError as exc:
        raise CaError(f"--upstream-ca {extra}: {exc.strerror or exc}") from None
    return str(combined)


# -- the gate's options -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inspection:
    """The command-line options about state and inspection that serve and run share."""

    state_dir: str | None = None
    ca_cert: str | None = None
    ca_key: str | None = None
    upstream_ca: str | None = None
    query_values: bool = False

    @classmethod
    def from_args(cls, args: object) -> Inspection:
        return cls(
            state_dir=getattr(args, "state_dir", None),
            ca_cert=getattr(args, "ca_cert", None),
            ca_key=getattr(args, "ca_key", None),
            upstream_ca=getattr(args, "upstream_ca", None),
            query_values=bool(getattr(args, "record_query_values", False)),
        )

    def check(self, *, issuing: bool = True) -> None:
        """Files named on the command line must exist before anything starts. A gate that issues
        certificates needs the key with a supplied certificate; a sandbox joining a gate elsewhere
        only trusts that gate's certificate (``issuing=False``)."""
        for flag, value in (
            ("--ca-cert", self.ca_cert),
            ("--ca-key", self.ca_key),
            ("--upstream-ca", self.upstream_ca),
        ):
            if value is not None and not os.path.isfile(value):
                raise CaError(f"{flag} {value}: no such file")
        if issuing and (self.ca_cert is None) != (self.ca_key is None):
            raise CaError("--ca-cert and --ca-key go together")


__all__ = [
    "CaError",
    "CaFiles",
    "Inspection",
    "ensure_ca",
    "system_bundle",
    "upstream_trust",
    "write_bundle",
]
