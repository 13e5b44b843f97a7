"""Everything that runs a training job: config, data, objectives, checkpoints, tracking."""
