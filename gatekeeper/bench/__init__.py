"""bench/: performance benchmarks (no effect on verdicts)."""
