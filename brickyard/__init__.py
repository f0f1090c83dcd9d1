"""Brickyard: an LLM-aware inference gateway suite for Envoy (shared CLI, local stack, protos)."""

__version__ = "0.1.0"
