"""UniDetox's hyperparameters (paper / EminLU/UniDetox) and detox's CPU defaults, importable without torch.

:mod:`detox.distill` and :mod:`detox.finetune` use them; the ``detox`` command reads them for its ``--help``,
which must work on a torch-free install (``detox[llamacpp]``).
"""

from __future__ import annotations

# UniDetox's toxic fine-tune (paper / EminLU/UniDetox toxic_gpt2_finetune_and_distill.py).
PAPER_TOXIC_LR = 1e-5
PAPER_TOXIC_BATCH_SIZE = 4
# CPU scale-down.
DEFAULT_TOXIFY_STEPS = 200
DEFAULT_TOXIFY_MAX_LENGTH = 64
# UniDetox's distillation.
PAPER_NUM_SAMPLES = 640
PAPER_MAX_NEW_TOKENS = 256
DEFAULT_ALPHA = 0.1
DEFAULT_BETA = float("inf")
DEFAULT_DISTILL_BATCH_SIZE = 16

# UniDetox's fine-tuning hyperparameters (paper / EminLU/UniDetox unidetox.py).
PAPER_LR = 5e-5
PAPER_BATCH_SIZE = 8
PAPER_SEQ_LEN = 256
# Scaled down for CPU: the only default that differs from the paper.
DEFAULT_STEPS = 100
