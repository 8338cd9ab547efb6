"""Benchmarks: engine vs HF transformers, and the Triton server under load. `python -m benchmarks.run`."""
