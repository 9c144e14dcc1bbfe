"""Benchmarks that write JSON under benchmarks/results/ (a package so that `python -m benchmarks.<name>` finds
these files before any other top-level `benchmarks` on the path)."""
