# The two commands of the README, plus the offline demo. Each creates .venv and installs first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: train test demo install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/nlmm train flickr8k $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

demo: $(STAMP)
	$(BIN)/nlmm demo $(ARGS)

clean:
	rm -rf $(VENV) runs/*.db* runs/*/ data/synth
