# The two commands of the README. Both set everything up in .venv first (torch pinned by
# constraints.txt, so a CPU machine takes the CPU build).
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/autopar demo

test: $(VENV)/.installed
	$(BIN)/pytest
