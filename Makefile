PYTHON ?= python3
STAMP := .installed
DEMO_STAMP := .installed-demo

.PHONY: install install-demo test demo experiments bench-quick gpu-suite clean

# torch first: the CPU build (2.13.0) on a machine without torch, so that `torch>=2.4` is already
# satisfied and pip never pulls the multi-GB CUDA build; a machine that already has torch (a GPU
# image) keeps its own.
CPU_TORCH = $(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"

# What `make test` needs: the package with the test, train and integrations extras. The integrations
# extra (TRL 1.16 and verl's import needs) leaves torch alone; verl itself goes in with --no-deps (its
# own pins would replace torch and transformers). OpenRLHF (its loss code only, a peer of
# tests/test_loss_types_peers.py; a cp311-only wheel) is optional: where it does not install, its
# four peer tests skip. Installed once per pyproject change.
install: $(STAMP)
$(STAMP): pyproject.toml
	$(CPU_TORCH)
	$(PYTHON) -m pip install -e ".[test,train,integrations]"
	$(PYTHON) -m pip install --no-deps "verl==0.9.1"
	$(PYTHON) -m pip install --no-deps "openrlhf==0.11.2" || echo "openrlhf not installable here: its peer tests skip"
	touch $(STAMP) $(DEMO_STAMP)

# What the demo and the experiments need, and nothing else: the package with the train extra
# (transformers, matplotlib). A full `make install` covers it.
install-demo: $(DEMO_STAMP)
$(DEMO_STAMP): pyproject.toml
	$(CPU_TORCH)
	$(PYTHON) -m pip install -e ".[train]"
	touch $(DEMO_STAMP)

test: $(STAMP)  ## the whole suite; without a GPU the Triton kernels run under TRITON_INTERPRET=1
	$(PYTHON) -m pytest -q tests

demo: $(DEMO_STAMP)  ## tiny Llama, offline answers of mixed quality: GRO against five methods that see the same data (under two minutes on 2 cores)
	$(PYTHON) -m gro_kernels.demo

experiments: $(DEMO_STAMP)  ## every regime, 5 seeds, tuned knobs, and the no-push-down ablation: docs/experiments/*.json and plots
	$(PYTHON) -m gro_kernels.experiments --regime all --seeds 5 --json docs/experiments/results.json
	$(PYTHON) -m gro_kernels.experiments --regime noisy,graded --methods gro,gro_nodown --seeds 5 --json docs/experiments/ablation.json

bench-quick: $(STAMP)
	$(PYTHON) -m pip install -q -e ".[bench]"
	$(PYTHON) bench/run.py --quick

gpu-suite:  ## on a GPU machine: kernel tests, correctness sweep at real sizes, benchmark table
	bash bench/gpu_suite.sh

clean:
	rm -f $(STAMP) $(DEMO_STAMP)
