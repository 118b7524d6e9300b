"""The ``fwconvert`` click group and the one top-level error handler.

Every known failure becomes one ``Error:`` line on stderr and the exit code of the table in
``fwconvert.errors``; tracebacks only with ``--debug``. SIGINT exits 130, SIGTERM 143. Heavy
libraries are imported inside commands so that ``--help`` stays fast.

The mapping lives in two layers that share ``_known_error``:

* the click group itself (``FwconvertGroup.invoke``) turns a known failure raised by a command
  (``FwconvertError``, SIGINT, SIGTERM, disk/permission ``OSError``s) into ``CliError``, a
  ``click.ClickException`` carrying the table's exit code, so ``cli`` used on its own (``cli()``,
  ``CliRunner().invoke(cli, ...)``) prints one ``Error:`` line and exits with the right code.
  ``fwconvert.errors`` stays stdlib-only: the click type is made here;
* ``main()`` (the console script) also catches what happens outside a command (argument parsing),
  turns everything else into "internal error" exit 1 with a log file, and installs the SIGTERM
  handler. With ``--debug`` both layers re-raise the original exception (full traceback).
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import tempfile
import traceback
from typing import NoReturn, Optional

import click

from .. import __version__
from ..errors import EXIT_CODES, EXIT_INPUT, EXIT_INTERNAL, EXIT_RESOURCE, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, FwconvertError
from . import cmd_convert, cmd_export, cmd_inspect, cmd_train

EXIT_TABLE = "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())


class Terminated(BaseException):
    """Raised by the SIGTERM handler so that context managers clean up before exit 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


class CliError(click.ClickException):
    """A known failure as click sees it: ``show()`` prints one ``Error:`` line, ``exit_code`` is the table's."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:
        click.echo(_error_line(self.message), file=file, err=file is None)


_RESOURCE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOMEM)


def _known_error(e: BaseException) -> Optional[CliError]:
    """The table's message and exit code for a known failure; None for anything else (a bug: exit 1)."""
    if isinstance(e, FwconvertError):
        return CliError(e.message, e.exit_code)
    if isinstance(e, (KeyboardInterrupt, Terminated)):
        what, code = ("interrupted", EXIT_SIGINT) if isinstance(e, KeyboardInterrupt) else ("terminated", EXIT_SIGTERM)
        # a command that keeps something on purpose (calibrate's last checkpoint) says what, else nothing is left
        return CliError(f"{what}; {getattr(e, 'interrupt_note', None) or 'nothing written'}", code)
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        if e.errno in _RESOURCE_ERRNOS:
            return CliError(f"{where}{e.strerror}", EXIT_RESOURCE)
        if e.errno == errno.ENOENT:
            return CliError(f"{where}{e.strerror}", EXIT_INPUT)
    return None


class FwconvertGroup(click.Group):
    """The click group that maps known failures of its commands to ``CliError`` (see the module doc)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (Exception, KeyboardInterrupt, Terminated) as e:
            known = None if ctx.params.get("debug") else _known_error(e)
            if known is None:
                raise
            raise known from e


@click.group(
    cls=FwconvertGroup,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog="\b\nExit codes (also in README.md, section 'Exit codes'):\n" + EXIT_TABLE,
)
@click.version_option(__version__, prog_name="fwconvert")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def cli(debug):
    """Give a pretrained LLaMA-family model fast weights, calibrate it, export it to ONNX and verify it.

    \b
    Typical flow:
      fwconvert inspect MODEL
      fwconvert add-fwl MODEL -o fwl/        (or: fwconvert mark-fast MODEL -o ttt/)
      fwconvert calibrate fwl/ --data DOCS -o fwl-cal/
      fwconvert export-onnx fwl-cal/ -o fwl-onnx/
      fwconvert verify fwl-onnx/
    """


for _module in (cmd_inspect, cmd_convert, cmd_export, cmd_train):
    for _cmd in _module.COMMANDS:
        cli.add_command(_cmd)


from . import cmd_demo  # noqa: E402

cli.add_command(cmd_demo.demo)


def _log_traceback() -> str:
    fd, path = tempfile.mkstemp(prefix="fwconvert-error-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        traceback.print_exc(file=f)
    return path


def _error_line(message: str) -> str:
    lines = str(message).strip().splitlines() or ["(no message)"]
    return "Error: " + "\n  ".join(lines[:4])


def _error(message: str, code: int) -> NoReturn:
    click.echo(_error_line(message), err=True)
    sys.exit(code)


def main(argv=None) -> None:
    """Console-script entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    old_term = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(args=argv, prog_name="fwconvert", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        _error("interrupted; nothing written", EXIT_SIGINT)
    except CliError as e:  # a known failure, already mapped by the group
        _error(e.message, e.exit_code)
    except click.ClickException as e:  # usage errors and the like
        e.show()
        sys.exit(e.exit_code if e.exit_code is not None else EXIT_USAGE)
    except (Exception, KeyboardInterrupt, Terminated) as e:  # noqa: BLE001 - the one place for a clean exit 1
        if debug:
            raise
        known = _known_error(e)  # raised outside a command (e.g. Ctrl-C while parsing)
        if known is not None:
            _error(known.message, known.exit_code)
        if isinstance(e, OSError):
            where = f"{e.filename}: " if e.filename else ""
            _error(f"internal error: {where}{e.strerror or e} (log: {_log_traceback()}; please report)", EXIT_INTERNAL)
        _error(f"internal error: {type(e).__name__}: {e} (log: {_log_traceback()}; please report)", EXIT_INTERNAL)
    finally:
        signal.signal(signal.SIGTERM, old_term)
    sys.exit(0)
