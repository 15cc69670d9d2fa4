"""mitmproxy's addon modules the gate uses, without the package's default set.

``mitmproxy/addons/__init__.py`` imports every addon ``mitmdump`` loads (its ``default_addons()``):
the onboarding app (Flask), flow filters, HAR export, playback and some thirty more. The gate uses
four of them (the proxy server, TLS config, the error check and the layer decider it extends), and
running the package's ``__init__`` cost a gate's mitmproxy start about 140 ms of its ~450 (measured
standalone: ``tests/addons/test_mitmaddons.py`` names the modules it must not load) and 16 MB of
resident memory: every ``egress serve`` start, every worker, and every private gate's first
inspected connection (the default allowlist reads GitHub's requests) paid it.

So when the package is not imported yet, importing this module (which the adapters that import
mitmproxy's layers do first: ``addons.mitm``, ``addons.layers``) puts a stand-in for it in ``sys.modules``: a
package with the same path, whose submodules import as they always do. The package's own
``__init__`` runs in the stand-in the first time anything asks it for a name that is not a submodule
(``default_addons``, say), so every other user of ``mitmproxy.addons`` in the process sees the whole
package. mitmproxy is pinned below 13 (``pyproject.toml``, ``constraints.txt``); the tests load the
gate's layers through the stand-in and fail if a submodule the gate uses starts to need the
package's ``__init__``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

PACKAGE = "mitmproxy.addons"
_lock = threading.RLock()


class _Package(types.ModuleType):
    """``mitmproxy.addons`` with its ``__init__`` run on first need."""

    _initialised = False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if importlib.util.find_spec(f"{PACKAGE}.{name}") is not None:
            return importlib.import_module(f"{PACKAGE}.{name}")
        self._initialise()
        try:
            return self.__dict__[name]
        except KeyError:
            raise AttributeError(f"module {PACKAGE!r} has no attribute {name!r}") from None

    def _initialise(self) -> None:
        with _lock:
            if self._initialised:
                return
            self._initialised = True  # once, even if it fails part-way (the error propagates)
            loader = self.__spec__.loader if self.__spec__ is not None else None
            get_code = getattr(loader, "get_code", None)  # (a source or bytecode file's loader)
            if get_code is None:
                raise ImportError(f"cannot run {PACKAGE}'s __init__: no loader gives its code")
            exec(get_code(PACKAGE), self.__dict__)


def install() -> None:
    """Put the stand-in for ``mitmproxy.addons`` in place unless the package is imported already."""
    if PACKAGE in sys.modules:
        return
    with _lock:
        if PACKAGE in sys.modules:
            return
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or spec.submodule_search_locations is None:
            return  # no such package: the imports that need it fail as they would have
        package = _Package(PACKAGE)
        package.__spec__ = spec
        package.__path__ = list(spec.submodule_search_locations)
        package.__package__ = PACKAGE
        package.__file__ = spec.origin
        package.__loader__ = spec.loader
        sys.modules[PACKAGE] = package
        parent, _, child = PACKAGE.rpartition(".")
        setattr(sys.modules[parent], child, package)  # as an import binds a submodule


install()
