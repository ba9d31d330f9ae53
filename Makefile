# make test   -- create .venv, install the pinned dependencies and run the test suite (what CI runs)
# make install -- only the .venv setup
# make bench  -- UNet forward-time benchmark of the cin256-v2 architecture (random weights)
# make gpu-check -- on a CUDA machine: does every CUDA path work, and how fast (<= 8 min; outputs/gpu_check.json)
# make data   -- Fashion-MNIST from the Debian package dataset-fashion-mnist, where apt-get can install it
# make train-fashion -- retrain the embedded default from scratch (VQ-f4, LDM, classifier, reference batch)
# make quality -- measure the embedded default (classifier accuracy, sample accuracy, FID vs the held-out floor)
# make demo  -- the whole pipeline on the embedded default and a report (QUICK=1: a 3-minute smoke run)

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test bench gpu-check clean data train-fashion quality demo

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/unet_forward.py

gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py --json outputs/gpu_check.json

data:
	@if [ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then \
	  echo "Fashion-MNIST: /usr/share/datasets/fashion-mnist"; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  apt-get install -y dataset-fashion-mnist || echo "apt-get failed: set FASHION_MNIST_DIR or pass --download"; \
	else \
	  echo "install dataset-fashion-mnist (Debian), set FASHION_MNIST_DIR, or train with --download"; \
	fi

train-fashion: $(STAMP) data
	$(PY) main.py --base configs/autoencoder/fashion-vq-f4.yaml
	$(PY) main.py --base configs/latent-diffusion/fashion-ldm-vq-4.yaml
	$(PY) main.py --base configs/eval/fashion-classifier.yaml
	$(PY) -m evaluation.fashion_reference

quality: $(STAMP) data
	$(PY) benchmarks/fashion_model_quality.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info

# make demo [QUICK=1] [PAPER=1] [FRESH=1] [QNCD=1] [SMOOTH=1] [HARD=1] [LONG=1] [PIXEL=1] [TEXT=1] [DIT=1] -- the whole pipeline on the embedded
# default + outputs/<mode>/fashion/report.md (HARD=1: the bit-width sweep, report in fashion/bits/; LONG=1: the
# 250-step scale-1.5 protocol at η 0 and η 1, a report in each run folder; PIXEL=1: the pixel DDPM default;
# TEXT=1: the text-to-image default; DIT=1: the embedded DiT)
demo: $(STAMP)
ifdef DIT
	$(PY) quant_scripts/demo.py --preset fashion-dit --n_eval 500 $(if $(QUICK),--quick) $(if $(FRESH),--fresh)
else ifdef TEXT
	$(PY) quant_scripts/demo.py --preset fashion-txt2img --n_eval 500 $(if $(QUICK),--quick) $(if $(FRESH),--fresh)
else ifdef PIXEL
	$(PY) quant_scripts/demo.py --preset fashion-ddim --n_eval 500 $(if $(QUICK),--quick) $(if $(FRESH),--fresh)
else ifdef LONG
	$(PY) quant_scripts/demo.py --long --eta 0 $(if $(FRESH),--fresh)
	$(PY) quant_scripts/demo.py --long --eta 1 $(if $(FRESH),--fresh)
else
	$(PY) quant_scripts/demo.py $(if $(QUICK),--quick) $(if $(PAPER),--paper) $(if $(FRESH),--fresh) $(if $(QNCD),--qncd) $(if $(SMOOTH),--smooth) $(if $(HARD),--hard)
endif
