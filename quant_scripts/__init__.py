"""The numbered pipeline: thin command lines over ldm/ (and later quant/, correction/, evaluation/)."""
