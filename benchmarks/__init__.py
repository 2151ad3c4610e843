"""Benchmarks: `python -m benchmarks {serving,training,quality,all,readme} [--quick]`."""
