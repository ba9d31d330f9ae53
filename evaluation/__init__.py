"""Evaluation side of the pipeline: pixel conversion and image I/O now; features, statistics and metrics later."""
