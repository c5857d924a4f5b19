"""Side-by-side performance benchmarks: scripts (`python benchmarks/bench_*.py`) and packages run
as modules from the repository root (`python -m benchmarks.pools`). Results: `RESULTS.md`."""
