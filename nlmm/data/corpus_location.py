"""Where `nlmm train` takes its corpus from, and its feature cache.

Flickr8k + FACC is downloaded only into the default folder (./data/flickr8k): anywhere else a
folder without a corpus is an error, so that a mistyped --data never starts a 5 GB download.
The offline synthetic corpus is written wherever it is asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from nlmm.config import Config
from nlmm.data.cache import PreparedCache, prepare
from nlmm.data.corpora import FORMATS, resolve_spec
from nlmm.data.corpora.base import CorpusSpec
from nlmm.errors import NlmmError

DEFAULT_DATA = Path("data/flickr8k")
SYNTH_DATA = Path("data/synth")

# Says what is being done to the corpus, one line at a time.
Notify = Callable[[str], None]


def prepare_corpus(data: list[CorpusSpec] | CorpusSpec | Path | None, synthetic: bool, cfg: Config,
                   notify: Notify | None = None) -> PreparedCache:
    """The feature cache of the corpus (or corpora) in `data` (default: DEFAULT_DATA, or
    SYNTH_DATA when `synthetic`), completing the default Flickr8k corpus first where that is
    allowed. Several corpora make one cache (see nlmm.data.cache.prepare).

    With `notify` (a terminal) the steps are announced through it and long ones show progress
    bars; without it (the dashboard) everything happens silently.
    """
    specs = [] if data is None else [d if isinstance(d, CorpusSpec) else CorpusSpec(Path(d))
                                     for d in (data if isinstance(data, list) else [data])]
    if synthetic:
        root = specs[0].path if specs else SYNTH_DATA
        if not (root / "Flickr8k_text" / "Flickr8k.token.txt").is_file():
            from nlmm.data.synth import synth_corpus

            if notify:
                notify(f"writing the offline synthetic corpus to {root}")
            # the builtin voice makes the same corpus on every machine, espeak-ng or not;
            # overwrite finishes a corpus whose writing was cut short (text files come last)
            synth_corpus(root, engine="builtin", overwrite=True, progress=notify is not None)
        specs = [CorpusSpec(root, "flickr8k")]
    elif not specs:
        ensure_corpus(DEFAULT_DATA, notify)
        specs = [CorpusSpec(DEFAULT_DATA, "flickr8k")]
    else:
        specs = [ensure_corpus_spec(spec, notify) for spec in specs]
    return prepare(specs, cfg.data, cfg.vocab_size, progress=notify is not None,
                   encoders=cfg.encoders)


def ensure_corpus_spec(spec: CorpusSpec, notify: Notify | None = None) -> CorpusSpec:
    """`spec` with its format known: the default folder is completed by downloading Flickr8k;
    anywhere else the files must already be there, in a layout nlmm reads (detected when the
    spec names none, and announced)."""
    if Path(spec.path).resolve() == DEFAULT_DATA.resolve() and spec.format in (None, "flickr8k"):
        ensure_corpus(DEFAULT_DATA, notify)
        return CorpusSpec(spec.path, "flickr8k", spec.columns)
    try:
        resolved = resolve_spec(spec)
    except NlmmError:
        if spec.format is not None:
            raise
        what = "the path does not exist" if not Path(spec.path).exists() else \
            f"its files are in none of the layouts nlmm reads ({', '.join(FORMATS)}; " \
            f"`nlmm data check {spec.path}` says what each looks for)"
        raise NlmmError(f"no corpus at {spec.path}; {what}: pass the folder or manifest of your "
                        f"corpus, download Flickr8k + FACC there with `nlmm data download --dest "
                        f"{spec.path}`, or write the offline synthetic corpus there with `nlmm "
                        f"data synth --out {spec.path}`.") from None
    if notify and spec.format is None:
        notify(f"{spec.path}: {resolved.format} layout detected")
    return resolved


def ensure_corpus(root: Path, notify: Notify | None = None) -> None:
    """Complete the Flickr8k + FACC corpus in the default folder by downloading what it lacks;
    a folder anywhere else must hold a corpus already."""
    from nlmm.data.corpora.flickr8k import find_text_dir

    if root.resolve() == DEFAULT_DATA.resolve():
        from nlmm.data.download import download_flickr8k, missing_archives

        missing = missing_archives(root)
        if missing:
            if notify:
                notify(f"{root} lacks the contents of {', '.join(missing)}: downloading")
            download_flickr8k(root)
    elif find_text_dir(root) is None:
        raise NlmmError(f"no corpus at {root}; download Flickr8k + FACC there with `nlmm data "
                        f"download --dest {root}`, or write the offline synthetic corpus there "
                        f"with `nlmm data synth --out {root}`.")
