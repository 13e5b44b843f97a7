"""The sbatch template that ``advdit slurm submit`` renders, shipped as package data."""
