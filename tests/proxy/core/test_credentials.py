"""The pure credential step: placeholder shapes, finding placeholders, judging uses and misuse,
the swap helpers and the chunk-safe scrubber."""

from __future__ import annotations

import base64
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.credentials import (
    GENERIC_PREFIX,
    MIN_RANDOM,
    Binding,
    Carried,
    Credentials,
    Delivery,
    Scrubber,
    asks_upgrade,
    encoded_echoes,
    judge,
    placeholder_for,
    scrub_text,
    swap_header,
    swap_query,
)
from proxy.core.decision import Kind
from proxy.core.paths import compile_glob


@pytest.mark.parametrize(
    ("real", "prefix"),
    [
        ("ghp_" + "a1B2" * 9, "ghp_"),
        ("github_pat_" + "11ABCDE_" + "x" * 74, "github_pat_"),
        ("glpat-" + "Ab3_-" * 4, "glpat-"),
        ("npm_" + "Z" * 36, "npm_"),
        ("pypi-" + "AgEIcHlwaS5vcmc" * 10, "pypi-"),
        ("sk-proj-" + "q" * 48, "sk-proj-"),
        ("sk-" + "k" * 48, "sk-"),
        ("some-opaque-api-key-1234567890", GENERIC_PREFIX),
    ],
)
def test_placeholders_keep_the_prefix_length_and_alphabet(real: str, prefix: str) -> None:
    placeholder = placeholder_for(real)
    assert placeholder.startswith(prefix) and placeholder != real
    assert len(placeholder) == max(len(real), len(prefix) + MIN_RANDOM)
    body = real[len(prefix) :] if prefix != GENERIC_PREFIX else real
    allowed = set(string.ascii_letters + string.digits) | ({"_", "-"} & set(body))
    assert set(placeholder[len(prefix) :]) <= allowed


def test_placeholders_are_random_and_never_short() -> None:
    assert placeholder_for("ghp_" + "a" * 36) != placeholder_for("ghp_" + "a" * 36)
    short = placeholder_for("pw")
    assert short.startswith(GENERIC_PREFIX) and len(short) == len(GENERIC_PREFIX) + MIN_RANDOM


PH = "ghp_" + "P" * 36
OTHER_PH = "npm_" + "Q" * 36


def _credentials(**delivery: object) -> Credentials:
    github = Binding(
        "github",
        frozenset({("api.example", 443)}),
        Delivery(**{"header": "authorization", **delivery}),  # type: ignore[arg-type]
        methods=frozenset({"GET"}),
        paths=(compile_glob("/repos/**"),),
    )
    npm = Binding("npm", frozenset({("registry.example", 443)}), Delivery(header="authorization"))
    credentials = Credentials({"github": github, "npm": npm})
    credentials.issue("github", "sbx-1", PH)
    credentials.issue("npm", "sbx-1", OTHER_PH)
    return credentials


def _judge(
    credentials: Credentials,
    carried: Carried,
    *,
    host: str = "api.example",
    kind: Kind = Kind.REQUEST,
    method: str = "GET",
    sandbox: str = "sbx-1",
) -> object:
    return judge(
        credentials,
        credentials.scan(carried),
        kind=kind,
        host=host,
        port=443,
        method=method,
        target=carried.target,
        sandbox_id=sandbox,
        headers=carried.headers,
    )


def test_no_placeholder_no_answer() -> None:
    credentials = _credentials()
    assert _judge(credentials, Carried((("authorization", "Bearer other"),), "/repos/x")) is None


