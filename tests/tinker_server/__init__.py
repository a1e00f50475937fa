"""A real Tinker-protocol server (skyrl, JAX on CPU) for spar's tests: see bootstrap.py."""
