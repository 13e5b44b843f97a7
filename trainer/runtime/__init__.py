"""What a run stands on: processes and engines, preemption, the run lock, seeding, files."""
