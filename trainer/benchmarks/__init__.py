"""Benchmarks: training throughput (advdit bench) and the 25-Gaussians game (advdit toy)."""
