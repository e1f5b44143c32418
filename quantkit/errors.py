"""User-facing errors: one line, exit code 2, no traceback unless --debug."""
from __future__ import annotations

import re

# everything str.splitlines() would break a line at, and other control characters: shown escaped
_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
MAX_LINE = 1000  # a message quoting a huge user value must still be one readable line


class UserError(Exception):
    """Bad input or a missing prerequisite the user can fix. Rendered as one line; exit code 2."""

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        self.where = where
        self.fix = fix
        super().__init__(message)

    def one_line(self) -> str:
        parts = [f"{self.where}: " if self.where else "", str(self)]
        if self.fix:
            parts.append(f" (fix: {self.fix})")
        return one_line("error: " + "".join(parts))


def one_line(text: str) -> str:
    """text with newlines as spaces, other control characters escaped, and bounded length."""
    text = _BREAKS.sub(lambda m: " " if m.group() in "\r\n" else repr(m.group())[1:-1], text)
    return text if len(text) <= MAX_LINE else text[:MAX_LINE - 3] + "..."


class GateFailed(Exception):
    """Raised after publishing when a quality gate fails; exit code 3."""

    exit_code = 3
