"""Helpers that make checkpoints and inputs for the tests, the benchmarks and `sgl-ascend selftest`."""
