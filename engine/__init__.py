"""Training engine: config, optimizer, schedule, losses, loop, checkpoints, logging."""
