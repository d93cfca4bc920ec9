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
from nlmm.errors import NlmmError

DEFAULT_DATA = Path("data/flickr8k")
SYNTH_DATA = Path("data/synth")

# Says what is being done to the corpus, one line at a time.
Notify = Callable[[str], None]


def prepare_corpus(data: Path | None, synthetic: bool, cfg: Config,
                   notify: Notify | None = None) -> PreparedCache:
    """The feature cache of the corpus at `data` (default: DEFAULT_DATA, or SYNTH_DATA when
    `synthetic`), completing the corpus first where that is allowed.

    With `notify` (a terminal) the steps are announced through it and long ones show progress
    bars; without it (the dashboard) everything happens silently.
    """
    if synthetic:
        root = data or SYNTH_DATA
        if not (root / "Flickr8k_text" / "Flickr8k.token.txt").is_file():
            from nlmm.data.synth import synth_corpus

            if notify:
                notify(f"writing the offline synthetic corpus to {root}")
            # the builtin voice makes the same corpus on every machine, espeak-ng or not;
            # overwrite finishes a corpus whose writing was cut short (text files come last)
            synth_corpus(root, engine="builtin", overwrite=True, progress=notify is not None)
    else:
        root = data or DEFAULT_DATA
        ensure_corpus(root, notify)
    return prepare(root, cfg.data, cfg.vocab_size, progress=notify is not None,
                   encoders=cfg.encoders)


def ensure_corpus(root: Path, notify: Notify | None = None) -> None:
    """Complete the Flickr8k + FACC corpus in the default folder by downloading what it lacks;
    a folder anywhere else must hold a corpus already."""
    from nlmm.data.flickr import find_text_dir

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
