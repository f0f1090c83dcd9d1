"""The gateway's ``gpu-type`` view of emulator profiles: what a GPU type costs and how fast it serves.

Derived from the same step-time model the simulated engines run, so a simulated (or benchmarked) fleet
configures the strategy from the profiles of its own engines, not from numbers typed in twice:

* ``prefill_tokens_per_second``: one full chunk (``max_num_batched_tokens`` tokens from the start of a
  prompt, attention included) divided by its step time;
* ``max_inflight``: the largest decode batch whose step takes at most ``headroom`` x the TPOT objective
  (the rest absorbs the prefill chunks vLLM schedules between decode steps), bounded by the engine's
  ``max_num_seqs`` and by the sequences of ``context_tokens`` its KV cache holds (at least 1);
* ``seconds_per_output_token``: the decode step time at that batch, each sequence ``context_tokens`` long:
  the slowest a pod that is not saturated decodes (above the objective when even one sequence misses it);
* ``cost``: the profile's ``cost_per_hour`` (USD, on-demand list prices cited in the profile's YAML).
"""

from __future__ import annotations

from collections.abc import Iterable

from emulator.profile import Profile, load_profile
from gateway_plugins.config import GpuProfile

#: Prompt plus output tokens of a typical sequence in a decode batch.
CONTEXT_TOKENS = 1024
#: Share of the TPOT objective a decode step may take at ``max_inflight``; measured in the fleet simulator
#: (4 x L4 + 2 x H100, short and long prompts): 1.0 leaves no room for prefill chunks and misses the TPOT
#: objective on the cheap type, 0.8 leaves the cheap type nearly idle.
HEADROOM = 0.9


def gpu_profile(
    profile: Profile,
    *,
    tpot_slo_seconds: float,
    context_tokens: int = CONTEXT_TOKENS,
    headroom: float = HEADROOM,
) -> GpuProfile:
    """The ``gpu-type`` profile of one engine profile (see the module doc)."""
    chunk = profile.max_num_batched_tokens
    prefill = chunk / profile.step_time(chunk, 0, chunk * (chunk + 1) // 2)

    def decode(batch: int) -> float:
        return profile.step_time(batch, batch * context_tokens)

    largest = max(1, min(profile.max_num_seqs, profile.kv_cache_tokens // context_tokens))
    batch = 1
    while batch < largest and decode(batch + 1) <= headroom * tpot_slo_seconds:
        batch += 1
    return GpuProfile(
        cost=profile.cost_per_hour,
        prefill_tokens_per_second=prefill,
        seconds_per_output_token=decode(batch),
        max_inflight=batch,
    )


def gpu_profiles(
    names: Iterable[str],
    *,
    tpot_slo_seconds: float,
    context_tokens: int = CONTEXT_TOKENS,
    headroom: float = HEADROOM,
) -> dict[str, GpuProfile]:
    """``GpuTypeSettings.profiles`` for a fleet of these engine profiles, keyed by each profile's GPU.

    Raises ``ValueError`` when two profiles run on the same GPU: the strategy keys profiles by GPU type only.
    """
    profiles: dict[str, GpuProfile] = {}
    sources: dict[str, str] = {}
    for name in dict.fromkeys(names):
        profile = load_profile(name)
        if profile.gpu in sources:
            raise ValueError(f"profiles {sources[profile.gpu]!r} and {name!r} both run on {profile.gpu!r}")
        sources[profile.gpu] = name
        profiles[profile.gpu] = gpu_profile(
            profile, tpot_slo_seconds=tpot_slo_seconds, context_tokens=context_tokens, headroom=headroom
        )
    return profiles
