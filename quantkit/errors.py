"""User-facing errors: one line, exit code 2, no traceback unless --debug."""
from __future__ import annotations


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
        return "error: " + "".join(parts).replace("\n", " ")


class GateFailed(Exception):
    """Raised after publishing when a quality gate fails; exit code 3."""

    exit_code = 3
