"""Data pipelines: stage 1 per backend (ffcv, dali, reference, synthetic), stage 2 shared (augment)."""
