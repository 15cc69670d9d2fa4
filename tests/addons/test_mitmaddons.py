"""mitmproxy's addon modules load without the package's default set, and the package stays whole for
anything else in the process. Each case runs in a fresh interpreter: the stand-in is put in place
only where ``mitmproxy.addons`` was not imported before."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# What mitmproxy's package __init__ alone imports (the onboarding app, flow filters, HAR export,
# playback): none of them may load for the gate's layers.
DEFAULT_SET_ONLY = (
    "flask",
    "mitmproxy.addons.onboarding",
    "mitmproxy.addons.blocklist",
    "mitmproxy.addons.savehar",
    "mitmproxy.addons.clientplayback",
    "mitmproxy.addons.serverplayback",
)


def _run(code: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/"
    )
    assert proc.returncode == 0, proc.stderr
    out: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


_REPO = str(__import__("pathlib").Path(__file__).resolve().parents[2])


def test_the_gates_layers_load_without_the_default_set() -> None:
    got = _run(
        f"import sys, json; sys.path.insert(0, {_REPO!r})\n"
        "import addons.mitm\n"
        "from addons.layers import GateLayers\n"
        "from mitmproxy.addons.next_layer import NextLayer\n"
        f"loaded = [m for m in {DEFAULT_SET_ONLY!r} if m in sys.modules]\n"
        "print(json.dumps({'loaded': loaded, 'subclass': issubclass(GateLayers, NextLayer),\n"
        "  'stand_in': type(sys.modules['mitmproxy.addons']).__name__}))\n"
    )
    assert got == {"loaded": [], "subclass": True, "stand_in": "_Package"}


@pytest.mark.parametrize("ask", ["from-import", "attribute"])
def test_the_package_is_whole_for_anything_that_asks_for_more(ask: str) -> None:
    """``default_addons`` (defined by the package's __init__) is there on first use, whichever way
    it is asked for, and gives what it gives in a process that never had the stand-in."""
    reference = _run(
        "import json\n"
        "from mitmproxy.addons import default_addons\n"
        "print(json.dumps({'addons': [type(a).__name__ for a in default_addons()]}))\n"
    )
    get = (
        "from mitmproxy.addons import default_addons"
        if ask == "from-import"
        else "import mitmproxy.addons\ndefault_addons = mitmproxy.addons.default_addons"
    )
    got = _run(
        f"import sys, json; sys.path.insert(0, {_REPO!r})\n"
        "import addons.mitm\n"
        f"{get}\n"
        "from mitmproxy.addons import onboarding, anticache\n"
        "print(json.dumps({'addons': [type(a).__name__ for a in default_addons()]}))\n"
    )
    assert got == reference
    assert len(reference["addons"]) > 20  # type: ignore[arg-type]


def test_an_imported_package_is_left_as_it_is() -> None:
    got = _run(
        f"import sys, json; sys.path.insert(0, {_REPO!r})\n"
        "import mitmproxy.addons\n"
        "before = sys.modules['mitmproxy.addons']\n"
        "import addons.mitm\n"
        "print(json.dumps({'same': sys.modules['mitmproxy.addons'] is before,\n"
        "  'stand_in': type(before).__name__}))\n"
    )
    assert got == {"same": True, "stand_in": "module"}


def test_a_name_the_package_does_not_have_is_an_attribute_error() -> None:
    got = _run(
        f"import sys, json; sys.path.insert(0, {_REPO!r})\n"
        "import addons.mitm, mitmproxy.addons\n"
        "try:\n"
        "    mitmproxy.addons.no_such_name\n"
        "except AttributeError as exc:\n"
        "    print(json.dumps({'error': str(exc)}))\n"
    )
    assert got == {"error": "module 'mitmproxy.addons' has no attribute 'no_such_name'"}
