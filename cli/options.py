"""Click options that more than one command takes, defined once."""

from __future__ import annotations

import click

from detox.onnx_calibrator import INT8, WEIGHTS_DTYPES

onnx_weights_option = click.option(
    "--onnx-weights", type=click.Choice(WEIGHTS_DTYPES), default=INT8, show_default=True,
    help="How the artifact's calibrator.onnx stores its weights: int8 blocks (a quarter of the bytes read per "
         "decoding step, about 1% error) or float32 (exact).")
