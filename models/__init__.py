"""Networks and the diffusion process; nothing here imports the trainer."""
