"""A command cannot make its own CA the gate's (threats 10 and 20).

``egress run --ca-cert C --ca-key K`` installs that pair as the gate's CA in its state directory,
where every later run and ``egress serve`` on that directory signs with it; ``--upstream-ca`` is
what the gate trusts for inspected upstreams. The private gate finishes its start after its command
has started: files read then, by paths the command can change (a linked directory it replaces, a
file it may write), would be the command's. They are read before the sandbox exists, once.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import clean_env
from tests.proxy.sandbox.conftest import REPO

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


def _ca(directory: Path, name: str) -> None:
    directory.mkdir()
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(directory / "ca.key"), "-out", str(directory / "ca.pem"),
         "-days", "30", "-subj", f"/CN={name}",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def _subjects(path: Path) -> str:
    """The subjects of every certificate in ``path``."""
    out = subprocess.run(
        ["openssl", "crl2pkcs7", "-nocrl", "-certfile", str(path)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return subprocess.run(
        ["openssl", "pkcs7", "-print_certs", "-noout"],
        input=out.stdout, check=True, capture_output=True, timeout=30,
    ).stdout.decode()  # fmt: skip


def _run(tmp_path: Path, policy: Path, *flags: str, steps: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy.app.cli", "run", "--quiet", "--policy", str(policy),
         "--state-dir", str(tmp_path / "state"), *flags, "--", "sh", "-c", steps],
        cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_a_command_cannot_install_its_own_ca_as_the_gates(
    write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    """`--ca-cert LINK/ca.pem --ca-key LINK/ca.key`: the command replaces LINK with a directory
    holding a pair of its own while its gate starts (it waits a second, so the gate does start)."""
    policy = write_policy("version: 1\nrules:\n  - {name: a, hosts: [a.test]}\n")
    _ca(tmp_path / "user", "user-ca")
    _ca(tmp_path / "evil", "command-ca")
    link = tmp_path / "cadir"
    link.symlink_to(tmp_path / "user")
    steps = (
        f"rm {link} && mkdir {link} && cp {tmp_path}/evil/ca.pem {tmp_path}/evil/ca.key {link}/ "
        '&& echo "swapped"; sleep 1'
    )
    result = _run(
        tmp_path, policy, "--ca-cert", str(link / "ca.pem"), "--ca-key", str(link / "ca.key"),
        steps=steps,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "swapped" in result.stdout  # the command did replace them: the gate had read them first
    installed = _subjects(tmp_path / "state" / "mitmproxy" / "mitmproxy-ca-cert.pem")
    assert "user-ca" in installed and "command-ca" not in installed


def test_a_command_cannot_add_its_own_ca_to_what_the_gate_trusts_upstream(
    write_policy: Callable[[str], Path], tmp_path: Path
) -> None:
    """`--upstream-ca FILE`, a file the command may write: it writes its own CA there while its
    gate starts; the gate's upstream trust holds the one given."""
    policy = write_policy("version: 1\nrules:\n  - {name: a, hosts: [a.test], inspect: true}\n")
    _ca(tmp_path / "corp", "corp-ca")
    _ca(tmp_path / "evil", "command-ca")
    upstream = tmp_path / "upstream.pem"
    upstream.write_bytes((tmp_path / "corp" / "ca.pem").read_bytes())
    steps = f'cp {tmp_path}/evil/ca.pem {upstream} && echo "rewritten"; sleep 1'
    result = _run(tmp_path, policy, "--upstream-ca", str(upstream), steps=steps)
    assert result.returncode == 0, result.stderr
    assert "rewritten" in result.stdout
    trusted = _subjects(tmp_path / "state" / "mitmproxy" / "upstream-trust.pem")
    assert "corp-ca" in trusted and "command-ca" not in trusted
