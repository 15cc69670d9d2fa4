"""The pure parts of attribution: /proc/net/tcp lines, argv scrubbing, parent chains, traceparent,
context pairs."""

from __future__ import annotations

import pytest

from proxy.attribution import argv as argv_module
from proxy.attribution.argv import MAX_ARG_LENGTH, MAX_ARGS, scrub_argv
from proxy.attribution.context import MAX_KEYS, merged, parse_pair
from proxy.attribution.process import MAX_CHAIN, ProcEntry, build, parent_chain
from proxy.attribution.procnet import decode_address, find_inode, parse_line
from proxy.attribution.traceparent import InvalidTraceparent, parse

TABLE = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:0C38 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 5146105 1
   2: 0100007F:0C38 0100007F:E42C 01 00000000:00000000 00:00000000 00000000     0        0 5146711 1
   3: 0100007F:E42C 0100007F:0C38 01 00000000:00000000 00:00000000 00000000     0        0 5146133 1
   4: 0100007F:E42D 0100007F:0C38 06 00000000:00000000 00:00000000 00000000     0        0 0 1
""".splitlines()


def test_addresses_decode_as_the_kernel_prints_them() -> None:
    assert decode_address("0100007F:0C38") == ("127.0.0.1", 3128)
    assert decode_address("00000000000000000000000001000000:0035") == ("::1", 53)
    assert decode_address("0000000000000000FFFF00000100007F:0050") == ("127.0.0.1", 80)
    with pytest.raises(ValueError):
        decode_address("7F:1")


def test_the_client_socket_is_found_by_its_four_tuple_not_the_gates_side() -> None:
    assert find_inode(TABLE, ("127.0.0.1", 0xE42C), ("127.0.0.1", 3128)) == 5146133
    assert find_inode(TABLE, ("127.0.0.1", 0xE42C), ("127.0.0.1", 3129)) is None
    assert find_inode(TABLE, ("127.0.0.1", 0xE42D), ("127.0.0.1", 3128)) is None  # TIME_WAIT
    assert parse_line(TABLE[0]) is None and parse_line("garbage") is None


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["curl", "-H", "Authorization: Bearer abc.def"], ["curl", "-H", "Authorization: ***"]),
        (["git", "clone", "https://me:tok@h.test/r"], ["git", "clone", "https://***@h.test/r"]),
        (["tool", "--password", "hunter2", "x"], ["tool", "--password", "***", "x"]),
        (["tool", "--api-key=s3cret"], ["tool", "--api-key=***"]),
        (["env", "GITHUB_TOKEN=abc"], ["env", "GITHUB_TOKEN=***"]),
        (["x", "ghp_" + "a1B2" * 9], ["x", "***"]),
        (["x", "aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3zA5b"], ["x", "***"]),
        (["git", "checkout", "0123456789abcdef0123456789abcdef01234567"], None),  # a commit stays
        (["python3", "-c", "print('hello')"], None),
    ],
)
def test_argv_is_scrubbed_of_what_looks_secret(argv: list[str], expected: list[str] | None) -> None:
    assert list(scrub_argv(argv)) == (expected if expected is not None else argv)


def test_argv_is_bounded() -> None:
    out = scrub_argv(["a" * 1000] + ["x"] * 100)
    assert len(out) == MAX_ARGS + 1 and out[-1] == f"...(+{101 - MAX_ARGS})"
    assert len(out[0]) == MAX_ARG_LENGTH and out[0].endswith("...")


def test_warming_compiles_every_pattern_a_scrub_uses() -> None:
    """A gate compiles them as it starts (argv.warm), not in its first connection's lookup."""
    argv_module._rx.cache_clear()
    argv_module.warm()
    warmed = argv_module._rx.cache_info().currsize
    scrub_argv(["--token", "x", "Authorization: Bearer abc", "https://u:p@h/", "ghp_" + "a" * 20])
    scrub_argv(["key=value", "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7"])
    assert warmed > 0 and argv_module._rx.cache_info().currsize == warmed


def _entry(host_pid: int, host_ppid: int, pid: int, exe: str) -> ProcEntry:
    return ProcEntry(host_pid, host_ppid, pid, exe, (exe,), (1, host_pid))


def test_the_chain_stops_at_the_sandboxs_command() -> None:
    table = {
        100: _entry(100, 99, 1, "/init"),
        101: _entry(101, 100, 2, "/bin/sh"),
        102: _entry(102, 101, 3, "/usr/bin/git"),
        103: _entry(103, 102, 4, "/usr/lib/git-core/git-remote-http"),
    }
    attribution = build([table[103]], table)
    assert attribution is not None
    assert (attribution.pid, attribution.ppid) == (4, 3)
    assert attribution.parents == ("3 /usr/bin/git", "2 /bin/sh")
    assert parent_chain(table[101], table) == ()  # the command itself has no parents to name
    assert build([], table) is None


def test_a_shared_socket_records_every_owner_and_a_deep_tree_is_cut() -> None:
    table = {n: _entry(n, n - 1, n - 99, f"/bin/p{n}") for n in range(100, 140)}
    shared = build([table[120], table[139]], table, complete=True)
    assert shared is not None and shared.host_pid == 139 and shared.complete  # the newest
    assert shared.exes == {"/bin/p139", "/bin/p120"} and len(shared.exe_ids) == 2
    deep = build([table[139]], table)
    assert deep is not None and len(deep.parents) == MAX_CHAIN + 1 and deep.parents[-1] == "..."


def test_traceparent_is_parsed_strictly() -> None:
    tp = parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    assert (tp.trace_id, tp.span_id, tp.flags) == (
        "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01"
    )  # fmt: skip
    assert parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later").flags == "01"
    for bad in (
        "",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        "x" * 600,
    ):
        with pytest.raises(InvalidTraceparent):
            parse(bad)


def test_context_pairs_are_checked_and_bounded() -> None:
    assert parse_pair("task=T-1=x") == ("task", "T-1=x")
    for bad in ("novalue", "=v", "1key=v", "k\n=v", "k=line\nbreak", "k=" + "v" * 300):
        with pytest.raises(ValueError):
            parse_pair(bad)
    assert merged({"a": "1", "b": "2"}, [("a", ""), ("c", "3")], ["b"]) == {"c": "3"}
    with pytest.raises(ValueError):
        merged({}, [(f"k{i}", "v") for i in range(MAX_KEYS + 1)])


def test_processes_sharing_a_socket_and_a_binary_keep_their_identity() -> None:
    """A forked child inherits its parent's socket: same file, two owners, one identity."""
    parent = ProcEntry(10, 9, 3, "/usr/bin/git", ("git",), (1, 2))
    child = ProcEntry(11, 10, 4, "/usr/bin/git", ("git",), (1, 2))
    shared = build([parent, child], {10: parent, 11: child})
    assert shared is not None and shared.exe_ids == {(1, 2)}
    unknown = build([parent, ProcEntry(12, 10, 5, "/usr/bin/git", ("git",), None)], {10: parent})
    assert unknown is not None and unknown.exe_ids == frozenset()
