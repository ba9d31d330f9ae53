"""Model side of post-training quantization (BRECQ / AdaRound / learned activation steps / QNCD smoothing): one
entry point, ``quant.api.quantize(unet, QuantConfig, filter_fn)``. Imports ldm/ only; knows nothing of sampling."""
