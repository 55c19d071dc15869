"""Benchmarks of the gateway: `python -m benchmarks.run` (see benchmarks/README.md)."""
