"""Benchmark harness for loopwatch: prints figures, is not a test (``python -m benchmarks.run``)."""
