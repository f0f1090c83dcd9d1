"""vLLM-shaped engine emulator: an OpenAI-compatible HTTP server backed by an engine model."""
