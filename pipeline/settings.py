"""The sampler settings of a run: ``ldm.models.diffusion.settings.SamplingSettings`` (steps S, η, guidance scale,
grid, PLMS), the one type every sampling path takes; re-exported here for the pipeline's steps."""
from ldm.models.diffusion.settings import SamplingSettings, grid_flags, grid_name

__all__ = ["SamplingSettings", "grid_flags", "grid_name"]
