"""Side-by-side decoding speed: the same generation with and without fusion, interleaved in one run.

Interleaving the two (plain, fused, plain, fused, ...) after a warm-up keeps slow drifts of a shared machine
from favouring either side; the median of the repetitions is reported.
"""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping


@dataclass
class BenchResult:
    tokens: int
    plain_seconds: list[float]
    fused_seconds: list[float]

    @property
    def plain_tps(self) -> float:
        return self.tokens / statistics.median(self.plain_seconds)

    @property
    def fused_tps(self) -> float:
        return self.tokens / statistics.median(self.fused_seconds)

    @property
    def ratio(self) -> float:
        """Fused time over unfused time for the same number of tokens (1.00x = free)."""
        return statistics.median(self.fused_seconds) / statistics.median(self.plain_seconds)

    @property
    def added_ms_per_token(self) -> float:
        """What fusion adds to each token, in milliseconds: comparable across machine states where the ratio is not
        (the same added cost is a smaller ratio when the target itself runs slower)."""
        return 1000.0 * (statistics.median(self.fused_seconds) - statistics.median(self.plain_seconds)) / self.tokens


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_arms(arms: Mapping[str, Callable[[], Any]], repetitions: int) -> dict[str, list[float]]:
    """Wall time of each arm (name -> call), ``repetitions`` times, interleaved (a, b, c, a, b, c, ...) so that slow
    drifts of the machine favour none; warm the arms up first."""
    times: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(repetitions):
        for name, fn in arms.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def compare(plain: Callable[[], int], fused: Callable[[], int], repetitions: int = 5, warmup: int = 1) -> BenchResult:
    """Run ``plain`` and ``fused`` (each returns the number of tokens it generated) alternately; time each call."""
    for _ in range(warmup):
        plain()
        fused()
    counts: list[int] = []

    def counted(fn: Callable[[], int]) -> Callable[[], None]:
        def run() -> None:
            counts.append(fn())
            if counts[-1] != counts[0]:
                raise RuntimeError(f"runs generated different token counts ({counts[-1]} vs {counts[0]}); "
                                   "force a fixed length")
        return run

    times = time_arms({"plain": counted(plain), "fused": counted(fused)}, repetitions)
    return BenchResult(tokens=counts[0], plain_seconds=times["plain"], fused_seconds=times["fused"])


def format_result(r: BenchResult, backend: str) -> str:
    return "\n".join([
        f"backend: {backend}, {r.tokens} new tokens per run, {len(r.plain_seconds)} repetitions (median)",
        f"unfused: {r.plain_tps:.2f} tok/s",
        f"fused:   {r.fused_tps:.2f} tok/s",
        f"fusion adds {r.added_ms_per_token:.2f} ms per token",
        f"fused/unfused time: {r.ratio:.2f}x",
    ])
