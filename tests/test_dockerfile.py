"""No Docker engine runs here, so the Dockerfile is checked by hadolint and checkov and against the code:
if a port default, the console script, a copied path, the state directory or the CLI flags change, this
fails rather than the image rotting. tests/test_image_start.py starts the gate the way the image runs it
(its user, a read-only root, a writable state directory only)."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from proxy.app import cli, statedir
from proxy.evidence import flags as evidence_args
from tests import validators

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _one(keyword: str) -> str:
    found = [rest for kw, rest in _instructions() if kw == keyword]
    assert len(found) == 1, f"expected exactly one {keyword} in the Dockerfile, found {len(found)}"
    return found[0]


def _env() -> dict[str, str]:
    return dict(re.findall(r"(\w+)=(\S+)", _one("ENV")))


def test_hadolint_is_clean() -> None:
    proc = validators.run("hadolint", "Dockerfile")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_checkov_is_clean() -> None:
    reports = validators.checkov("-f", "Dockerfile", "--framework", "dockerfile")
    failed, skipped = validators.checkov_findings(reports)
    assert failed == [] and skipped == {}
    assert reports[0]["summary"]["passed"] > 20


def test_base_image_is_slim_python_312_or_newer_pinned_by_digest() -> None:
    image = _one("FROM")
    match = re.fullmatch(r"python:3\.(\d+)\.\d+-slim-\w+@sha256:[0-9a-f]{64}", image)
    assert match, f"pin the base image by version and digest: {image}"
    assert int(match.group(1)) >= 12


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    """A source edit must not re-run the dependency install: the first COPY brings only the pins."""
    steps = _instructions()
    copies = [i for i, (kw, _) in enumerate(steps) if kw == "COPY"]
    first = shlex.split(steps[copies[0]][1])[:-1]
    assert set(first) == {"pyproject.toml", "constraints.txt"}
    install = next(i for i, (kw, rest) in enumerate(steps) if kw == "RUN" and "pip install" in rest)
    assert copies[0] < install < copies[1]
    assert "-c constraints.txt" in steps[install][1]
    source = next(i for i, (kw, rest) in enumerate(steps) if kw == "COPY" and "proxy" in rest)
    assert install < source


def test_entrypoint_is_the_console_script_serve() -> None:
    entrypoint = json.loads(_one("ENTRYPOINT"))
    assert entrypoint == ["egress", "serve"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["egress"] == "proxy.app.cli:main"


def test_cmd_arguments_parse_with_the_real_cli() -> None:
    args = cli.build_parser().parse_args(["serve", *json.loads(_one("CMD"))])
    assert args.command == "serve"
    host, port = args.listen.rsplit(":", 1)
    assert host == "0.0.0.0"  # reachable from other containers on the sandbox network
    assert int(port) == int(cli.DEFAULT_LISTEN.rsplit(":", 1)[1])
    metrics_host, metrics_port = args.metrics.rsplit(":", 1)
    assert metrics_host == "127.0.0.1", "metrics must not listen everywhere by default"
    assert int(metrics_port) == int(evidence_args.DEFAULT_METRICS.rsplit(":", 1)[1])
    assert Path(args.journal).parent == Path(_env()[statedir.ENV_VAR])


def test_the_default_command_denies_rather_than_forwards_unrecorded() -> None:
    """A full or lost state volume must not turn the journal off while traffic still flows."""
    args = cli.build_parser().parse_args(["serve", *json.loads(_one("CMD"))])
    assert args.journal is not None
    assert args.audit_required, "the image's default command must pass --audit-required"


def test_state_dir_is_a_volume_the_user_owns_and_home_is_writable() -> None:
    env = _env()
    state = env[statedir.ENV_VAR]
    assert json.loads(_one("VOLUME")) == [state]
    assert env["HOME"] == state  # nothing the gate writes lands on the read-only root
    uid = _one("USER").split(":")[0]
    run = " ".join(rest for kw, rest in _instructions() if kw == "RUN")
    assert f"install -d -o {uid} -g {uid} -m 0700 {state}" in run
    assert f"--uid {uid}" in run


def test_exposed_ports_are_the_ones_served_beyond_loopback() -> None:
    exposed = {int(p.split("/")[0]) for p in _one("EXPOSE").split()}
    assert exposed == {int(cli.DEFAULT_LISTEN.rsplit(":", 1)[1])}


def test_every_copied_path_exists_and_every_package_is_copied() -> None:
    copied: set[str] = set()
    for keyword, rest in _instructions():
        if keyword != "COPY":
            continue
        parts = shlex.split(rest)
        for source in parts[:-1]:
            assert (ROOT / source).exists(), f"Dockerfile copies missing path {source}"
            copied.add(source.rstrip("/"))
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    for pattern in packages["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied, f"package {pattern} is not copied into the image"
    assert "allowlists" in copied, "the presets (allowlists/) must ship in the image"


def test_presets_dir_in_image_is_where_the_code_looks() -> None:
    env = _env()
    workdir = _one("WORKDIR")
    assert env["EGRESS_PRESETS_DIR"] == f"{workdir}/allowlists"
    from proxy.policy import presets

    assert "EGRESS_PRESETS_DIR" in Path(presets.__file__).read_text()


def test_runs_as_non_root_with_a_healthcheck_on_the_proxy_port() -> None:
    user = _one("USER")
    assert user.split(":")[0] not in ("root", "0")
    assert int(user.split(":")[0]) > 0
    health = _one("HEALTHCHECK")
    port = cli.DEFAULT_LISTEN.rsplit(":", 1)[1]
    assert "CMD" in health and port in health


@pytest.mark.parametrize("entry", [".venv", ".venv-tools", "tests"])
def test_dockerignore_keeps_the_build_context_small(entry: str) -> None:
    assert entry in (ROOT / ".dockerignore").read_text().split()


def test_the_ca_directory_the_deploy_guide_creates_stays_out_of_the_build_context() -> None:
    """deploy/README.md has `egress ca init --state-dir ./egress-ca` run in the checkout: its key must
    never be sent to a builder, whatever the Dockerfile copies, nor be committed."""
    guide = (ROOT / "deploy" / "README.md").read_text()
    created = re.findall(r"egress ca init --state-dir \./(\S+)", guide)
    assert created, "the deploy guide no longer creates a CA in the checkout: update this test"
    ignored = (ROOT / ".dockerignore").read_text().split()
    not_committed = (ROOT / ".gitignore").read_text().split()
    for directory in created:
        assert directory.rstrip("/") in ignored
        assert f"/{directory.strip('/')}/" in not_committed
