"""Sampler-side correction of quantization noise (D²-DPM, arXiv 2501.08180; PTQD, arXiv 2305.10657).

* ``statistics`` -- the sampling settings statistics belong to (``SamplingConfig``), the streaming accumulator of
  per-timestep, per-channel moments of (ε̂, Δ, ε_fp) (``NoiseStatistics``) with its disk spill for the 4σ outlier
  filter, and the collection loop along FP DDIM trajectories.
* ``gaussian`` -- the joint Gaussian of (ε̂, Δ) per timestep, tensor-wise or channel-wise (D²-DPM Eqs. 7-10),
  and its plot (the paper's Fig. 2).
* ``d2`` -- S-D² and D-D² as ``StepCorrection`` objects (Eqs. 11-18, Algorithm 1).
* ``ptqd`` -- PTQD's correlated-noise correction, bias correction and variance schedule calibration.
* ``qncd`` -- QNCD's runtime noise estimation (a probe) as a ``StepCorrection``.
* ``samplers`` -- the construction of each fitted correction from (fit, generator) (``build_sd2``, ``build_dd2``,
  ``build_ptqd``: the factories ``pipeline.corrections`` registers) and the seed's sampler names as thin constructors
  over ``DDIMSampler`` with them (import them from here).

Imports ldm/ only: a correction sees ``(x, t, c) -> ε`` functions and DDIM steps, never a quantized model, and ldm/
knows nothing of this package.
"""
