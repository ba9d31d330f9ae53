"""Model side of post-training quantization (BRECQ / AdaRound / learned activation steps). ldm/ knows nothing of it."""
