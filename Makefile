# make demo | make test | make gpu-test | make bench
# Each target builds .venv when it is missing:
#  - on a machine whose python3 already has a CUDA torch (the GPU machine), .venv reuses it
#    (--system-site-packages) and installs only this package;
#  - elsewhere, the CPU build of torch (pinned in constraints.txt) and the tested versions of the
#    rest are installed, so the multi-GB CUDA wheels are never pulled by accident.
PYTHON3 ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: demo test gpu-test bench clean

$(STAMP): pyproject.toml constraints.txt
	@if $(PYTHON3) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "== CUDA torch found: .venv reuses the machine's packages"; \
		$(PYTHON3) -m venv --system-site-packages $(VENV) && \
		$(PY) -m pip install -q --no-deps --no-build-isolation -e . ; \
	else \
		echo "== building .venv (CPU torch from constraints.txt)"; \
		$(PYTHON3) -m venv $(VENV) && \
		$(PY) -m pip install -q -c constraints.txt torch && \
		$(PY) -m pip install -q -c constraints.txt -e ".[dev,plot]" ; \
	fi
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hf-longctx demo

# CPU suite, then the Triton kernels through the interpreter (TRITON_INTERPRET must be set before
# triton is imported, hence a second pytest process).
test: $(STAMP)
	$(PY) -m pytest -q -m "not cuda and not interpreter" tests
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "interpreter and not cuda" tests; rc=$$?; [ $$rc -eq 0 ] || [ $$rc -eq 5 ]

gpu-test: $(STAMP)
	$(PY) -m pytest -q -m cuda tests

bench: $(STAMP)
	@for script in benchmarks/[a-z]*.py; do echo "== $$script"; $(PY) $$script --out benchmarks/results || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