def test_a_use() -> None:
    judged = _judge(_credentials(), Carried((("Authorization", f"token {PH}"),), "/repos/a/b"))
    assert judged is not None and not judged.misuse  # type: ignore[attr-defined]
    assert judged.label == "github" and judged.swaps == (("github", PH),)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("carried", "kwargs", "expected"),
    [
        (Carried((("authorization", f"Bearer {PH}"),), "/repos/x"), {"host": "evil.example"},
         "bound to api.example:443, not evil.example:443"),
        (Carried((("authorization", f"Bearer {PH}"),), "/repos/x"), {"kind": Kind.HTTP},
         "plain HTTP"),
        (Carried((("authorization", f"Bearer {PH}"),), "/repos/x"), {"method": "POST"},
         "only sent with GET"),
        (Carried((("authorization", f"Bearer {PH}"),), "/gists"), {}, "not sent to this path"),
        (Carried((("authorization", f"Bearer {PH}"),), "/repos/%2e%2e/gists"), {},
         "no canonical form"),
        (Carried((("authorization", f"Bearer {PH}"),), "/repos/x"), {"sandbox": "sbx-2"},
         "another sandbox"),
        (Carried((("x-note", PH),), "/repos/x"), {}, "the x-note header"),
        (Carried((), f"/repos/x?q={PH}"), {}, "the query parameter q"),
        (Carried((), f"/repos/{PH}"), {}, "the URL"),
        (Carried((), "/repos/x", f"a={PH}".encode()), {}, "the request body"),
        (Carried((), "/repos/x", f"a=%{ord(PH[0]):02x}{PH[1:]}".encode()), {}, "request body"),
        (Carried((("authorization", f"Bearer {OTHER_PH}"),), "/repos/x"), {},
         "bound to registry.example:443"),
    ],
)  # fmt: skip
def test_misuse(carried: Carried, kwargs: dict[str, object], expected: str) -> None:
    judged = _judge(_credentials(), carried, **kwargs)  # type: ignore[arg-type]
    assert judged is not None and judged.misuse  # type: ignore[attr-defined]
    assert expected in judged.detail  # type: ignore[attr-defined]
    assert PH not in judged.detail  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("method", "headers", "target", "body"),
    [
        ("GET", (("X-HTTP-Method-Override", "DELETE"),), "/repos/x", None),
        ("GET", (("x-method-override", "put"),), "/repos/x", None),
        ("GET", (("X_HTTP_Method", "PATCH"),), "/repos/x", None),
        ("GET", (), "/repos/x?_method=DELETE", None),
        ("GET", (), "/repos/x?a=1;_method=DELETE", None),
        ("POST", (("Content-Type", "application/x-www-form-urlencoded"),), "/repos/x",
         b"a=1&_method=DELETE"),
        ("POST", (), "/repos/x", b"_method=DELETE"),  # no type: a form to Rack
        ("POST", (("Content-Type", "application/x-www-form-urlencoded"),), "/repos/x",
         b"_method%00x=DELETE"),  # PHP keeps a name up to its first NUL
        ("POST", (("Content-Type", "multipart/form-data; boundary=B"),), "/repos/x",
         b'--B\r\nContent-Disposition: form-data; name="note"; x="; name=_method"\r\n\r\n'
         b"DELETE\r\n--B--\r\n"),  # the part name Rack 2 reads from the raw head
    ],
)  # fmt: skip
def test_a_credential_is_only_sent_with_its_methods_whatever_the_request_overrides_them_with(
    method: str, headers: tuple[tuple[str, str], ...], target: str, body: bytes | None
) -> None:
    """The server acts on the override, with the real value: the credential's ``methods`` hold
    for every method the request is judged as, not only the one its request line shows."""
    github = Binding(
        "github",
        frozenset({("api.example", 443)}),
        Delivery(header="authorization"),
        methods=frozenset({"GET", "POST"}),
    )
    credentials = Credentials({"github": github})
    credentials.issue("github", "sbx-1", PH)
    carried = Carried((("Authorization", f"token {PH}"), *headers), target)
    judged = judge(
        credentials,
        credentials.scan(carried),
        kind=Kind.REQUEST,
        host="api.example",
        port=443,
        method=method,
        target=target,
        sandbox_id="sbx-1",
        headers=carried.headers,
        body=body,
    )
    assert judged is not None and judged.misuse, judged
    assert "only sent with GET, POST, not" in judged.detail and PH not in judged.detail
    plain = judge(
        credentials,
        credentials.scan(Carried((("Authorization", f"token {PH}"),), "/repos/x")),
        kind=Kind.REQUEST,
        host="api.example",
        port=443,
        method=method,
        target="/repos/x",
        sandbox_id="sbx-1",
        headers=(("Authorization", f"token {PH}"),),
        body=b"a=1" if body is not None else None,
    )
    assert plain is not None and not plain.misuse  # the same request without the override


