"""Checkpoints: the store (save, verify, resume, convert) and export of weights."""
