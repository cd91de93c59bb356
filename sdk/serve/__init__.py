"""``detox serve``: a detoxified model behind an OpenAI-compatible HTTP API (FastAPI + uvicorn + sse-starlette).

Example::

    >>> from detox.serve import load_backend, create_app, ServeSettings  # doctest: +SKIP
    >>> app = create_app(load_backend("llamacpp", "smollm2"), ServeSettings(api_key="secret"))  # doctest: +SKIP
    >>> import uvicorn; uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP

Needs the ``serve`` extra: ``pip install 'detox[serve]'``. See docs/serve.md.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "load_backend", "ServeSettings", "ServedModel"]


def __getattr__(name: str) -> Any:
    # Lazy: importing detox.serve must not import FastAPI, torch or llama_cpp before they are needed.
    if name in ("create_app", "ServeSettings"):
        from detox.serve import app

        return getattr(app, name)
    if name in ("load_backend", "ServedModel"):
        from detox.serve import model

        return getattr(model, name)
    raise AttributeError(f"module 'detox.serve' has no attribute {name!r}")