def test_encoded_and_double_encoded_urls_are_found() -> None:
    encoded = "".join(f"%{ord(c):02x}" for c in PH)
    twice = encoded.replace("%", "%25")
    for target in (f"/x?t={encoded}", f"/x?t={twice}", f"/{encoded}"):
        assert _credentials().scan(Carried((), target)), target


def test_basic_credentials_are_decoded() -> None:
    value = "Basic " + base64.b64encode(f"x-access-token:{PH}".encode()).decode()
    found = _credentials().scan(Carried((("Authorization", value),), "/"))
    assert [f.where for f in found] == ["basic:authorization"]
    assert _judge(_credentials(), Carried((("Authorization", value),), "/repos/x")).misuse  # type: ignore[union-attr]
    judged = _judge(_credentials(basic=True), Carried((("Authorization", value),), "/repos/x"))
    assert judged is not None and not judged.misuse  # type: ignore[attr-defined]


def test_formats_constrain_the_header_shape() -> None:
    credentials = _credentials(formats=("Bearer {}",))
    ok = _judge(credentials, Carried((("authorization", f"Bearer {PH}"),), "/repos/x"))
    bad = _judge(credentials, Carried((("authorization", f"Bearer {PH} {PH}"),), "/repos/x"))
    assert not ok.misuse and bad.misuse  # type: ignore[union-attr]


@pytest.mark.parametrize("odd_first", [True, False])
def test_formats_constrain_every_field_of_a_header_given_twice(odd_first: bool) -> None:
    """The swap reaches every field carrying the placeholder: each one must have the shape."""
    credentials = _credentials(formats=("Bearer {}",))
    fields = [("authorization", f"note {PH} end"), ("authorization", f"Bearer {PH}")]
    if not odd_first:
        fields.reverse()
    judged = _judge(credentials, Carried(tuple(fields), "/repos/x"))
    assert judged is not None and judged.misuse  # type: ignore[attr-defined]
    assert "must be sent as" in judged.detail  # type: ignore[attr-defined]


def test_query_delivery() -> None:
    credentials = _credentials(header=None, query="access_token")
    judged = _judge(credentials, Carried((), f"/repos/x?access_token={PH}&page=2"))
    assert judged is not None and not judged.misuse  # type: ignore[attr-defined]
    assert swap_query(f"/r?access_token={PH}&page=2", "access_token", PH, "real/+=") == (
        "/r?access_token=real%2F%2B%3D&page=2"
    )
    assert _judge(credentials, Carried((), f"/repos/x?other={PH}")).misuse  # type: ignore[union-attr]


def test_swap_header() -> None:
    assert swap_header(f"token {PH}", "header:", PH, "REAL") == "token REAL"
    basic = "Basic " + base64.b64encode(f"u:{PH}".encode()).decode()
    swapped = swap_header(basic, "basic:", PH, "REAL")
    assert base64.b64decode(swapped.split()[1]) == b"u:REAL"


def test_bound_to() -> None:
    credentials = _credentials()
    assert credentials.bound_to("API.example.", "sbx-1", port=443) == ("github",)
    assert credentials.bound_to("api.example", "sbx-2", port=443) == ()
    assert credentials.bound_to("api.example", "sbx-1", port=8443) == ()


REAL = b"ghp_REALREALREALREALREALREALREALREAL1234"


