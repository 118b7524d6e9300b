"""Error hierarchy of fwconvert and the one exit-code table.

Every error a user can cause is a ``FwconvertError`` subclass carrying its exit code; the CLI
(``fwconvert.cli``) is the only place that turns them into a single ``Error:`` line.
Stdlib only.
"""
from __future__ import annotations

# The exit-code table (documented in the README; `fwconvert --help` points to it).
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_INPUT = 3
EXIT_OUTPUT = 4
EXIT_RESOURCE = 5
EXIT_NUMERIC = 6
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "internal error (a bug: one line, traceback with --debug)",
    EXIT_USAGE: "usage error (bad option or argument)",
    EXIT_INPUT: "invalid or hostile input (config, checkpoint, data, exported graph)",
    EXIT_OUTPUT: "output conflict or unsafe output path",
    EXIT_RESOURCE: "resource problem (disk space, memory, permissions)",
    EXIT_NUMERIC: "numeric failure (NaN/Inf, overflow, verification mismatch)",
    EXIT_SIGINT: "interrupted by SIGINT (Ctrl-C)",
    EXIT_SIGTERM: "terminated by SIGTERM",
}


class FwconvertError(Exception):
    """Base class: a user-facing error with an exit code."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InputError(FwconvertError):
    """Invalid, corrupt, unsupported or hostile input."""

    exit_code = EXIT_INPUT


class UsageError(InputError):
    """A bad option or argument value, or a combination of them that cannot work (the message names the option).
    An InputError, so API callers that catch InputError keep working; the CLI exits with the usage code."""

    exit_code = EXIT_USAGE


class OutputError(FwconvertError):
    """The output path conflicts with something or is unsafe."""

    exit_code = EXIT_OUTPUT


class ResourceError(FwconvertError):
    """Not enough disk, memory, or no permission."""

    exit_code = EXIT_RESOURCE


class NumericError(FwconvertError):
    """Non-finite values, overflowing casts, or a verification mismatch."""

    exit_code = EXIT_NUMERIC
