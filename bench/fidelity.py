"""Emulator fidelity: the engine model against the public measurements its profiles cite.

    python -m bench.fidelity [--out docs/benchmarks/fidelity.md]

Each scenario replays the published benchmark's shape (request count, input and
output lengths, concurrency) on the engine model and puts the model's numbers
next to the published ones. "In-sample" rows are figures a profile was fitted
to (they check that the fit survives the full scheduler, batching and all);
"out-of-sample" rows were not used for fitting.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from emulator.engine import EngineCore, Request
from emulator.profile import PROFILES_DIR, Profile, load_profile, profile_from_dict

REPO = Path(__file__).resolve().parents[1]

#: LambdaLabsML/vllm-benchmark, results/prompt_10/<GPU>/Meta-Llama-3-8B-Instruct_tp1_len2048.json (vLLM 0.6.0,
#: 10 ShareGPT prompts sent at once). Output lengths differ slightly between the two runs (sampling).
LAMBDA_INPUTS = [13, 25, 27, 10, 329, 29, 399, 328, 4, 205]
LAMBDA_RUNS = {
    "llama-3.1-8b_h100": {
        "outputs": [120, 429, 233, 194, 101, 741, 9, 3, 6, 31],
        "duration_s": 5.367,
        "mean_ttft_ms": 62.4,
        "output_tps": 347.9,
        "step_ms": 7.23,
    },
    "llama-3.1-8b_a100": {
        "outputs": [120, 507, 233, 194, 101, 741, 9, 3, 6, 31],
        "duration_s": 8.585,
        "mean_ttft_ms": 126.9,
        "output_tps": 226.5,
        "step_ms": 11.50,
    },
}
LAMBDA_SOURCE = "https://github.com/LambdaLabsML/vllm-benchmark (results/prompt_10, len2048)"

#: johnmusgrave.com "vLLM throughput-latency sweep on NVIDIA A100": Llama-3.1-8B-Instruct BF16 on one A100
#: 40GB, vLLM 0.23, 1024 input / 128 output tokens (ignore_eos), closed loop at concurrency C.
SWEEP_SOURCE = "https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on"
SWEEP_POINTS = {1: 75.0, 8: 75.0 * 6.6}  # output tokens/s: "about 75 tokens/sec" at C=1, "a 6.6x gain" at C=8


@dataclass
class Row:
    scenario: str
    metric: str
    published: float
    model: float
    sample: str

    @property
    def error(self) -> float:
        return (self.model - self.published) / self.published


def _prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(1, 32_000) for _ in range(length)]


def lambda_prompt10(name: str) -> list[Row]:
    """All ten requests at t=0; the published TTFT includes ~30 ms of vLLM CPU time the model leaves out."""
    measured = LAMBDA_RUNS[name]
    core = EngineCore(load_profile(name), max_model_len=2048)
    rng = random.Random(0)
    for i, (prompt, output) in enumerate(zip(LAMBDA_INPUTS, measured["outputs"], strict=True)):
        core.add_request(Request(f"r{i}", _prompt(rng, prompt), output), 0.0)
    out = core.advance(0.0, float("inf"))
    results = out.finished
    duration = max(r.finished for r in results)
    ttft = sum(r.ttft for r in results if r.ttft is not None) / len(results) * 1000
    stats = core.stats()
    itl = stats.histograms["inter_token_latency"]
    label = f"{name} (Lambda, 10 prompts at once)"
    return [
        Row(label, "duration (s)", measured["duration_s"], duration, "out-of-sample"),
        Row(
            label,
            "output tokens/s",
            measured["output_tps"],
            stats.generation_tokens / duration,
            "out-of-sample",
        ),
        Row(label, "mean TTFT (ms)", measured["mean_ttft_ms"], ttft, "in-sample"),
        Row(label, "decode step (ms)", measured["step_ms"], itl.sum / itl.count * 1000, "in-sample"),
    ]


def a100_40gb() -> Profile:
    """The A100 80GB profile's fitted efficiencies on the 40GB card (1,555 GB/s, 40 GB): nothing refitted."""
    data = yaml.safe_load((PROFILES_DIR / "llama-3.1-8b_a100.yaml").read_text())
    data["gpu"] = "NVIDIA A100 40GB SXM"
    data["hardware"].update(gpu_memory_gib=39.4, memory_bandwidth_gbps=1555)
    return profile_from_dict("llama-3.1-8b_a100-40gb", data)


def closed_loop(profile: Profile, concurrency: int, prompts: int, input_len: int, output_len: int) -> float:
    """Output tokens per second with ``concurrency`` clients, each sending its next request on completion."""
    core = EngineCore(profile, max_model_len=input_len + output_len)
    rng = random.Random(concurrency)
    issued = 0

    def issue(now: float) -> None:
        nonlocal issued
        core.add_request(Request(f"r{issued}", _prompt(rng, input_len), output_len), now)
        issued += 1

    for _ in range(concurrency):
        issue(0.0)
    now, tokens = 0.0, 0
    while core.has_unfinished_requests:
        out = core.step(now)
        now = out.end
        for result in out.finished:
            tokens += result.output_tokens
            if issued < prompts:
                issue(now)
    return tokens / now


def sweep() -> list[Row]:
    profile = a100_40gb()
    return [
        Row(
            f"A100 40GB (sweep), concurrency {c}",
            "output tokens/s",
            published,
            closed_loop(profile, c, 20 * c, 1024, 128),
            "out-of-sample",
        )
        for c, published in SWEEP_POINTS.items()
    ]


def report(rows: list[Row]) -> str:
    lines = [
        "# Emulator fidelity",
        "",
        "The engine model replaying published vLLM benchmarks (command: `python -m bench.fidelity`).",
        f"Sources: {LAMBDA_SOURCE}; {SWEEP_SOURCE}. How each profile was fitted: "
        "[emulator-model.md](../emulator-model.md).",
        "",
        "| scenario | metric | published | model | error | fit |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.scenario} | {r.metric} | {r.published:.1f} | {r.model:.1f} | {r.error:+.0%} | {r.sample} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "fidelity.md")
    args = parser.parse_args()
    rows = lambda_prompt10("llama-3.1-8b_h100") + lambda_prompt10("llama-3.1-8b_a100") + sweep()
    text = report(rows)
    args.out.write_text(text)
    (REPO / "bench" / "results" / "fidelity.json").write_text(
        json.dumps([r.__dict__ for r in rows], indent=1)
    )
    print(text)


if __name__ == "__main__":
    main()