@given(st.binary(max_size=200), st.binary(max_size=200), st.lists(st.integers(1, 60), max_size=20))
def test_the_scrubber_catches_values_split_anywhere(
    before: bytes, after: bytes, cuts: list[int]
) -> None:
    data = before + REAL + after + REAL
    scrubber = Scrubber([(REAL, b"PLACEHOLDER")])
    out, position = b"", 0
    for cut in cuts:
        out += scrubber(data[position : position + cut])
        position += cut
    out += scrubber(data[position:]) + scrubber(b"")
    expected = (before + REAL + after + REAL).replace(REAL, b"PLACEHOLDER")
    assert REAL not in out
    assert out == expected


def test_bound_to_without_a_port_names_a_host_bound_on_any_port() -> None:
    """Responses are scrubbed on every port of a bound host: what a service kept from one port
    it can show on another."""
    credentials = _credentials()
    assert credentials.bound_to("API.example.", "sbx-1") == ("github",)
    assert credentials.bound_to("api.example", "sbx-1", port=80) == ()
    assert credentials.bound_to("evil.example", "sbx-1") == ()
    assert credentials.bound_to("api.example", "sbx-2") == ()  # nothing issued to it


def test_scrub_text() -> None:
    assert scrub_text("a REAL b REALLY", [("REAL", "ph")]) == "a ph b phLY"


def test_a_placeholder_in_the_host_name_is_found_whatever_its_case() -> None:
    credentials = _credentials()
    found = credentials.scan(Carried((), "", authority=f"{PH.lower()}.evil.example"))
    assert [(f.placeholder, f.where) for f in found] == [(PH, "url")]


def test_never_on_a_protocol_upgrade() -> None:
    carried = Carried((("authorization", f"Bearer {PH}"), ("upgrade", "websocket")), "/repos/x")
    judged = _judge(_credentials(), carried)
    assert judged is not None and judged.misuse and "upgrade" in judged.detail  # type: ignore[attr-defined]


def test_a_websocket_handshake_without_upgrade_is_an_upgrade_too() -> None:
    assert asks_upgrade([("Sec-WebSocket-Version", "13")])
    assert asks_upgrade([("sec_websocket_key", "x")])
    assert not asks_upgrade([("Sec-Fetch-Mode", "cors"), ("Connection", "Upgrade")])
    carried = Carried((("authorization", f"Bearer {PH}"), ("sec-websocket-version", "13")), "/x")
    judged = _judge(_credentials(), carried)
    assert judged is not None and judged.misuse and "upgrade" in judged.detail  # type: ignore[attr-defined]


@pytest.mark.parametrize("user", ["", "x", "xy", "xyz", "x-access-token"])
def test_encoded_echoes_hide_a_value_inside_basic_credentials_at_every_offset(user: str) -> None:
    real = "ghp_" + "R3alGithubTokenValue0123456789abcd+/"
    fake = placeholder_for(real)
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        sent = encode(f"{user}:{real}".encode()).decode()
        echoed = scrub_text(sent, encoded_echoes(real, fake))
        decoded = base64.b64decode(echoed.translate(str.maketrans("-_", "+/")))
        assert real[2:-2].encode() not in decoded and decoded.startswith(f"{user}:".encode())
        assert fake[2:-2].encode() in decoded and len(echoed) == len(sent)
    quoted = encoded_echoes(real, fake)[0]
    assert quoted == (real.replace("+", "%2B").replace("/", "%2F"), fake)


def test_scrub_text_in_any_case_where_the_protocol_folds_it() -> None:
    """A header field's name: HTTP/2 lower-cases it, so a value in it is found in any case; a
    placeholder that reads like a template is put in as it is."""
    pairs = [("ghp_ABCdef", "ghp_p\\1x")]
    assert scrub_text("x-ghp_abcdef", pairs, fold_case=True) == "x-ghp_p\\1x"
    assert scrub_text("X-GHP_ABCDEF: ghp_ABCdef", pairs, fold_case=True) == "X-ghp_p\\1x: ghp_p\\1x"
    assert scrub_text("x-ghp_abcdef", pairs) == "x-ghp_abcdef"  # values keep their case
