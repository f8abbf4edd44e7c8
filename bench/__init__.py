"""vitfuse benchmarks: python -m pytest bench/ [--benchmark]. See conftest.py."""
