"""A LoRA adapter on disk, as the emulated engine (like vLLM) accepts one: a directory with its config."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import MODEL


def adapter(root: Path, name: str) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": 8, "lora_alpha": 16, "base_model": MODEL}))
    (path / "adapter_model.safetensors").write_bytes(b"\x00" * 4096)
    return path
