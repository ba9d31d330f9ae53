"""The pipeline steps as library calls: each ``run(args)`` takes the parsed flags of its script in quant_scripts/
(which only parses them) and does the step: checks first (one line, before any model is built or folder made),
then reuse of an up-to-date artifact, then the work, then one atomic write.

    calibrate            step 1  calibration.pt
    quantize_weights     step 2  w{b}/quant_w{b}.pt
    quantize_activations step 3  w{b}a{b}[sm{b}]/quant_w{b}a{b}[sm{b}].pt
    noise_statistics     step 4  noise_stats.pt
    fit_noise            step 5  gaussian_{tensor,channel}.pt, ptqd.pt, noise_stats.png
    sample_grid          step 6  PNG grids (one sampler, or a comparison)
    evaluation_samples   step 7  samples_<sampler>_n{N}_seed{S}/samples.npz
"""
