"""Start a real ``detox serve`` (uvicorn) in a subprocess on a free loopback port, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """``detox serve ARGS --host 127.0.0.1 --port FREE`` until :meth:`stop`; :meth:`start` waits for ``/ready``."""

    def __init__(self, *args: str, timeout: float = 300.0, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "detox.cli.main", "serve", *args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.timeout = timeout
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        self.proc: subprocess.Popen[str] | None = None

    def launch(self) -> "Server":
        """Start the process and return at once (loading takes a while: start several servers, then wait)."""
        self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=self.env)
        self._deadline = time.monotonic() + self.timeout
        return self

    def start(self) -> "Server":
        """Launch (unless launched) and wait until ``/ready`` answers 200."""
        if self.proc is None:
            self.launch()
        deadline = self._deadline
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read() if self.proc.stdout else ""
                raise RuntimeError(f"detox serve exited with {self.proc.returncode}:\n{out}")
            try:
                if self.get("/ready")[0] == 200:
                    return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"detox serve was not ready within {self.timeout:.0f}s")

    def stop(self) -> str:
        """Stop the server; returns what it printed."""
        if self.proc is None:
            return ""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        out = self.proc.stdout.read() if self.proc.stdout else ""
        self.proc = None
        return out

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as err:
            return err.code, dict(err.headers), err.read()

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        status, _, body = self.request("GET", path, headers=headers)
        return status, body

    def post_json(self, path: str, payload: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        status, hdrs, body = self.request("POST", path, raw, {"Content-Type": "application/json", **(headers or {})})
        try:
            return status, hdrs, json.loads(body)
        except json.JSONDecodeError:
            return status, hdrs, body

    def metric(self, name: str, headers: dict[str, str] | None = None, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
        from prometheus_client.parser import text_string_to_metric_families

        status, text = self.get("/metrics", headers)
        assert status == 200, text
        total = 0.0
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total
