"""Fleet simulator speed: wall seconds for 10 virtual minutes of a 100-engine fleet.

    python -m bench.simulator_speed [--engines 100] [--duration 600] [--loads 0.05,0.1,0.25]

Load is a fraction of the fleet's capacity for the workload (as in ``python -m bench.routing``); the
workload is generated before the clock starts. Metrics scraping (every 50 ms, 50 ms delay) is on, and
routing uses least-request over all engines, as in a real run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from emulator.capacity import saturation_throughput
from emulator.simulator import FleetSimulator, FleetSpec
from emulator.workloads import WorkloadSpec, generate

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", type=int, default=100)
    parser.add_argument("--duration", type=float, default=600.0)
    parser.add_argument("--loads", default="0.05,0.1,0.25")
    parser.add_argument("--workloads", default="no-sharing,shared-prefix")
    parser.add_argument("--profile", default="llama-3.1-8b_h100")
    args = parser.parse_args()
    rows = []
    for workload in args.workloads.split(","):
        capacity = saturation_throughput(workload, args.profile)
        for load in (float(x) for x in args.loads.split(",")):
            rate = load * capacity * args.engines
            requests = list(generate(workload, WorkloadSpec(rate=rate, duration=args.duration, seed=1)))
            started = time.perf_counter()
            result = FleetSimulator(FleetSpec(engines=args.engines, profile=args.profile)).run(requests)
            wall = time.perf_counter() - started
            row = {
                "workload": workload,
                "load": load,
                "requests": len(requests),
                "rate": rate,
                "wall_s": wall,
                "ttft_p50_ms": result.summary()["ttft_p50_ms"],
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = REPO / "bench" / "results" / "simulator_speed.json"
    out.write_text(json.dumps({"engines": args.engines, "duration": args.duration, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
