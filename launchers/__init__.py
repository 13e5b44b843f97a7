"""Entry points: the advdit command line, data tools, Slurm; no numerics live here."""
