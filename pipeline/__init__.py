"""The assembly layer between the libraries (ldm/, quant/, correction/, evaluation/) and the scripts: runs and their
layout (``layout``), artifacts (``artifacts``), model families (``families``), typed sampler specs
(``sampler_spec``), sampler settings (``settings``), quantized models from artifacts (``quantize``), samplers from
specs (``sampling``), batch sampling through a family (``generate``) and the scripts' shared flags (``cli``)."""
