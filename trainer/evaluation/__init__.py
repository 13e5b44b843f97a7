"""Evaluation: sampling (grids, sample sets, the sampler of a checkpoint) and FID."""
