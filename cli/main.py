"""Entry point of the ``detox`` console script."""

from __future__ import annotations

import click

import detox
from detox.cli.artifacts import artifacts_group
from detox.cli.core import align_cmd, export_onnx_cmd, generate_cmd, train_cmd
from detox.cli.bench import bench_cmd
from detox.cli.demo import demo_cmd
from detox.cli.errors import DetoxGroup, debug_option
from detox.cli.evaluate import eval_cmd, score_cmd
from detox.cli.scorer import scorer_group
from detox.cli.serve import serve_cmd
from detox.cli.unidetox import distill_cmd, finetune_cmd, toxify_cmd


@click.group(cls=DetoxGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(detox.__version__, prog_name="detox")
@debug_option
def main(debug: bool) -> None:
    """detox: make any language model's generations less toxic without retraining it."""


for command in (train_cmd, align_cmd, generate_cmd, demo_cmd, bench_cmd, export_onnx_cmd, eval_cmd, score_cmd,
                toxify_cmd, distill_cmd, finetune_cmd, artifacts_group, scorer_group, serve_cmd):
    main.add_command(command)


if __name__ == "__main__":
    main()
