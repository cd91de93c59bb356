"""Turn the SDK's expected errors into one clear line and a non-zero exit, instead of a traceback."""

from __future__ import annotations

import functools
from typing import Any, Callable

import click


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except (ValueError, FileNotFoundError, FileExistsError, TypeError, OSError) as err:
            raise click.ClickException(str(err)) from err

    return wrapper
