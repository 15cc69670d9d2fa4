"""A process's command line as evidence: bounded, and scrubbed of what looks like a secret.

Agents pass tokens on command lines (``curl -H "Authorization: Bearer ..."``, ``git clone
https://user:token@host/...``, ``--password=...``); the decision record must not become the place
they leak from (threat 18). Scrubbing is by shape, so it errs towards hiding: known token prefixes,
values of secret-named options and ``key=value`` pairs, URL userinfo, authorization headers, and long
high-entropy strings. Git object names (40 or 64 hex digits) stay: their entropy is below the bar.
"""

from __future__ import annotations

import functools
import math
import re
from collections import Counter
from collections.abc import Sequence

MAX_ARGS = 32
MAX_ARG_LENGTH = 256
SCRUBBED = "***"

_SECRET_NAME = (
    r"(?:pass(?:word|wd)?|pwd|secret|token|api[-_]?key|apikey|access[-_]?key|auth|authorization"
    r"|credentials?|private[-_]?key|client[-_]?secret|session|cookie)"
)
# Pattern sources, compiled once on first use (_rx): every gate start imports this module, and
# compiling them all costs ~5 ms that a run with no connection never needs.
_KNOWN_PREFIX = (
    r"(?:gh[pousr]_|github_pat_|glpat-|xox[abprs]-|sk-|sk_live_|rk_live_|AKIA|ASIA|AIza|npm_|pypi-"
    r"|hf_|eyJ)[A-Za-z0-9_\-.=]{8,}"
)
_KEY_VALUE = rf"(?i)([A-Za-z0-9_.\-]*{_SECRET_NAME}[A-Za-z0-9_.\-]*\s*[=:]\s*)(\S+)"
_OPTION = rf"(?i)^--?[A-Za-z0-9_\-]*{_SECRET_NAME}[A-Za-z0-9_\-]*$"
_USERINFO = r"(?i)\b([a-z][a-z0-9+.\-]*://)[^/@\s]+@"
_HEADER = r"(?i)^((?:proxy-)?authorization|cookie|x-api-key|private-token)\s*:.*$"
_WORD = r"[A-Za-z0-9+/_\-=.]{32,}"


@functools.cache
def _rx(source: str) -> re.Pattern[str]:
    return re.compile(source)


def warm() -> None:
    """Compile every pattern now (~2 ms): a gate that looks up processes does it as it starts
    serving, while its command starts, instead of in its first connection's lookup."""
    for source in (_OPTION, _HEADER, _USERINFO, _KNOWN_PREFIX, _KEY_VALUE, _WORD):
        _rx(source)


def scrub_argv(argv: Sequence[str]) -> tuple[str, ...]:
    """At most MAX_ARGS arguments of at most MAX_ARG_LENGTH characters, secrets replaced by ``***``.
    A cut argument ends in ``...``; dropped arguments are counted in a last ``...(+N)``."""
    out: list[str] = []
    secret_next = False
    for arg in argv[:MAX_ARGS]:
        if secret_next:
            out.append(SCRUBBED)
            secret_next = False
            continue
        if _rx(_OPTION).match(arg):
            secret_next = True
            out.append(arg)
            continue
        out.append(_bounded(scrub_text(arg)))
    if len(argv) > MAX_ARGS:
        out.append(f"...(+{len(argv) - MAX_ARGS})")
    return tuple(out)


def scrub_text(text: str) -> str:
    """One argument with anything secret-looking replaced."""
    if _rx(_HEADER).match(text):
        return _rx(_HEADER).sub(lambda m: f"{m.group(1)}: {SCRUBBED}", text)
    text = _rx(_USERINFO).sub(lambda m: f"{m.group(1)}{SCRUBBED}@", text)
    text = _rx(_KNOWN_PREFIX).sub(SCRUBBED, text)
    text = _rx(_KEY_VALUE).sub(lambda m: m.group(1) + SCRUBBED, text)
    return _rx(_WORD).sub(lambda m: SCRUBBED if _looks_random(m.group(0)) else m.group(0), text)


def _looks_random(word: str) -> bool:
    """Long, mixed letters and digits, and more than 4 bits of entropy per character: a key, not a
    word, a path or a hex digest (at most 4 bits)."""
    if not (any(c.isdigit() for c in word) and any(c.isalpha() for c in word)):
        return False
    counts = Counter(word)
    n = len(word)
    entropy = -sum(c / n * math.log2(c / n) for c in counts.values())
    return entropy > 4.0


def _bounded(arg: str) -> str:
    return arg if len(arg) <= MAX_ARG_LENGTH else arg[: MAX_ARG_LENGTH - 3] + "..."
