"""Building blocks of the adapter-density benchmark (bench/lora) on tiny configurations."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from bench.lora.__main__ import duration_for, parse_rates
from bench.lora.density import (
    DedicatedSizer,
    Setup,
    Slo,
    Trial,
    adapter_rates,
    minimal_count,
    rate_bucket,
    run_trial,
    size_dedicated,
    size_dense,
)

#: 6 adapters, short requests, 2 slots per dense engine; a TTFT bound tight enough that slots matter.
DENSE = Setup(adapters=6, prompt_tokens=128, output_tokens=32, max_loras=2, slo=Slo(250.0, 100.0))
#: 3 adapters on L4 (slow decode), so the busiest adapter needs several engines of its own.
DEDICATED = Setup(profile="llama-3.1-8b_l4", adapters=3, prompt_tokens=128, output_tokens=32)


def _threshold(minimum: int, seen: list[int]) -> Callable[[int], Trial]:
    def evaluate(n: int) -> Trial:
        seen.append(n)
        return Trial(n, n >= minimum, {}, 0)

    return evaluate


@pytest.mark.parametrize("minimum", [1, 2, 5, 17])
@pytest.mark.parametrize("start", [1, 4, 5, 30])
def test_minimal_count_finds_the_threshold_and_its_witness(minimum: int, start: int) -> None:
    seen: list[int] = []
    sizing = minimal_count(_threshold(minimum, seen), start)
    assert sizing.engines == minimum
    assert sizing.at.met
    if minimum > 1:
        assert sizing.one_fewer is not None and not sizing.one_fewer.met
    else:
        assert sizing.one_fewer is None
    assert len(seen) == len(set(seen))  # each count simulated once
    assert len(seen) <= 2 * math.ceil(math.log2(abs(start - minimum) + 2)) + 2


def test_minimal_count_gives_up_past_its_limit() -> None:
    with pytest.raises(RuntimeError):
        minimal_count(_threshold(100, []), 1, limit=50)


def test_slo_percentiles_and_empty_runs() -> None:
    slo = Slo(1000.0, 100.0)
    base = {"rejected": 0, "ttft_p99_ms": 900.0, "tpot_p99_ms": 99.0}
    assert slo.met(base)
    assert not slo.met({**base, "ttft_p99_ms": 1001.0})
    assert not slo.met({**base, "tpot_p99_ms": 101.0})
    assert not slo.met({**base, "rejected": 1})
    assert slo.met({"rejected": 0, "ttft_p99_ms": math.nan, "tpot_p99_ms": math.nan})  # nothing arrived


def test_adapter_rates_follow_zipf_and_buckets_round_in_log_scale() -> None:
    rates = adapter_rates(50.0, 50, 1.1)
    assert sum(rates) == pytest.approx(50.0)
    assert rates == sorted(rates, reverse=True)
    assert rates[0] / rates[1] == pytest.approx(2**1.1)
    assert rate_bucket(1.1**7 * 1.04, 1.1) == 7
    assert rate_bucket(1.1**7 / 1.04, 1.1) == 7
    assert rate_bucket(1.1**7 * 1.06, 1.1) == 8


def test_duration_and_rate_arguments() -> None:
    assert duration_for(5.0, minimum=120, requests=18000, maximum=3600) == 3600
    assert duration_for(50.0, minimum=120, requests=18000, maximum=3600) == 360
    assert duration_for(800.0, minimum=120, requests=18000, maximum=3600) == 120
    assert parse_rates("low=5,20,high=800") == [("low", 5.0), ("20", 20.0), ("high", 800.0)]


def test_dense_sizing_returns_the_minimal_fleet() -> None:
    """Six adapters over two slots per engine: one engine fewer than the answer misses the TTFT bound."""
    requests = DENSE.workload(40.0, 20.0)
    sizing = size_dense(DENSE, requests, 1)
    assert sizing.engines > 1
    again = run_trial(DENSE, requests, sizing.engines, dense=True)
    fewer = run_trial(DENSE, requests, sizing.engines - 1, dense=True)
    assert again.met and not fewer.met  # independent reruns (the simulation is deterministic)
    assert fewer.summary["ttft_p99_ms"] > DENSE.slo.ttft_p99_ms
    assert again.adapter_loads > DENSE.adapters  # slots are shared: adapters are swapped in and out


def test_dedicated_sizing_is_per_adapter_and_cached_per_bucket() -> None:
    sizer = DedicatedSizer(DEDICATED, 20.0)
    rows = size_dedicated(DEDICATED, 40.0, sizer)
    engines = [row["engines"] for row in rows]
    assert engines == sorted(engines, reverse=True) and engines[-1] == 1 and engines[0] >= 3
    for row in rows:
        bucket = rate_bucket(row["rate"], DEDICATED.bucket_ratio)
        sizing = sizer.buckets[bucket]
        assert row["bucket_rate"] == pytest.approx(row["rate"], rel=0.05)
        assert sizing.at.met
        assert sizing.at.adapter_loads == sizing.engines  # each engine loads its adapter once
        if sizing.engines > 1:
            assert sizing.one_fewer is not None and not sizing.one_fewer.met
    busiest = sizer.buckets[rate_bucket(rows[0]["rate"], DEDICATED.bucket_ratio)]
    requests = DEDICATED.workload(sizer.bucket_rate(rate_bucket(rows[0]["rate"], 1.1)), 20.0, adapters=1)
    assert not run_trial(DEDICATED, requests, busiest.engines - 1, dense=False).met
    # The dense search starts at the total over the lowest per-engine rate a deployment missed at.
    missed = min(sizer.bucket_rate(b) / (s.engines - 1) for b, s in sizer.buckets.items() if s.engines > 1)
    assert sizer.fleet_hint(40.0) == math.ceil(40.0 / missed)
    # A rate in an already sized bucket is not simulated again.
    searches = dict(sizer.buckets)
    bucket, sizing = sizer.size(rows[0]["rate"] * 1.01)
    assert sizer.buckets == searches and sizing is searches[bucket]
