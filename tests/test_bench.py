"""The side-by-side benchmark's bookkeeping (not a timed test: only counts and arithmetic are checked)."""

import pytest

from detox.bench import BenchResult, compare, format_result


def test_result_arithmetic_and_last_line():
    r = BenchResult(tokens=10, plain_seconds=[1.0, 2.0, 3.0], fused_seconds=[2.0, 2.2, 9.0])
    assert r.plain_tps == pytest.approx(5.0)
    assert r.fused_tps == pytest.approx(10 / 2.2)
    assert r.ratio == pytest.approx(1.1)
    assert r.added_ms_per_token == pytest.approx(20.0)  # (2.2 s − 2.0 s) / 10 tokens
    lines = format_result(r, "hf").splitlines()
    assert lines[-2:] == ["fusion adds 20.00 ms per token", "fused/unfused time: 1.10x"]


def test_compare_interleaves_and_counts():
    calls = []
    plain = lambda: calls.append("p") or 4  # noqa: E731
    fused = lambda: calls.append("f") or 4  # noqa: E731
    r = compare(plain, fused, repetitions=3, warmup=1)
    assert calls == ["p", "f"] * 4 and r.tokens == 4 and len(r.fused_seconds) == 3


def test_compare_refuses_unequal_lengths():
    n = iter([4, 4, 4, 5])
    with pytest.raises(RuntimeError, match="fixed length"):
        compare(lambda: next(n), lambda: next(n), repetitions=1, warmup=1)


def test_time_arms_interleaves():
    from detox.bench import time_arms

    calls = []
    arms = {name: (lambda name=name: calls.append(name)) for name in ("unfused", "a", "b")}
    times = time_arms(arms, repetitions=2)
    assert calls == ["unfused", "a", "b"] * 2 and all(len(t) == 2 for t in times.values())
