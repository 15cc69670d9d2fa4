"""Canonical request targets: what is decoded, what is ambiguous, what is unreadable; and path globs.

The properties at the end are the point: however a client spells a path that a server could read as
leaving ``/myorg/``, a rule for ``/myorg/**`` never matches it; and equivalent spellings of one path
decide alike.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.paths import (
    MAX_PATH,
    MAX_TARGET,
    Ambiguous,
    Unreadable,
    canonical_path,
    compile_glob,
    parse_target,
    php_name,
)

CANONICAL = [
    ("/", "/"),
    ("/org/repo", "/org/repo"),
    ("/org/repo/", "/org/repo/"),
    ("/org/repo.git/info/refs", "/org/repo.git/info/refs"),
    ("/%6Frg/repo", "/org/repo"),  # an encoded unreserved character is that character
    ("/%6frg/%72epo", "/org/repo"),  # lower-case hex too
    ("/a%7Eb", "/a~b"),
    ("/a%2Db_c", "/a-b_c"),
    ("/@types/node", "/@types/node"),
    ("/a%40b%3Ac", "/a@b:c"),
    ("/a%20b", "/a b"),
    ("/.well-known/x", "/.well-known/x"),  # a dot starting a segment is not a dot segment
    ("/a/...", "/a/..."),
    ("/a/b.", "/a/b."),
]

AMBIGUOUS = [
    ("/myorg/../evil/repo", "dot segment"),
    ("/myorg/./repo", "dot segment"),
    ("/myorg/..", "dot segment"),
    ("/myorg/%2e%2e/evil", "encoded '.'"),
    ("/myorg/%2E%2E/evil", "encoded '.'"),
    ("/myorg/.%2e/evil", "encoded '.'"),
    ("/myorg%2f..%2fevil", "encoded '/'"),
    ("/myorg%2Fevil", "encoded '/'"),
    ("/@types%2fnode", "encoded '/'"),
    ("/myorg%5c..%5cevil", "encoded '\\'"),
    ("/myorg\\..\\evil", "backslash"),
    ("/myorg//evil", "empty path segment"),
    ("//evil/repo", "empty path segment"),
    ("/myorg;x=1/repo", "';' path parameter"),
    ("/myorg/repo;jsessionid=1", "';' path parameter"),
    ("/myorg%3b/repo", "encoded ';'"),
    ("/myorg/%25%32%65%25%32%65/evil", "double-encoded '%'"),
    ("/myorg/%3F", "encoded '?'"),
    ("/myorg/%23", "encoded '#'"),
    ("/caf%C3%A9", "non-ASCII"),
    ("/x" + "a" * MAX_PATH, "longer than"),
    ("*", "does not start with '/'"),
    ("evil/repo", "does not start with '/'"),
]

UNREADABLE = [
    ("/a%zz", "malformed percent-escape"),
    ("/a%2", "malformed percent-escape"),
    ("/a%", "malformed percent-escape"),
    ("/a%00b", "encoded control character"),
    ("/a%0d%0aX-Injected:1", "encoded control character"),
    ("/a%7f", "encoded control character"),
    ("/a\x00b", "control character"),
    ("/a b", "control character or space"),
    ("/caf\u00e9", "non-ASCII"),
    ("/a#frag", "fragment"),
    ("/a?q=%zz", "malformed percent-escape"),
    ("/a?q=%00", "encoded control character"),
    ("/a?q=%ff", "not UTF-8"),
    ("/" + "a" * MAX_TARGET, "longer than"),
    ("/a?" + "&".join(f"p{i}=1" for i in range(300)), "more than"),
]


@pytest.mark.parametrize(("raw", "expected"), CANONICAL)
def test_unambiguous_spellings_are_decoded_once(raw: str, expected: str) -> None:
    assert canonical_path(raw) == expected
    target = parse_target(raw)
    assert (target.path, target.problem) == (expected, None)


@pytest.mark.parametrize(("raw", "why"), AMBIGUOUS)
def test_ambiguous_paths_have_no_canonical_form(raw: str, why: str) -> None:
    with pytest.raises(Ambiguous, match=re.escape(why)):
        canonical_path(raw)
    target = parse_target(raw)
    assert target.path is None
    assert target.problem is not None and why in target.problem


@pytest.mark.parametrize(("raw", "why"), UNREADABLE)
def test_unreadable_targets_are_refused_whole(raw: str, why: str) -> None:
    with pytest.raises(Unreadable, match=re.escape(why)):
        parse_target(raw)


def test_query_is_split_on_ampersand_and_semicolon_and_decoded() -> None:
    target = parse_target(
        "/info/refs?service=git-upload-pack;x=1&flag&%73ervice=git%2Dreceive-pack"
    )
    assert target.path == "/info/refs"
    assert target.query.params == (
        ("service", "git-upload-pack"),
        ("x", "1"),
        ("flag", None),
        ("service", "git-receive-pack"),
    )
    assert target.query.values("SERVICE") == ["git-upload-pack", "git-receive-pack"]


def test_query_names_are_matched_as_php_names_them_too() -> None:
    """PHP reads ``+service``, `` service`` and ``service[]`` as ``service``: every copy counts."""
    target = parse_target(
        "/r?service=a&+service=b&%20service=c&service%5B%5D=d&.method=e&service_x=f&xservice=g"
    )
    assert target.query.values("service") == ["a", "b", "c", "d"]
    assert target.query.values("_method") == ["e"]
    assert php_name("A.b c[0]") == "a_b_c"


def test_an_ambiguous_path_keeps_its_query() -> None:
    target = parse_target("/a/../b?service=x")
    assert target.path is None
    assert target.query.values("service") == ["x"]


# -- globs -------------------------------------------------------------------------------------------

GLOBS = [
    ("/myorg/**", "/myorg", True),
    ("/myorg/**", "/myorg/", True),
    ("/myorg/**", "/myorg/repo/info/refs", True),
    ("/myorg/**", "/myorgx/repo", False),
    ("/myorg/**", "/other/myorg/repo", False),
    ("/*/*/info/refs", "/org/repo/info/refs", True),
    ("/*/*/info/refs", "/org/repo.git/info/refs", True),
    ("/*/*/info/refs", "/org/info/refs", False),
    ("/*/*/info/refs", "/a/b/c/info/refs", False),
    ("/*/*.git/info/refs", "/org/repo.git/info/refs", True),
    ("/*/*.git/info/refs", "/org/repo/info/refs", False),
    ("/**/git-upload-pack", "/a/b/c/git-upload-pack", True),
    ("/**/git-upload-pack", "/git-upload-pack", True),
    ("/graphql", "/graphql", True),
    ("/graphql", "/graphql/", False),
    ("/graphql", "/GraphQL", False),
    ("/-/npm/v1/security/*", "/-/npm/v1/security/audits", True),
    ("/a.b", "/axb", False),  # a dot is literal, never a regex wildcard
    ("/a+", "/aa", False),
]


@pytest.mark.parametrize(("glob", "path", "matches"), GLOBS)
def test_globs(glob: str, path: str, matches: bool) -> None:
    assert compile_glob(glob).matches(path) is matches


def test_case_insensitive_globs_for_case_insensitive_servers() -> None:
    glob = compile_glob("/myorg/**", insensitive=True)
    assert glob.matches("/MyOrg/Repo")
    assert not compile_glob("/myorg/**").matches("/MyOrg/Repo")


@pytest.mark.parametrize(
    "bad",
    [
        "myorg/**",
        "/a/../b",
        "/a/./b",
        "/a//b",
        "/a%2fb",
        "/a;b",
        "/a?b",
        "/a#b",
        "/a\\b",
        "/a b",
        "/a/**b",
        "/a/x**/c",
        "/caf\u00e9",
    ],
)
def test_globs_that_could_never_match_are_refused_at_load(bad: str) -> None:
    with pytest.raises(ValueError):
        compile_glob(bad)


# -- properties --------------------------------------------------------------------------------------

SEGMENT_CHARS = "abcXYZ019-._~@:!$&'()*+,="
segments = st.lists(
    st.text(alphabet=SEGMENT_CHARS, min_size=1, max_size=6).filter(lambda s: s not in (".", "..")),
    min_size=1,
    max_size=5,
)


def _spell(path: str, data: st.DataObject) -> str:
    """Another spelling of ``path``: some characters percent-encoded, in upper or lower case hex."""
    out = []
    for ch in path:
        if ch != "/" and ch != "." and data.draw(st.booleans()):
            code = f"{ord(ch):02X}"
            out.append("%" + (code if data.draw(st.booleans()) else code.lower()))
        else:
            out.append(ch)
    return "".join(out)


@given(segments, st.data())
def test_equivalent_spellings_have_one_canonical_form(
    parts: list[str], data: st.DataObject
) -> None:
    path = "/" + "/".join(parts)
    assert canonical_path(_spell(path, data)) == canonical_path(path) == path


# What a client can put into a path to move it elsewhere on some server.
TRICKS = ["..", ".", "%2e%2e", "%2E%2e", ".%2e", "%2e", "", "%2f", "%2F", "%5c", "\\", ";x", "%3b"]
pieces = st.lists(
    st.one_of(st.sampled_from(TRICKS), st.text(alphabet="abevil", min_size=1, max_size=4)),
    min_size=1,
    max_size=6,
)


def _server_views(path: str) -> set[str]:
    """How lenient servers may read a path: decode first or not, ``\\`` as ``/``, ``;`` params cut,
    dot segments resolved, empty segments collapsed."""
    views = set()
    for decode_first in (False, True):
        for backslash in (False, True):
            for params in (False, True):
                text = unquote(path) if decode_first else path
                if backslash:
                    text = text.replace("\\", "/")
                if params:
                    text = "/".join(seg.split(";", 1)[0] for seg in text.split("/"))
                text = unquote(text)
                out: list[str] = []
                for seg in text.split("/"):
                    if seg == "..":
                        if out:
                            out.pop()
                    elif seg not in (".", ""):
                        out.append(seg)
                views.add("/" + "/".join(out))
    return views


@given(pieces)
def test_no_spelling_of_a_path_outside_the_glob_matches_it(parts: list[str]) -> None:
    glob = compile_glob("/myorg/**")
    raw = "/myorg/" + "/".join(parts)
    try:
        target = parse_target(raw)
    except Unreadable:
        return
    if target.path is not None and glob.matches(target.path):
        for view in _server_views(raw):
            assert view == "/myorg" or view.startswith("/myorg/"), (raw, view)


def _each_star_unbounded(text: str, insensitive: bool) -> re.Pattern[str]:
    """What a glob means: each ``*`` any run of a segment's characters (written so, it backtracks
    over every split of the segment between them: the oracle, not the matcher)."""
    parts = []
    for segment in text[1:].split("/"):
        if segment == "**":
            parts.append("(?:/[^/]*)*")
        elif segment == "*":
            parts.append("/[^/]+")
        else:
            parts.append("/" + "[^/]*".join(re.escape(piece) for piece in segment.split("*")))
    return re.compile("".join(parts), re.ASCII | (re.IGNORECASE if insensitive else 0))


_SEGMENT = st.one_of(st.just("**"), st.just("*"), st.text("ab-*", min_size=1, max_size=6))
_PATH_SEGMENT = st.text("abAB-", max_size=7)


@settings(max_examples=400, deadline=None)
@given(
    segments=st.lists(_SEGMENT, min_size=1, max_size=3),
    paths=st.lists(st.lists(_PATH_SEGMENT, min_size=1, max_size=4), min_size=1, max_size=5),
    insensitive=st.booleans(),
)
def test_a_glob_matches_what_each_star_means(
    segments: list[str], paths: list[list[str]], insensitive: bool
) -> None:
    text = "/" + "/".join(segments)
    try:
        glob = compile_glob(text, insensitive=insensitive)
    except ValueError:
        return
    oracle = _each_star_unbounded(text, insensitive)
    for path in ("/" + "/".join(p) for p in paths):
        assert glob.matches(path) == (oracle.fullmatch(path) is not None), (text, path)


@pytest.mark.parametrize("text", ["/*-*-*.tar.gz", "/*.*.*", "/a*b*c*d*e", "/x/**/*-*-*"])
def test_a_segments_stars_leave_one_run_to_backtrack_over(text: str) -> None:
    """Between its first and last ``*`` a segment's pieces are found once each (atomic groups):
    written as ``[^/]*`` each, ``/*-*-*.tar.gz`` against a path of 1,000 dashes took 0.3 s (cubic
    in the length; a path may be 4,096 characters, and a deny rule tries several spellings)."""
    pattern = compile_glob(text).pattern.pattern
    outside = re.sub(r"\(\?>[^()]*\)", "", pattern)  # the atomic groups
    assert outside.count("[^/]*") <= text.count("/"), pattern  # one per segment at most
    assert not compile_glob(text).matches("/" + "-" * MAX_PATH)
