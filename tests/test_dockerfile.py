"""No Docker engine runs here, so the Dockerfile is checked against the code instead: if a port default,
the console script, a copied path or the CLI flags change, this fails rather than the image rotting."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from proxy.app import cli
from proxy.evidence import flags as evidence_args

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


def test_base_image_is_slim_python_312_or_newer() -> None:
    image = _one("FROM")
    match = re.fullmatch(r"python:3\.(\d+)-slim(?:-\w+)?", image)
    assert match, image
    assert int(match.group(1)) >= 12


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
    assert int(args.metrics.rsplit(":", 1)[1]) == int(
        evidence_args.DEFAULT_METRICS.rsplit(":", 1)[1]
    )


def test_exposed_ports_match_the_code_defaults() -> None:
    exposed = {int(p.split("/")[0]) for p in _one("EXPOSE").split()}
    assert exposed == {
        int(cli.DEFAULT_LISTEN.rsplit(":", 1)[1]),
        int(evidence_args.DEFAULT_METRICS.rsplit(":", 1)[1]),
    }


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
    env = _one("ENV")
    match = re.search(r"EGRESS_PRESETS_DIR=(\S+)", env)
    assert match, "EGRESS_PRESETS_DIR must point at the copied allowlists"
    workdir = _one("WORKDIR")
    assert match.group(1) == f"{workdir}/allowlists"
    from proxy.policy import presets

    assert "EGRESS_PRESETS_DIR" in Path(presets.__file__).read_text()


def test_runs_as_non_root_with_a_healthcheck_on_the_proxy_port() -> None:
    user = _one("USER")
    assert user not in ("root", "0")
    health = _one("HEALTHCHECK")
    port = cli.DEFAULT_LISTEN.rsplit(":", 1)[1]
    assert "CMD" in health and port in health


@pytest.mark.parametrize("path", [".dockerignore"])
def test_dockerignore_keeps_the_venv_out(path: str) -> None:
    assert ".venv" in (ROOT / path).read_text().split()
