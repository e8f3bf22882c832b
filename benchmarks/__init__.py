"""Reference implementations the benchmark compares against (not part of the package)."""
