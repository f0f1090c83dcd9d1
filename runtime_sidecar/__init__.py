"""The runtime sidecar that runs beside each engine (metrics to Redis, LoRA adapters, downloads)."""
