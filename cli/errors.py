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
        except ModuleNotFoundError as err:  # an optional dependency (torch, llama_cpp, ...) of another extra
            from detox.extras import missing_module_message

            message = missing_module_message(err)
            if message is None:
                raise
            raise click.ClickException(message) from err
        except (ValueError, FileNotFoundError, FileExistsError, TypeError, OSError) as err:
            raise click.ClickException(str(err)) from err

    return wrapper
