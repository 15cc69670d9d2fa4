"""What leaves the host: no userinfo, no query values, no control characters, bounded length."""

from __future__ import annotations

from proxy.evidence.otel.scrub import scrub_host, scrub_query, scrub_text, scrub_url


def test_scrub_escapes_control_characters_and_caps_length() -> None:
    assert scrub_text("a\nb\r\x00c\x7f\x85") == "a\\x0ab\\x0d\\x00c\\x7f\\x85"
    capped = scrub_text("x" * 1000)
    assert len(capped) == 256 and capped.endswith("...")


def test_scrub_url_drops_userinfo_query_values_and_fragment() -> None:
    assert scrub_url("/a/b?token=s3cr3t&q=1#frag") == ("/a/b", "token=&q=")
    path, query = scrub_url("http://user:pw@host.example:8080/x?k=v")
    assert path == "http://host.example:8080/x" and query == "k="
    assert scrub_url("/plain") == ("/plain", None)
    assert scrub_host("user:pw@h.example") == "h.example"


def test_scrub_query_keeps_names_only() -> None:
    assert scrub_query("a=1&token=s3cr3t&&flag") == "a=&token=&flag="
    assert scrub_query("") == ""


def test_scrub_escapes_separators_and_format_characters_but_keeps_printable_unicode() -> None:
    # U+2028/2029 end a line in many viewers; U+202E reverses what follows; U+200B hides.
    assert scrub_text("a\u2028b\u2029c\u202ed\u200be") == "a\\u2028b\\u2029c\\u202ed\\u200be"
    assert scrub_text("\U000e0001x") == "\\U000e0001x"
    assert scrub_text("pypi.org/é/中") == "pypi.org/é/中"


def test_a_lone_surrogate_is_escaped_so_the_value_can_be_encoded() -> None:
    scrubbed = scrub_text("bin/\udc80x")
    assert scrubbed == "bin/\\udc80x"
    scrubbed.encode("utf-8")
