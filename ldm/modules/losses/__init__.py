from ldm.modules.losses.vq import VQReconstructionLoss  # noqa: F401
