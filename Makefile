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

# Two workers: most tests wait on a subprocess or a small tensor op; one thread each (conftest).
test: $(STAMP)
	$(BIN)/python -m pytest -n 2 $(ARGS)

SYNTH := data/synth

# Offline, CPU only: synthetic corpus -> feature cache -> short tiny_cpu run -> example searches.
demo: $(STAMP)
	test -f $(SYNTH)/Flickr8k_text/Flickr8k.token.txt || $(BIN)/nlmm data synth --out $(SYNTH) --images 240
	$(BIN)/nlmm data prepare $(SYNTH) --config tiny_cpu
	$(BIN)/nlmm train flickr8k --synthetic --data $(SYNTH) --config tiny_cpu --device cpu $(ARGS)
	$(BIN)/nlmm search "a red circle on the left and a blue square on the right" -k 3
	$(BIN)/nlmm search "a small green triangle at the top" --in audio -k 3
	img=$$(head -n 1 $(SYNTH)/Flickr8k_text/Flickr_8k.testImages.txt); \
	  $(BIN)/nlmm search --image $(SYNTH)/Flickr8k_Dataset/$$img --in text -k 3; \
	  $(BIN)/nlmm search --audio $(SYNTH)/flickr_audio/wavs/$${img%.jpg}_0.wav --in image -k 3

clean:
	rm -rf $(VENV) runs/*.db* runs/*/ data/synth
