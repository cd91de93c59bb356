"""``detox serve``: an OpenAI-compatible HTTP server for a detoxified model (docs/serve.md)."""

from __future__ import annotations

import ipaddress
import os

import click

from detox.backends import names as backend_names
from detox.cli.errors import user_errors


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@click.command("serve")
@click.option("--target", default="smollm2", show_default=True,
              help="llamacpp: a .gguf file or 'smollm2' (packaged); hf: a HF directory, .gguf, 'smollm2' or hub id; "
                   "onnx: a directory written by `detox export-onnx`.")
@click.option("--backend", type=click.Choice(backend_names()), default="llamacpp", show_default=True,
              help="llamacpp decodes one request at a time from a bounded queue; hf and onnx decode requests that "
                   "arrive together as one batch.")
@click.option("--calibrator", default=None,
              help="Aligned artifact: directory, .detox file or NAME@RANGE (pulled from --registry). "
                   "Default: the shipped artifact aligned to --target.")
@click.option("--strength", default=None, type=float,
              help="Default fusion strength λ (requests may override it with \"detox\": {\"strength\": ...}). "
                   "Default: the artifact's.")
@click.option("--registry", envvar="DETOX_REGISTRY", default=None, metavar="REG",
              help="Registry for --calibrator NAME@RANGE: directory, file:///PATH or hf://ORG/REPO "
                   "(default: $DETOX_REGISTRY, else ~/.cache/detox/registry).")
@click.option("--require-signature", "keys", multiple=True, type=click.Path(exists=True, dir_okay=False),
              help="Refuse to start unless the calibrator is signed by this public key (PEM). Repeatable.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="DETOX_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics (default: $DETOX_API_KEY; none: open).")
@click.option("--model-name", default=None, help="Model id clients send (default: the --target alias or file name).")
@click.option("--ctx", "context_window", default=2048, show_default=True, type=click.IntRange(16),
              help="Context window in tokens (prompt + completion); hf/onnx: at most the model's own.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1),
              help="Requests that may wait for the model; one more is answered 429.")
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(1),
              help="hf/onnx: most sequences decoded in one batch.")
@click.option("--batch-wait-ms", default=50.0, show_default=True, type=click.FloatRange(0),
              help="hf/onnx: a batch starts once no request arrived for this long (or it is full), at most 10x this "
                   "long after its oldest request arrived.")
@click.option("--max-tokens", "max_tokens_limit", default=1024, show_default=True, type=click.IntRange(1),
              help="Largest max_tokens a request may ask for.")
@click.option("--max-n", default=8, show_default=True, type=click.IntRange(1), help="Largest n a request may ask for.")
@click.option("--max-body-bytes", default=1 << 20, show_default=True, type=click.IntRange(1024))
@click.option("--provider", default="auto", show_default=True, help="ONNX Runtime execution provider(s) for --backend onnx.")
@click.option("--threads", default=None, type=click.IntRange(1), help="Threads of llama.cpp / torch (default: theirs).")
@click.option("--log-level", default="warning", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
@user_errors
def serve_cmd(target, backend, calibrator, strength, registry, keys, host, port, api_key, model_name, context_window,
              max_queue, max_batch, batch_wait_ms, max_tokens_limit, max_n, max_body_bytes, provider, threads,
              log_level) -> None:
    """Serve TARGET, detoxified, behind an OpenAI-compatible API (/v1/completions, /v1/chat/completions).

    Also GET /v1/models, /health, /ready and /metrics (Prometheus). Per request, "detox": {"strength": λ} or
    {"enabled": false} in the body picks the fusion; responses name the calibrator in the x-detox-calibrator header.
    """
    try:
        import uvicorn

        from detox.serve.app import ServeSettings, create_app
        from detox.serve.model import load_backend
    except ImportError as err:
        raise click.ClickException(f"detox serve needs the serve extra ({err.name} is missing): "
                                   "pip install 'detox[serve]'") from err
    if registry:
        os.environ["DETOX_REGISTRY"] = registry  # resolve_calibrator reads NAME@RANGE from $DETOX_REGISTRY
    if not _is_loopback(host) and not api_key:
        click.echo(f"warning: serving on {host} without --api-key: anyone who reaches this port can use the model",
                   err=True)
    click.echo(f"loading {target} on {backend} ...", err=True)
    served = load_backend(backend, target, calibrator=calibrator, strength=strength, require_signature=keys or None,
                          context_window=context_window, max_batch=max_batch, provider=provider, model_id=model_name,
                          threads=threads)
    settings = ServeSettings(api_key=api_key, max_queue=max_queue, max_body_bytes=max_body_bytes,
                             max_tokens_limit=max_tokens_limit, max_n=max_n, batch_wait=batch_wait_ms / 1000)
    app = create_app(served, settings)
    click.echo(f"serving {served.model_id} ({served.kind}, calibrator {served.calibrator_label}, strength "
               f"{served.default_strength:g}) on http://{host}:{port}/v1", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
