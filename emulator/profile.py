"""Engine profiles: one (model, GPU) pair, its memory plan and its step-time model.

A profile is a YAML file in ``emulator/profiles/``; its name is the file stem. It holds public facts (model
shape, vendor datasheet numbers, cloud price) and three fitted numbers (how much of the memory bandwidth and
of the tensor-core peak vLLM achieves, and a fixed per-step overhead). Everything else is derived here, so a
reader can check each coefficient against the roofline that justifies it (docs/emulator-model.md).

Step time of one scheduler iteration (one forward pass over the batch), in seconds::

    t = overhead
        + max(weights_s, token_s * num_tokens) * (1 + lora_slowdown if the batch has LoRA requests)
        + kv_token_s * kv_tokens_read
        + attention_pair_s * prefill_attention_pairs

* ``weights_s``: streaming every weight once from HBM; the floor of any step, which is why decode of a
  small batch costs the same as decode of one sequence (memory bound).
* ``token_s * num_tokens``: the dense layers' FLOPs (2 x parameters per token); it overtakes the weight
  read beyond a few hundred tokens per step, which is where prefill lives (compute bound).
* ``kv_token_s * kv_tokens_read``: reading the KV cache of every scheduled sequence (its context length);
  what makes decode slower as batches and contexts grow.
* ``attention_pair_s * pairs``: attention FLOPs of prefill chunks, quadratic in the prompt length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROFILES_DIR = Path(__file__).with_name("profiles")
GIB = 1024**3
#: vLLM's default KV block size on GPUs.
BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class Source:
    """A public number a profile rests on: a measurement, a datasheet figure, a price, or a derivation."""

    title: str
    url: str
    figure: str
    kind: str  # "measured", "datasheet", "price" or "derived"


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    model: str
    gpu: str
    tensor_parallel: int
    #: USD per hour for all ``tensor_parallel`` GPUs.
    cost_per_hour: float
    # Model shape (from the model's config.json).
    params_billion: float
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    # One GPU, from the vendor datasheet (dense BF16, no sparsity).
    gpu_memory_gib: float
    memory_bandwidth_gbps: float
    bf16_tflops: float
    # vLLM's memory plan, per GPU.
    weights_gib: float
    gpu_memory_utilization: float
    reserve_gib: float
    # Fitted to public measurements (see ``fitted_to``).
    bandwidth_efficiency: float
    compute_efficiency: float
    step_overhead_s: float
    # LoRA.
    lora_load_s: float
    lora_slowdown: float
    # vLLM serving defaults for this GPU class.
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    max_loras: int
    fitted_to: tuple[Source, ...]
    block_size: int = BLOCK_SIZE
    # Derived in __post_init__.
    kv_bytes_per_token: int = field(init=False)
    num_blocks: int = field(init=False)
    weights_s: float = field(init=False)
    token_s: float = field(init=False)
    kv_token_s: float = field(init=False)
    attention_pair_s: float = field(init=False)

    def __post_init__(self) -> None:
        if self.num_kv_heads % self.tensor_parallel:
            raise ValueError(
                f"{self.name}: {self.num_kv_heads} KV heads do not split over TP {self.tensor_parallel}"
            )
        tp = self.tensor_parallel
        bandwidth = self.memory_bandwidth_gbps * 1e9 * self.bandwidth_efficiency
        flops = self.bf16_tflops * 1e12 * self.compute_efficiency
        # K and V, every layer, this GPU's share of the KV heads.
        kv_bytes = self.num_layers * (self.num_kv_heads // tp) * self.head_dim * 2 * self.dtype_bytes
        kv_memory = self.gpu_memory_gib * self.gpu_memory_utilization - self.weights_gib - self.reserve_gib
        derived = {
            "kv_bytes_per_token": kv_bytes,
            "num_blocks": math.floor(kv_memory * GIB / (kv_bytes * self.block_size)),
            "weights_s": self.weights_gib * GIB / bandwidth,
            "token_s": 2 * self.params_billion * 1e9 / tp / flops,
            "kv_token_s": kv_bytes / bandwidth,
            # QK^T and AV: 2 FLOPs per multiply-add, head_dim each, every head and layer.
            "attention_pair_s": 4 * self.num_layers * self.num_attention_heads * self.head_dim / tp / flops,
        }
        for key, value in derived.items():
            object.__setattr__(self, key, value)
        if self.num_blocks <= 0:
            raise ValueError(f"{self.name}: no memory left for the KV cache")

    def step_time(
        self, num_tokens: int, kv_tokens_read: int, prefill_attention_pairs: int = 0, lora: bool = False
    ) -> float:
        """Seconds for one forward pass over ``num_tokens`` scheduled tokens."""
        dense = self.token_s * num_tokens
        dense = max(dense, self.weights_s)
        if lora:
            dense *= 1.0 + self.lora_slowdown
        return (
            self.step_overhead_s
            + dense
            + self.kv_token_s * kv_tokens_read
            + self.attention_pair_s * prefill_attention_pairs
        )

    @property
    def kv_cache_tokens(self) -> int:
        return self.num_blocks * self.block_size


def list_profiles() -> list[str]:
    return sorted(path.stem for path in PROFILES_DIR.glob("*.yaml"))


def load_profile(name_or_path: str | Path) -> Profile:
    """Load a profile by name (``llama-3.1-8b_h100``) or from a YAML file path."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PROFILES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"no profile {name_or_path!r}; known: {', '.join(list_profiles())}")
    return profile_from_dict(path.stem, yaml.safe_load(path.read_text()))


def profile_from_dict(name: str, data: dict[str, Any]) -> Profile:
    arch, hardware, memory = data["architecture"], data["hardware"], data["memory"]
    step, lora, defaults = data["step_time"], data["lora"], data["defaults"]
    return Profile(
        name=name,
        model=data["model"],
        gpu=data["gpu"],
        tensor_parallel=int(data["tensor_parallel"]),
        cost_per_hour=float(data["cost_per_hour"]),
        params_billion=float(arch["params_billion"]),
        num_layers=int(arch["num_layers"]),
        num_attention_heads=int(arch["num_attention_heads"]),
        num_kv_heads=int(arch["num_kv_heads"]),
        head_dim=int(arch["head_dim"]),
        dtype_bytes=int(arch["dtype_bytes"]),
        gpu_memory_gib=float(hardware["gpu_memory_gib"]),
        memory_bandwidth_gbps=float(hardware["memory_bandwidth_gbps"]),
        bf16_tflops=float(hardware["bf16_tflops"]),
        weights_gib=float(memory["weights_gib"]),
        gpu_memory_utilization=float(memory.get("gpu_memory_utilization", 0.9)),
        reserve_gib=float(memory["reserve_gib"]),
        bandwidth_efficiency=float(step["bandwidth_efficiency"]),
        compute_efficiency=float(step["compute_efficiency"]),
        step_overhead_s=float(step["step_overhead_s"]),
        lora_load_s=float(lora["load_s"]),
        lora_slowdown=float(lora["slowdown"]),
        max_num_seqs=int(defaults["max_num_seqs"]),
        max_num_batched_tokens=int(defaults["max_num_batched_tokens"]),
        max_model_len=int(defaults["max_model_len"]),
        max_loras=int(defaults["max_loras"]),
        fitted_to=tuple(Source(**source) for source in data["fitted_to"]),
    )
