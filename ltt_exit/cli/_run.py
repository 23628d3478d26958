"""The one error path of every ltt-exit command: expected failures are one line and exit status 2.

Every console script's ``main`` is written as ``run_cli(PROG, body)(argv)`` — or decorated with
``@cli_main(PROG)`` — where ``body(argv)`` parses its options with :class:`ArgumentParser` and does
the work. Then, for every command alike:

* success: ``body``'s return value (0 when it returns None);
* an expected failure — bad input, a missing or unreadable file, a refused certificate or adapter
  file — prints ``<prog>: error: <one line naming the problem>`` on stderr and exits **2**;
  "expected" means :class:`ltt_exit.validation.InputError` (the base class of ``CertificateError``,
  ``LossTableError``, ``CertificateMismatch`` …), the ``ValueError`` / ``TypeError`` that public
  functions raise for bad arguments, ``OSError`` (missing file, permission, full disk) and bad
  command-line options;
* anything else is a bug: the traceback is printed and the status is **1**;
* ``--help`` exits 0, Ctrl-C exits 130.

A new command (e.g. ``ltt-train-exits``) uses it the same way and raises an ``InputError`` (or a
subclass of its own) for what it refuses.
"""
from __future__ import annotations

import argparse
import functools
import sys
import traceback
from typing import Callable, Sequence

from ltt_exit.validation import InputError

__all__ = ["ArgumentParser", "CLIError", "EXPECTED_ERRORS", "EXIT_OK", "EXIT_BUG", "EXIT_INPUT", "run_cli", "cli_main",
           "one_line"]

EXIT_OK = 0
EXIT_BUG = 1
EXIT_INPUT = 2

#: exception types that mean "the input was bad", never "the program is wrong"
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (InputError, ValueError, TypeError, OSError)


class CLIError(InputError):
    """Bad command-line input found after parsing (e.g. an output path in a missing folder)."""


class _UsageError(CLIError):
    """argparse found a bad option; raised instead of argparse's usage dump + ``sys.exit(2)``."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line option errors: ``<prog>: error: <problem> (see --help)``, exit 2."""

    def error(self, message: str):  # noqa: D102 (argparse's hook)
        raise _UsageError(f"{message} (see {self.prog} --help)")


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (KeyError's repr quotes dropped)."""
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    else:
        text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{exc.filename}: {text}"
    return " ".join(text.split())


def run_cli(prog: str, body: Callable[[Sequence[str] | None], int | None],
            argv: Sequence[str] | None = None) -> int:
    """Run ``body(argv)`` under the common error path and return the exit status (see the module doc)."""
    try:
        status = body(argv)
    except SystemExit as exc:  # --help / --version, or a body that exits by itself
        code = exc.code
        return code if isinstance(code, int) else (EXIT_OK if code is None else EXIT_INPUT)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED_ERRORS as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return EXIT_INPUT
    except Exception:  # a bug: show where
        traceback.print_exc()
        print(f"{prog}: internal error (a bug; the traceback above says where)", file=sys.stderr)
        return EXIT_BUG
    return EXIT_OK if status is None else int(status)


def cli_main(prog: str):
    """Decorator form: ``@cli_main("ltt-x") def main(argv=None): ...`` makes ``main`` return the status."""
    def wrap(body):
        @functools.wraps(body)
        def main(argv: Sequence[str] | None = None) -> int:
            return run_cli(prog, body, argv)

        return main

    return wrap
