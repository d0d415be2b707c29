"""Capture and replay overhead benchmarks; entry point: ``python -m benchmarks.run``."""
