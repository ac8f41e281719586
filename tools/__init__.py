"""Tools around the method: benchmarks of speed and memory (python -m tools.bench), run from the repository root."""
