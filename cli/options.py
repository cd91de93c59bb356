"""Click options that more than one command takes, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click

from detox.methods import METHODS
from detox.onnx_calibrator import INT8, WEIGHTS_DTYPES
from detox.runtime import Calibrator

onnx_weights_option = click.option(
    "--onnx-weights", type=click.Choice(WEIGHTS_DTYPES), default=INT8, show_default=True,
    help="How the artifact's calibrator.onnx stores its weights: int8 blocks (a quarter of the bytes read per "
         "decoding step, about 1% error) or float32 (exact).")


def add_options(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """One decorator applying a group of click options that several commands share, in the order listed."""

    def decorate(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


strength_option = click.option(
    "--strength", default=None, type=click.FloatRange(0.0, max(m.config.max_strength for m in METHODS.values())),
    help="Fusion strength λ: " + ", ".join(f"[0, {m.config.max_strength:g}] for {m.name}" for m in METHODS.values())
         + " artifacts (default: the artifact's).")


def load_calibrator_early(calibrator: str | None, strength: float | None) -> Any:
    """A ``--calibrator`` that is a local path, loaded (and ``--strength`` checked against its fusion mode) before
    any target loads, which can take minutes; anything else (``None``, ``NAME@RANGE``) is returned as given."""
    if calibrator is None or not Path(calibrator).exists():
        return calibrator
    loaded = Calibrator.load(calibrator)
    if strength is not None:
        try:
            loaded.check_strength(strength)
        except ValueError as err:
            raise click.BadParameter(str(err), param_hint="--strength") from None
    return loaded
