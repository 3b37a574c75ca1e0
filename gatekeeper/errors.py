"""One exception hierarchy, one table from error to exit code.

Every error gatekeeper raises on purpose derives from :class:`GatekeeperError` and carries
a ``hint`` that tells the user what to do next. ``cli.py`` maps the class to an exit code
through :data:`EXIT_CODES`; nothing else calls ``sys.exit``.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Semantic exit codes (documented in the README)."""

    PASS = 0
    BACKDOOR = 1
    SCAN_ERROR = 2  # could not complete the scan: fail closed
    INCONCLUSIVE = 3
    USAGE = 4  # bad arguments or bad policy


class GatekeeperError(Exception):
    """Base of every error gatekeeper raises on purpose.

    Args:
        message: what went wrong, naming the offending file/key/value.
        hint: what the user should do next (one short sentence).
    """

    exit_code: ExitCode = ExitCode.SCAN_ERROR

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        """The message and the hint on one line, as the CLI prints it."""
        return f"{self.message}" + (f" -> {self.hint}" if self.hint else "")


class UsageError(GatekeeperError, ValueError):
    """Bad command-line arguments."""

    exit_code = ExitCode.USAGE


class PolicyError(GatekeeperError, ValueError):
    """The policy file is missing, malformed, or holds an unknown key or bad value."""

    exit_code = ExitCode.USAGE

    def __init__(self, message: str, hint: str = "", *, file: str = "", key: str = "") -> None:
        super().__init__(message, hint)
        self.file = file
        self.key = key


class SourceError(GatekeeperError, OSError):
    """A model reference could not be resolved (offline, unknown repo, bad revision...)."""


class ModelFormatError(GatekeeperError, ValueError):
    """The model folder, manifest or weights are missing, corrupt or inconsistent."""


class UnsafeCheckpointError(ModelFormatError):
    """A pickle checkpoint references globals outside the allow-list; it was not loaded."""

    def __init__(self, message: str, hint: str = "", *, globals_found: tuple[str, ...] = ()) -> None:
        super().__init__(message, hint)
        self.globals_found = globals_found


class BackboneError(GatekeeperError, RuntimeError):
    """The backbone reference does not resolve or does not load through open_clip."""


class PoolError(GatekeeperError, ValueError):
    """The OOD pool is empty, too small for the policy's budget, or malformed."""


class ResourceError(GatekeeperError, MemoryError):
    """The scan does not fit the device's memory or time limit."""


class ResultError(GatekeeperError, ValueError):
    """Partial results or scan results cannot be combined or read."""


def exit_code_for(exc: BaseException) -> ExitCode:
    """Map any exception to an exit code; unknown errors fail closed with SCAN_ERROR."""
    if isinstance(exc, GatekeeperError):
        return exc.exit_code
    return ExitCode.SCAN_ERROR
