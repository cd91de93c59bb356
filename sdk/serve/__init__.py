"""``detox serve``: a detoxified model behind an OpenAI-compatible HTTP API (FastAPI + uvicorn + sse-starlette).

Example::

    >>> from detox.serve import load_backend, create_app, ServeSettings  # doctest: +SKIP
    >>> app = create_app(load_backend("llamacpp", "smollm2"), ServeSettings(api_key="secret"))  # doctest: +SKIP
    >>> import uvicorn; uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP

Needs the ``serve`` extra: ``pip install 'detox[serve]'``. See docs/serve.md.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["create_app", "load_backend", "ServeSettings", "ServedModel"]
_HOME = {"create_app": "app", "ServeSettings": "app", "load_backend": "model", "ServedModel": "model"}


def __getattr__(name: str) -> Any:
    # Lazy: importing detox.serve must not import FastAPI, torch or llama_cpp before they are needed.
    if name in _HOME:
        return getattr(importlib.import_module(f"detox.serve.{_HOME[name]}"), name)
    raise AttributeError(f"module 'detox.serve' has no attribute {name!r}")
