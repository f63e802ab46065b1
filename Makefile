PYTHON ?= python3

.PHONY: install test demo bench-quick gpu-suite

install:  ## CPU machine: the CPU build of torch first, then the package with its extras
	$(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -e ".[test,train]"

test:  ## the whole test suite (Triton kernels run under TRITON_INTERPRET=1 when no GPU is present)
	$(PYTHON) -m pytest -q tests

demo:
	$(PYTHON) -m gro_kernels.demo

bench-quick:
	$(PYTHON) bench/run.py --quick

gpu-suite:  ## run on a GPU machine: kernel tests, correctness sweep at real sizes, benchmark table
	bash bench/gpu_suite.sh
