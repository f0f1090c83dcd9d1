"""Benchmarks. Each writes JSON to bench/results/ and a markdown report to docs/; see docs/benchmarks.md."""
