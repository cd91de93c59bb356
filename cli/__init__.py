"""The ``detox`` command line (click)."""
