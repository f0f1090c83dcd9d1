"""Adapter density: a shared LoRA fleet against one deployment per adapter (docs/benchmarks/lora.md)."""
