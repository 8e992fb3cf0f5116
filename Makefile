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
	$(BIN)/autopar estimate --model gpt3-175b --precision mixed --optimizer adam
	$(BIN)/autopar plan --model gpt3-1.3b --cluster h100 --nodes 2 --batch-size 16
	$(BIN)/autopar run --model gpt-tiny --nproc 2 --steps 5 --strategy auto

test: $(VENV)/.installed
	$(BIN)/pytest
