"""Corpus formats: each a module with NAME, LOOKS_FOR, detect(root) and read(spec) (see base).

`read_corpus` is the one entry point: it reads a `CorpusSpec` with the format it names, or the
first format (in FORMATS order: the most specific layouts first, the generic manifest last)
whose `detect` recognises the files.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

from nlmm.data.corpora.base import Corpus, CorpusSpec
from nlmm.errors import NlmmError

FORMATS = ("flickr8k", "karpathy", "coco", "audiocaps", "clotho", "librispeech", "commonvoice",
           "manifest")


def format_module(name: str) -> ModuleType:
    if name not in FORMATS:
        raise NlmmError(f"unknown corpus format {name!r}; use one of {', '.join(FORMATS)}.")
    return importlib.import_module(f"nlmm.data.corpora.{name}")


def detect_format(path: Path) -> str:
    """The format of the corpus at `path`; NlmmError listing what each format looks for."""
    path = Path(path)
    if not path.exists():
        raise NlmmError(f"{path} does not exist; pass the folder (or manifest file) that holds "
                        f"the corpus.")
    for name in FORMATS:
        if format_module(name).detect(path):
            return name
    looks = "; ".join(f"{n}: {format_module(n).LOOKS_FOR}" for n in FORMATS)
    raise NlmmError(f"no corpus format recognised at {path} (nlmm reads {looks}); put the files "
                    f"in one of these layouts, or describe them in a CSV manifest and pass it "
                    f"with --columns.")


def resolve_spec(spec: CorpusSpec) -> CorpusSpec:
    """`spec` with its format filled in (detected when it names none)."""
    if spec.format is not None:
        format_module(spec.format)
        return spec
    return CorpusSpec(spec.path, detect_format(spec.path), spec.columns)


def read_corpus(spec: CorpusSpec | Path | str) -> Corpus:
    """Every group and caption of the corpus, with the defects found (nothing is decoded)."""
    if not isinstance(spec, CorpusSpec):
        spec = CorpusSpec(Path(spec))
    spec = resolve_spec(spec)
    if not Path(spec.path).exists():
        raise NlmmError(f"{spec.path} does not exist; pass the folder (or manifest file) that "
                        f"holds the corpus.")
    return format_module(spec.format).read(spec)
