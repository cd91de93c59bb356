"""Errors on the command line: one clear line and a non-zero exit, never a traceback unless ``detox --debug``.

Two layers. Each command turns the SDK's expected errors (bad input the user can fix) into a
``click.ClickException`` with the SDK's message (:func:`user_errors`). The ``detox`` group (:class:`DetoxGroup`)
catches whatever still escapes, such as a bug or an error no command expected, and prints it as one line too.
With ``detox --debug`` (or ``DETOX_DEBUG=1``) both print the full traceback instead.
"""

from __future__ import annotations

import functools
import sys
import traceback
from typing import Any, Callable

import click

from detox.extras import missing_module_message


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the SDK's input errors (``ValueError`` and its subclasses, file errors, an optional library that is
    missing or does not fit, whose message says what to install) into one-line click errors."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except ModuleNotFoundError as err:  # an optional dependency (torch, llama_cpp, ...) of another extra
            message = missing_module_message(err)
            if message is None:
                raise
            raise click.ClickException(message) from err
        except (ValueError, FileNotFoundError, FileExistsError, TypeError, OSError, ImportError) as err:
            raise click.ClickException(one_line(str(err))) from err

    return wrapper


def one_line(message: str) -> str:
    """``message`` on one line (an error is one line, however the exception worded it)."""
    return " ".join(message.split())


class DetoxGroup(click.Group):
    """The ``detox`` group: adds ``--debug`` and makes any error that escapes a command one line."""

    def invoke(self, ctx: click.Context) -> Any:
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.Abort):
            raise
        except click.ClickException as err:
            if debug and err.__cause__ is not None:
                traceback.print_exception(err.__cause__, file=sys.stderr)
            raise
        except Exception as err:
            if debug:
                raise
            raise click.ClickException(one_line(
                f"{type(err).__name__}: {err} (unexpected; run `detox --debug ...` for the traceback and report it)"
            )) from err


debug_option = click.option(
    "--debug", is_flag=True, envvar="DETOX_DEBUG",
    help="On an error, print the full traceback instead of one line (also: DETOX_DEBUG=1).")
