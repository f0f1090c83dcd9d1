"""Wall time of the engine model per 600 virtual seconds: what a fleet simulator pays per engine.

    python bench/engine_speed.py [--rates 5,20,65] [--duration 600] [--profile llama-3.1-8b_h100]
                                 [--only-rates] [--shared-rate 40] [--repeat 1]

One ``EngineCore`` is driven the way the fleet simulator drives it: ``advance(now, arrival)`` up to each
Poisson arrival, then ``add_request``, then ``advance(now, inf)`` to drain. Workloads (built before the
clock starts, seeded):

* ``random``: prompts of 175-275 random one-token words (no sharing), outputs ~200 tokens (Gaussian,
  sd 40), at each rate in ``--rates``. At 65 req/s this is the regime docs/emulator-model.md describes:
  ~70% of an 8B/H100 engine's capacity, ~160 running requests, about one arrival per ~12 ms step;
* ``random, 400-600``: the same with prompts of 400-600 tokens at the highest rate; at 65 req/s that
  overloads the engine (the queue grows for the whole run, ~1000 requests running): the saturated regime;
* ``shared-prefix``: ``emulator.workloads.shared_prefix`` (8 system prompts of 1024 tokens, Zipf
  popularity, a short question each; ~1090-token prompts, mostly cached) at ``--shared-rate`` (40 req/s,
  ~120 running; at 65 req/s the KV reads of 1000-token contexts saturate the engine).

Each row prints the requests, engine steps, wall seconds, and a digest of the results (per-request times
rounded to the microsecond, token counts, preemptions, counters) so that two versions of the engine can be
checked for equal output as well as timed.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``emulator`` importable from the repository root
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import numpy as np

from emulator import tokens
from emulator.engine import EngineCore, Request, RequestResult
from emulator.profile import load_profile
from emulator.workloads import WorkloadSpec, shared_prefix


def random_workload(
    rate: float, duration: float, prompt: tuple[int, int] = (175, 275), seed: int = 1
) -> list[Request]:
    """Poisson arrivals, prompts of ``prompt`` (an inclusive range) random words, outputs ~N(200, 40)."""
    rng, np_rng, vocab = random.Random(seed), np.random.default_rng(seed), tokens.vocabulary()
    requests, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            return requests
        ids = vocab.segment(np_rng, rng.randint(*prompt))
        output = max(1, round(rng.gauss(200, 40)))
        requests.append(Request(f"r{len(requests)}", ids, output, arrival=t))


def shared_prefix_workload(rate: float, duration: float, seed: int = 1) -> list[Request]:
    spec = WorkloadSpec(rate=rate, duration=duration, seed=seed)
    return [
        Request(f"r{i}", w.prompt_ids, w.max_tokens, arrival=w.arrival)
        for i, w in enumerate(shared_prefix(spec))
    ]


def drive(engine: EngineCore, requests: list[Request]) -> tuple[list[RequestResult], int]:
    """The fleet simulator's loop: advance to each arrival, add it, drain at the end."""
    results: list[RequestResult] = []
    now, steps = 0.0, 0
    for request in requests:
        arrival = request.arrival or 0.0
        out = engine.advance(now, arrival)
        results.extend(out.finished)
        steps += out.num_steps
        now = max(out.end, arrival)
        engine.add_request(request, arrival)
    out = engine.advance(now, math.inf)
    return [*results, *out.finished], steps + out.num_steps


def digest(engine: EngineCore, results: list[RequestResult]) -> str:
    """A short fingerprint of every request's outcome and the engine's counters and histogram counts."""
    h = hashlib.sha256()
    for r in sorted(results, key=lambda r: r.request_id):
        h.update(
            f"{r.request_id} {r.first_scheduled:.6f} {r.first_token:.6f} {r.finished:.6f} "
            f"{r.output_tokens} {r.cached_prompt_tokens} {r.preemptions}\n".encode()
        )
    stats = engine.stats()
    h.update(
        f"{stats.prefix_cache_queries} {stats.prefix_cache_hits} {stats.prompt_tokens} "
        f"{stats.generation_tokens} {stats.num_preemptions} {stats.requests_finished}".encode()
    )
    for name, histogram in sorted(stats.histograms.items()):
        h.update(f"{name} {histogram.counts} {histogram.sum:.3f}".encode())
    return h.hexdigest()[:12]


def measure(name: str, requests: list[Request], profile: str, repeat: int) -> None:
    best = math.inf
    for _ in range(repeat):
        engine = EngineCore(load_profile(profile))
        start = time.perf_counter()
        results, steps = drive(engine, requests)
        best = min(best, time.perf_counter() - start)
    print(f"{name:<28} {len(requests):>8} {steps:>8} {best:>8.2f} s  {digest(engine, results)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rates", default="5,20,65", help="requests per second, comma separated")
    parser.add_argument("--duration", type=float, default=600.0, help="virtual seconds of arrivals")
    parser.add_argument("--profile", default="llama-3.1-8b_h100")
    parser.add_argument(
        "--only-rates", action="store_true", help="skip the 400-600-token and shared-prefix rows"
    )
    parser.add_argument("--shared-rate", type=float, default=40.0, help="rate of the shared-prefix row")
    parser.add_argument("--repeat", type=int, default=1, help="runs per row; the best is printed")
    args = parser.parse_args()
    rates = [float(rate) for rate in args.rates.split(",")]
    print(f"{args.profile}, {args.duration:g} virtual seconds per row")
    print(f"{'workload':<28} {'requests':>8} {'steps':>8} {'wall':>8}    digest")
    for rate in rates:
        measure(f"random {rate:g} req/s", random_workload(rate, args.duration), args.profile, args.repeat)
    if not args.only_rates:
        rate = max(rates)
        requests = random_workload(rate, args.duration, prompt=(400, 600))
        measure(f"random, 400-600 {rate:g} req/s", requests, args.profile, args.repeat)
        requests = shared_prefix_workload(args.shared_rate, args.duration)
        measure(f"shared-prefix {args.shared_rate:g} req/s", requests, args.profile, args.repeat)


if __name__ == "__main__":
    main()
