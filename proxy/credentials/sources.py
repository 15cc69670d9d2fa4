"""Where a real credential value comes from: an environment variable of the gate, a file, a command.

Values are read here and nowhere else, and no message built here ever contains one: errors name the
source (variable, path, command) and what went wrong, never what was read. A file is read again when
it changes (checked on use: a stat, no read), a command is run again on :meth:`Source.refresh`
(``egress serve`` calls it on SIGHUP), an environment variable is fixed for the gate's life.
"""

from __future__ import annotations

import os
import stat
import subprocess
from dataclasses import dataclass, field

MAX_VALUE = 16 * 1024  # bytes: a token, a key; not a file to ship
COMMAND_TIMEOUT = 20.0  # seconds a command source may take


class SourceError(Exception):
    """A value could not be read; the message names the source, never a value."""


@dataclass
class Source:
    """One declared source: ``kind`` is ``env``, ``file`` or ``command``."""

    kind: str
    env: str | None = None
    path: str | None = None
    argv: tuple[str, ...] = ()
    _value: str | None = field(default=None, repr=False)
    _stamp: tuple[int, int, int] | None = field(default=None, repr=False)

    def describe(self) -> str:
        if self.kind == "env":
            return f"environment variable {self.env}"
        if self.kind == "file":
            return f"file {self.path}"
        return f"command {' '.join(self.argv)!r}"

    def value(self) -> str:
        """The current value: read on first use, a file again whenever it changed. A file that
        changed but cannot be read now keeps the last good value (and raises only if none)."""
        if self.kind == "file" and self._value is not None:
            try:
                if self._file_stamp() != self._stamp:
                    self._value = self._read()
            except SourceError:
                return self._value
        if self._value is None:
            self._value = self._read()
        return self._value

    def refresh(self) -> bool:
        """Read again now (a command is run again); True when the value changed. On failure the
        last good value stays in force and SourceError says why."""
        new = self._read()
        changed = new != self._value
        self._value = new
        return changed

    def _file_stamp(self) -> tuple[int, int, int]:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise SourceError(f"{self.describe()}: {exc.strerror}") from None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _read(self) -> str:
        if self.kind == "env":
            assert self.env is not None
            raw = os.environ.get(self.env)
            if raw is None:
                raise SourceError(f"{self.describe()} is not set in the gate's environment")
            return _checked(raw, self.describe())
        if self.kind == "file":
            return self._read_file()
        return self._run()

    def _read_file(self) -> str:
        assert self.path is not None
        stamp = self._file_stamp()
        try:
            st = os.stat(self.path)
            if not stat.S_ISREG(st.st_mode):
                raise SourceError(f"{self.describe()} is not a regular file")
            if st.st_mode & 0o077:
                raise SourceError(
                    f"{self.describe()} is readable or writable by group or others (mode "
                    f"{stat.S_IMODE(st.st_mode):o}); chmod 600 it"
                )
            with open(self.path, "rb") as handle:
                raw = handle.read(MAX_VALUE + 1)
        except OSError as exc:
            raise SourceError(f"{self.describe()}: {exc.strerror}") from None
        self._stamp = stamp
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise SourceError(f"{self.describe()} is not UTF-8 text") from None
        return _checked(text, self.describe())

    def _run(self) -> str:
        try:
            done = subprocess.run(
                list(self.argv),
                capture_output=True,
                timeout=COMMAND_TIMEOUT,
                stdin=subprocess.DEVNULL,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SourceError(f"{self.describe()} could not run: {type(exc).__name__}") from None
        if done.returncode != 0:
            # Its stderr could echo the value: only the status is reported.
            raise SourceError(f"{self.describe()} exited with status {done.returncode}")
        try:
            text = done.stdout[: MAX_VALUE + 1].decode("utf-8")
        except UnicodeDecodeError:
            raise SourceError(f"{self.describe()} printed something that is not UTF-8") from None
        return _checked(text, self.describe())


def _checked(raw: str, what: str) -> str:
    value = raw.strip()
    if not value:
        raise SourceError(f"{what} is empty")
    if len(value) > MAX_VALUE:
        raise SourceError(f"{what} is longer than {MAX_VALUE} bytes")
    if any(c < " " or c > "~" for c in value):
        raise SourceError(
            f"{what} holds a control or non-ASCII character, or more than one line (a token is "
            "one line of printable ASCII)"
        )
    return value


__all__ = ["MAX_VALUE", "Source", "SourceError"]
