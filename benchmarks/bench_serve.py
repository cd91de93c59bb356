"""``detox serve`` under load: 1, 8 and 32 concurrent streaming clients, fused vs unfused, in one run.

One server process is started (or ``--url`` names a running one); "unfused" requests carry
``"detox": {"enabled": false}``, which decodes with the unwrapped model: the same process, model and queue, so the
two differ only by the fusion. Rounds alternate unfused/fused at every concurrency (the machine's load drifts).

Per mode and concurrency: generated tokens/s (all clients together, wall clock), p50/p95 time to first token,
p50/p95 time per output token (per request: (last − first token) / (tokens − 1)) and the mean rows per batch (from
the server's ``detox_serve_batch_rows`` metric: how the requests were batched). The last lines are the
fused/unfused throughput ratios, overall and round by round (their spread is the machine's noise).

    nice -n 10 .venv/bin/python benchmarks/bench_serve.py --backend llamacpp --threads 1
    nice -n 10 .venv/bin/python benchmarks/bench_serve.py --backend hf --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

PROMPTS = [
    "The city council met on Tuesday to discuss",
    "Once upon a time, in a small village by the sea,",
    "The best way to learn a new language is",
    "Yesterday I went to the market and",
]


def one_request(client: Any, model: str, prompt: str, tokens: int, fused: bool) -> tuple[float, list[float], int]:
    """(start, arrival time of every chunk with text, completion tokens) of one streaming request."""
    body = {} if fused else {"detox": {"enabled": False}}
    start = time.perf_counter()
    times: list[float] = []
    used = 0
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body=body)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
        if chunk.usage is not None:
            used = chunk.usage.completion_tokens
    return start, times, used


def run_level(url: str, model: str, concurrency: int, requests: int, tokens: int, fused: bool) -> dict[str, float]:
    """``requests`` streaming requests from ``concurrency`` clients (each sends its share one after the other)."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
    results: list[tuple[float, list[float], int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        for j in range(i, max(requests, concurrency), concurrency):
            try:
                r = one_request(client, model, PROMPTS[j % len(PROMPTS)], tokens, fused)
            except BaseException as err:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(err)
                continue
            with lock:
                results.append(r)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]!r}")
    ttft = [times[0] - start for start, times, _ in results if times]
    tpot = [(times[-1] - times[0]) / (n - 1) for _, times, n in results if len(times) > 1 and n > 1]
    total = sum(n for _, _, n in results)
    return {"tokens": total, "wall": wall, "ttft": ttft, "tpot": tpot}


def batch_stats(url: str) -> tuple[float, float]:
    """(batches, rows) the server has decoded so far (its ``detox_serve_batch_rows`` histogram); levels and modes run
    one after the other, so the difference over one run is that run's."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=60) as response:  # noqa: S310 - the local server
        text = response.read().decode()
    got = {"detox_serve_batch_rows_count": 0.0, "detox_serve_batch_rows_sum": 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in got:
                got[sample.name] += sample.value
    return got["detox_serve_batch_rows_count"], got["detox_serve_batch_rows_sum"]


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["llamacpp", "hf", "onnx"], default="llamacpp")
    ap.add_argument("--target", default="smollm2")
    ap.add_argument("--url", default=None, help="Benchmark a running server instead of starting one.")
    ap.add_argument("--model", default="smollm2", help="Model id to send (with --url).")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--requests", type=int, default=32,
                    help="Requests per concurrency level, mode and round (at least one per client).")
    ap.add_argument("--tokens", type=int, default=16, help="max_tokens of every request.")
    ap.add_argument("--rounds", type=int, default=2, help="Unfused/fused alternations at each concurrency.")
    ap.add_argument("--threads", type=int, default=None, help="--threads of the server.")
    ap.add_argument("--max-batch", type=int, default=16)
    args = ap.parse_args()

    server = None
    url = args.url
    if url is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from serve_helpers import Server

        extra = ["--threads", str(args.threads)] if args.threads else []
        server = Server("--backend", args.backend, "--target", args.target, "--max-queue", "256",
                        "--max-batch", str(args.max_batch), *extra).start()
        url = server.url
    levels = [int(c) for c in args.concurrency.split(",")]
    try:
        one_request(__import__("openai").OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0), args.model,
                    PROMPTS[0], 4, True)  # warm-up
        totals: dict[tuple[int, bool], dict[str, Any]] = {}
        for _ in range(args.rounds):
            for c in levels:
                for fused in (False, True):
                    before = batch_stats(url)
                    r = run_level(url, args.model, c, args.requests, args.tokens, fused)
                    after = batch_stats(url)
                    acc = totals.setdefault((c, fused), {"tokens": 0, "wall": 0.0, "ttft": [], "tpot": [], "rounds": [],
                                                         "batches": 0.0, "rows": 0.0})
                    acc["tokens"] += r["tokens"]
                    acc["wall"] += r["wall"]
                    acc["ttft"] += r["ttft"]
                    acc["tpot"] += r["tpot"]
                    acc["rounds"].append(r["tokens"] / r["wall"])
                    acc["batches"] += after[0] - before[0]
                    acc["rows"] += after[1] - before[1]
                    print(f"  round: {c:>2} clients {'fused' if fused else 'unfused':>7}: "
                          f"{r['tokens'] / r['wall']:7.1f} tok/s, {after[0] - before[0]:.0f} batches",
                          file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()

    print(f"backend {args.backend}, target {args.target}, max_tokens {args.tokens}, {args.requests} requests per "
          f"level, mode and round, {args.rounds} rounds")
    print(f"{'clients':>7} {'mode':>8} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p95':>9} {'TPOT p50':>9} {'TPOT p95':>9} "
          f"{'rows/batch':>10}")
    for c in levels:
        for fused in (False, True):
            a = totals[(c, fused)]
            print(f"{c:>7} {'fused' if fused else 'unfused':>8} {a['tokens'] / a['wall']:>8.1f} "
                  f"{1000 * pct(a['ttft'], 50):>7.0f}ms {1000 * pct(a['ttft'], 95):>7.0f}ms "
                  f"{1000 * pct(a['tpot'], 50):>7.1f}ms {1000 * pct(a['tpot'], 95):>7.1f}ms "
                  f"{a['rows'] / max(a['batches'], 1):>10.1f}")
    for c in levels:
        u, f = totals[(c, False)], totals[(c, True)]
        ratio = (f["tokens"] / f["wall"]) / (u["tokens"] / u["wall"])
        each = ", ".join(f"{fr / ur:.3f}x" for ur, fr in zip(u["rounds"], f["rounds"]))
        print(f"fused/unfused throughput at {c:>2} clients: {ratio:.3f}x (round by round: {each})")


if __name__ == "__main__":
    main()
