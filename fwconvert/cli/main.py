"""The ``fwconvert`` click group and the one top-level error handler.

Every known failure becomes one ``Error:`` line on stderr and the exit code of the table in
``fwconvert.errors``; tracebacks only with ``--debug``. SIGINT exits 130, SIGTERM 143. Heavy
libraries are imported inside commands so that ``--help`` stays fast.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import tempfile
import traceback
from typing import NoReturn

import click

from .. import __version__
from ..errors import EXIT_CODES, EXIT_INPUT, EXIT_INTERNAL, EXIT_RESOURCE, EXIT_SIGINT, EXIT_SIGTERM, EXIT_USAGE, FwconvertError
from . import cmd_convert, cmd_export, cmd_inspect, cmd_train

EXIT_TABLE = "\n".join(f"  {code:>3}  {text}" for code, text in EXIT_CODES.items())


class Terminated(BaseException):
    """Raised by the SIGTERM handler so that context managers clean up before exit 143."""


def _on_sigterm(signum, frame):
    raise Terminated()


@click.group(
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


def _error(message: str, code: int) -> NoReturn:
    lines = str(message).strip().splitlines() or ["(no message)"]
    click.echo("Error: " + "\n  ".join(lines[:4]), err=True)
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
    except click.ClickException as e:  # usage errors and the like
        e.show()
        sys.exit(e.exit_code if e.exit_code is not None else EXIT_USAGE)
    except FwconvertError as e:
        if debug:
            raise
        _error(e.message, e.exit_code)
    except KeyboardInterrupt:
        if debug:
            raise
        _error("interrupted; nothing written", EXIT_SIGINT)
    except Terminated:
        if debug:
            raise
        _error("terminated; nothing written", EXIT_SIGTERM)
    except OSError as e:
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOMEM):
            _error(f"{where}{e.strerror}", EXIT_RESOURCE)
        if e.errno == errno.ENOENT:
            _error(f"{where}{e.strerror}", EXIT_INPUT)
        _error(f"internal error: {where}{e.strerror or e} (log: {_log_traceback()}; please report)", EXIT_INTERNAL)
    except Exception as e:  # noqa: BLE001 - the one place that turns bugs into a clean exit 1
        if debug:
            raise
        _error(f"internal error: {type(e).__name__}: {e} (log: {_log_traceback()}; please report)", EXIT_INTERNAL)
    finally:
        signal.signal(signal.SIGTERM, old_term)
    sys.exit(0)
