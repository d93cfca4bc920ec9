"""The `nlmm` command line: parse, call the library, print. No logic lives here."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

import nlmm
from nlmm.cli.errors import describe, help_instead
from nlmm.cli.help import use_readable_help
from nlmm.config import OPTIMIZERS
from nlmm.errors import NlmmError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="nlmm",
    help="Train and use tri-modal (image · text · speech) Nested-Learning retrieval models.",
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: Rich's panels cut option names at 80 columns
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Get, check and prepare corpora (Flickr8k + FACC layout).",
                       no_args_is_help=True, rich_markup_mode=None)
runs_app = typer.Typer(help="List, inspect, stop, delete and compare training runs.",
                       no_args_is_help=True, rich_markup_mode=None)
model_app = typer.Typer(help="Inspect model configurations.", no_args_is_help=True,
                        rich_markup_mode=None)
app.add_typer(data_app, name="data")
app.add_typer(runs_app, name="runs")
app.add_typer(model_app, name="model")

_state = {"debug": False}


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


# the optimizers the config accepts, named once in nlmm.config
Optim = Enum("Optim", {name: name for name in OPTIMIZERS}, type=str)  # type: ignore[misc]


class Split(str, Enum):
    train = "train"
    dev = "dev"
    test = "test"
    all = "all"


class EvalSplit(str, Enum):
    dev = "dev"
    test = "test"


class Modality(str, Enum):
    image = "image"
    text = "text"
    audio = "audio"


class SearchBackend(str, Enum):
    exact = "exact"
    faiss = "faiss"


def _version(value: bool) -> None:
    if value:
        console.print(f"nlmm {nlmm.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    _state["debug"] = debug


# ------------------------------------------------------------------------------------ data

FORMAT_HELP = ("Corpus layout: flickr8k, karpathy, coco, audiocaps, clotho, librispeech, "
               "commonvoice or manifest (default: detected from the files); once for every "
               "--data, or once per --data in order.")
COLUMNS_HELP = ("Manifest columns by role, e.g. image=filepath,text=title (roles: image, text, "
                "audio, split, group; default: guessed from common names).")


def _parse_columns(columns: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (columns or "").split(","):
        if not part.strip():
            continue
        role, eq, name = part.partition("=")
        role = role.strip().lower()
        if not eq or not name.strip() or role not in ("image", "text", "audio", "split", "group"):
            raise NlmmError(f"--columns takes ROLE=COLUMN pairs separated by commas (roles: "
                            f"image, text, audio, split, group), got {part.strip()!r}; e.g. "
                            f"--columns image=filepath,text=title.")
        out[role] = name.strip()
    return out


def _corpus_specs(data: list[Path] | list[str] | None, formats: list[str] | None,
                  columns: str | None, dataset: str | None = None) -> list | None:
    """The corpora named on the command line as CorpusSpecs (None: none named); an
    s3:// URL (a pack) stays a string, since a Path would fold its //."""
    from nlmm.data.corpora import FORMATS
    from nlmm.data.corpora.base import CorpusSpec

    if not data:
        return None
    formats = list(formats or [])
    if not formats and dataset and dataset.lower() != "flickr8k":
        formats = [dataset.lower()]  # `nlmm train coco --data DIR`
    if len(formats) not in (0, 1, len(data)):
        raise NlmmError(f"{len(formats)} --format values for {len(data)} --data paths; give one "
                        f"for all, or one per --data in the same order.")
    for f in formats:
        if f not in FORMATS:
            raise NlmmError(f"unknown corpus format {f!r}; use one of {', '.join(FORMATS)}.")
    cols = _parse_columns(columns)
    return [str(path) if "://" in str(path) else
            CorpusSpec(Path(path), formats[i] if len(formats) > 1 else
                       (formats[0] if formats else None), cols)
            for i, path in enumerate(data)]


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Folder to write the corpus into.")] = Path("data/synth"),
    images: Annotated[int, typer.Option("--images", "-n", min=8, help="Number of images.")] = 120,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same files).")] = 0,
    engine: Annotated[str, typer.Option(help="Speech: builtin (same on every machine), espeak "
                                        "(espeak-ng when installed) or auto.")] = "builtin",
    overwrite: Annotated[bool, typer.Option(help="Replace a corpus already in --out.")] = False,
    objects: Annotated[Optional[int], typer.Option(
        min=2, max=5, help="Harder mode: exactly N (2-5) objects per image on a 3x3 grid, "
        "every caption naming them all.")] = None,
) -> None:
    """Write an offline synthetic corpus in exactly the Flickr8k + FACC layout."""
    from nlmm.data.synth import synth_corpus

    counts = synth_corpus(out, n_images=images, seed=seed, engine=engine, overwrite=overwrite,
                          objects=objects)
    console.print(f"[green]wrote[/] {out}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


@data_app.command("download")
def data_download(
    dataset: Annotated[str, typer.Argument(help="Dataset to fetch (flickr8k).")] = "flickr8k",
    dest: Annotated[Path, typer.Option("--dest", metavar="DIR", help="Where to unpack it.")] = Path("data/flickr8k"),
    keep_archives: Annotated[bool, typer.Option(help="Keep the archives (about 5 GB) after "
                                                "unpacking.")] = False,
) -> None:
    """Download Flickr8k images, captions and FACC spoken captions (resumable, verified)."""
    from nlmm.data.download import download_flickr8k

    _only_flickr8k(dataset)
    path = download_flickr8k(dest, keep_archives=keep_archives)
    console.print(f"[green]ready[/] {path}")


@data_app.command("check")
def data_check(
    root: Annotated[Path, typer.Argument(help="Corpus folder or manifest file, in any layout "
                                         "nlmm reads.")],
    decode: Annotated[bool, typer.Option(help="Decode every image and audio file to find "
                                         "corrupt ones.")] = True,
    format_: Annotated[Optional[str], typer.Option("--format", help=FORMAT_HELP)] = None,
    columns: Annotated[Optional[str], typer.Option(help=COLUMNS_HELP)] = None,
) -> None:
    """Say which layout was detected; count images, clips, captions and audio per split and
    modality; list every defect with its reason."""
    from nlmm.data.check import check_corpus

    spec = _corpus_specs([root], [format_] if format_ else None, columns)[0]
    report = check_corpus(spec, decode=decode, progress=True)
    console.print(report.to_table())
    if not report.usable:
        raise NlmmError(f"{root} holds no usable image-caption or caption-audio pair in its "
                        f"train split; fix the defects listed above.")


@data_app.command("prepare")
def data_prepare(
    roots: Annotated[list[Path], typer.Argument(metavar="PATH...", help="Corpus folder(s) or "
                                                "manifest file(s); several make one mixed "
                                                "cache.")],
    config: Annotated[str, typer.Option("--config", "-c", metavar="NAME|FILE", help="Config name or YAML path.")] = "flickr8k",
    set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override a config key: key.sub=value.")] = None,
    force: Annotated[bool, typer.Option(help="Rebuild even when the cache is fresh.")] = False,
    format_: Annotated[Optional[list[str]], typer.Option("--format", help=FORMAT_HELP)] = None,
    columns: Annotated[Optional[str], typer.Option(help=COLUMNS_HELP)] = None,
) -> None:
    """Decode images, compute log-mels and tokenize captions once, into a versioned cache."""
    from nlmm.config import resolve_config
    from nlmm.data.cache import prepare

    cfg = resolve_config(config, set_ or [])
    specs = _corpus_specs(roots, format_, columns)
    cache = prepare(specs, cfg.data, cfg.vocab_size, force=force, encoders=cfg.encoders)
    for name, features in (cache.features or {}).items():
        console.print(f"features {name}: {features.path}")
    console.print(cache.report().to_table())
    console.print(f"[green]cache ready[/] {cache.path}")


@data_app.command("pack")
def data_pack(
    src: Annotated[Path, typer.Argument(metavar="SRC", help="Corpus folder or manifest file, in "
                                        "any layout nlmm reads.")],
    out: Annotated[str, typer.Argument(metavar="OUT", help="Folder or s3://bucket/prefix to "
                                       "write the shards into.")],
    config: Annotated[str, typer.Option("--config", "-c", metavar="NAME|FILE", help="Config "
                                        "whose vocab_size the tokenizer is trained to and whose "
                                        "data settings (image_size, mel) the features are made "
                                        "with.")] = "flickr8k",
    set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override a config key: key.sub=value.")] = None,
    format_: Annotated[Optional[str], typer.Option("--format", help=FORMAT_HELP)] = None,
    columns: Annotated[Optional[str], typer.Option(help=COLUMNS_HELP)] = None,
    workers: Annotated[Optional[int], typer.Option(min=1, help="Decoding processes (default: "
                                                   "every core).")] = None,
    chunk: Annotated[str, typer.Option(help="Media bytes per shard, e.g. 64MB.")] = "64MB",
    force: Annotated[bool, typer.Option("--force", help="Replace whatever OUT holds.")] = False,
) -> None:
    """Write a corpus into litdata shards (images at the training size, log-mels, captions, a
    tokenizer) that `nlmm train --data OUT` streams from a folder or a bucket; a pack killed
    part-way resumes where it stopped."""
    from nlmm.config import resolve_config
    from nlmm.data.corpora import read_corpus
    from nlmm.data.packed import pack

    spec = _corpus_specs([src], [format_] if format_ else None, columns)[0]
    cfg = resolve_config(config, set_ or [])
    report = pack(read_corpus(spec), out, vocab_size=cfg.vocab_size, data_cfg=cfg.data,
                  workers=workers, force=force, progress=True, chunk_bytes=chunk)
    if report.defects:
        from nlmm.data.check import CheckReport

        console.print(CheckReport(Path(str(src)), report.counts, report.defects, 0, True,
                                  spec.format or "", []).to_table(max_defects=50))
    console.print(f"[green]{report.summary()}[/]")


# ----------------------------------------------------------------------------------- train

@app.command("train")
def train(
    dataset: Annotated[str, typer.Argument(help="Dataset to train on: flickr8k (downloaded into "
                                            "./data/flickr8k when no --data is given), or the "
                                            "format of the --data corpus (coco, karpathy, ...).")] = "flickr8k",
    data: Annotated[Optional[list[str]], typer.Option("--data", "--data_dir", "--data-dir",
                                                      metavar="PATH",
                                                      help="Corpus folder or manifest file, in "
                                                           "any layout nlmm reads (default "
                                                           "./data/flickr8k), repeated to train "
                                                           "on several corpora at once; or a "
                                                           "pack (`nlmm data pack`) in a folder "
                                                           "or at s3://bucket/prefix to stream "
                                                           "from.")] = None,
    format_: Annotated[Optional[list[str]], typer.Option("--format", help=FORMAT_HELP)] = None,
    columns: Annotated[Optional[str], typer.Option(help=COLUMNS_HELP)] = None,
    synthetic: Annotated[bool, typer.Option("--synthetic", help="Use (and create) the offline "
                                            "synthetic corpus in ./data/synth.")] = False,
    config: Annotated[Optional[str], typer.Option("--config", "-c", metavar="NAME|FILE",
                                                  help="Config name in configs/ "
                                                  "or a YAML path (default flickr8k, or tiny_cpu "
                                                  "with --synthetic).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override a config key: key.sub=value.")] = None,
    epochs: Annotated[Optional[int], typer.Option(min=1, help="Epochs. With --resume: this many "
                                                  "more epochs from where the run stands (lr "
                                                  "schedule: see --steps); with --resume and "
                                                  "--data: the new run's epochs.")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", "--batch_size", min=2)] = None,
    lr: Annotated[Optional[float], typer.Option(min=0.0, help="Learning rate of the fastest level.")] = None,
    optimizer: Annotated[Optional[Optim], typer.Option(help="One optimizer for every level.")] = None,
    device: Annotated[Device, typer.Option(help="Where to train.")] = Device.auto,
    name: Annotated[Optional[str], typer.Option(help="Run name (default: generated).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    detach: Annotated[bool, typer.Option("--detach", help="Start the run and return at once.")] = False,
    resume: Annotated[Optional[str], typer.Option(metavar="RUN", help="Continue RUN from its last "
                                                  "checkpoint, finishing its plan (more with "
                                                  "--steps/--epochs). With --data NEW (another "
                                                  "corpus, prepared with RUN's tokenizer): a new "
                                                  "run that starts from RUN's model and optimizer "
                                                  "state and records RUN as its parent (see `nlmm "
                                                  "runs forgetting`); RUN is left as it is.")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", min=1, help="Evaluate every N epochs.")] = None,
    accumulate: Annotated[Optional[int], typer.Option(min=1, help="Micro-batches per optimizer step.")] = None,
    image_size: Annotated[Optional[int], typer.Option("--image-size", "--image_size", min=16)] = None,
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="Mixed precision on CUDA.")] = None,
    grad_checkpointing: Annotated[Optional[bool], typer.Option("--grad-checkpointing/--no-grad-checkpointing")] = None,
    num_workers: Annotated[Optional[int], typer.Option("--num-workers", "--num_workers", min=0,
                                                       help="Processes per rank that decode a "
                                                            "pack's samples (train.loader_"
                                                            "workers); the prepared cache "
                                                            "needs none.")] = None,
    steps: Annotated[Optional[int], typer.Option(min=1, help="A short run of at most this many "
                                                 "optimizer steps: the lr warmup (cut to a tenth "
                                                 "of the run) and the cosine fit it; the epochs "
                                                 "still bound the run (a cap above them is "
                                                 "reported). With --resume: this many more steps "
                                                 "from where the run stands (its epochs grow to "
                                                 "hold them); the lr schedule becomes that of a "
                                                 "run planned to the new end from the start, "
                                                 "cosine stretched to it, a warmup done not "
                                                 "repeated, so a finished run's lr rises from 0 "
                                                 "(--set train.schedule=constant keeps it flat).")] = None,
    tensorboard: Annotated[bool, typer.Option("--tensorboard", help="Also write TensorBoard "
                                              "scalars to runs/<run>/tensorboard.")] = False,
    wandb: Annotated[bool, typer.Option("--wandb", help="Also log to Weights & Biases (offline "
                                        "unless WANDB_API_KEY is set).")] = False,
    nproc: Annotated[Optional[int], typer.Option("--nproc", min=1, help="Data-parallel processes "
                                                 "on this node (one per GPU), started with "
                                                 "torchrun; --batch-size is the global batch "
                                                 "(default 1; with --resume, the run's "
                                                 "own).")] = None,
    nnodes: Annotated[int, typer.Option("--nnodes", min=1, help="Nodes taking part; start the "
                                        "same command on each.")] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", min=0, help="This node's index; node 0 "
                                           "registers the run and writes the store.")] = 0,
    rdzv_endpoint: Annotated[Optional[str], typer.Option("--rdzv-endpoint", metavar="HOST:PORT",
                                                         help="HOST:PORT of node 0 that every "
                                                              "node can reach.")] = None,
) -> None:
    """Prepare the corpus if needed, start a training run as a subprocess and follow it."""
    from nlmm.cli.follow import follow
    from nlmm.train.launcher import join, launch, launch_nproc
    from nlmm.train.request import TrainRequest

    specs = _corpus_specs(data, format_, columns, dataset)
    if specs is None:
        _only_flickr8k(dataset)
    overrides = list(set_ or [])
    # with --resume, --epochs and --steps mean "this many more" and go to the launcher
    for key, value in (("train.epochs", None if resume else epochs),
                       ("train.batch_size", batch_size), ("train.lr", lr),
                       ("train.optimizer", optimizer.value if optimizer else None),
                       ("train.seed", seed), ("train.eval_every", eval_every),
                       ("train.accumulate", accumulate), ("data.image_size", image_size),
                       ("train.grad_checkpointing", grad_checkpointing),
                       ("train.loader_workers", num_workers),
                       ("train_steps", None if resume else steps)):
        if value is not None:
            overrides.append(f"{key}={json.dumps(value)}")
    if amp is not None:
        overrides.append(f"precision.amp={'bf16' if amp else 'none'}")
    mirrors = [m for m, on in (("tensorboard", tensorboard), ("wandb", wandb)) if on]
    if mirrors:
        overrides.append(f"train.mirrors={json.dumps(mirrors)}")
    if nproc is None:
        nproc = launch_nproc(resume) if resume else 1
    request = TrainRequest(data=specs, synthetic=synthetic, config=config, overrides=overrides,
                           device=device.value, name=name, resume=resume,
                           add_epochs=epochs if resume else None,
                           add_steps=steps if resume else None, nproc=nproc, nnodes=nnodes,
                           node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
    if node_rank > 0:
        from nlmm import store

        log = store.runs_dir() / f"node{node_rank}.log" if detach else None
        proc = join(request, notify=console.print, log_path=log)
        if detach:
            console.print(f"node {node_rank} started (pid {proc.pid}), waiting for node 0 at "
                          f"{rdzv_endpoint}; its output goes to {log}")
            return
        raise typer.Exit(proc.wait())
    run = launch(request, notify=console.print)
    if detach:
        console.print(f"started run [bold]{run.name}[/] (id {run.id}); follow it with "
                      f"`nlmm dash` or `nlmm runs show {run.name}`")
        return
    code = follow(run.id, console=console)
    raise typer.Exit(code)


# ------------------------------------------------------------------------------------ runs

@runs_app.command("ls")
def runs_ls(
    status: Annotated[Optional[str], typer.Option(help="Only runs with this status.")] = None,
) -> None:
    """List runs with status, progress and best mean R@1."""
    from nlmm.cli.reports import runs_table

    console.print(runs_table(status=status))


@runs_app.command("show")
def runs_show(run: Annotated[str, typer.Argument(metavar="RUN", help="Run name or id.")]) -> None:
    """Show a run: status, config summary, latest metrics, checkpoints."""
    from nlmm.cli.reports import run_details

    console.print(run_details(run))


@runs_app.command("stop")
def runs_stop(
    run: Annotated[str, typer.Argument(metavar="RUN", help="Run name or id.")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the checkpoint.")] = 120.0,
) -> None:
    """Stop a running run: it checkpoints, then ends with status `stopped`."""
    from nlmm.train.launcher import stop

    status = stop(run, timeout=timeout)
    console.print(f"run {run}: {status}")


@runs_app.command("rm")
def runs_rm(
    runs: Annotated[list[str], typer.Argument(metavar="RUN", help="Run names or ids.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete runs: their rows in the store and their folders under runs/."""
    from nlmm import store
    from nlmm.train.launcher import remove

    names = [store.get_run(ref).name for ref in runs]  # an unknown run fails before the question
    if not yes:
        if not sys.stdin.isatty():
            raise NlmmError(f"not deleting {', '.join(names)}: there is no terminal to confirm "
                            "on; pass -y to delete without asking.")
        if not typer.confirm(f"Delete {', '.join(names)} and their checkpoints?"):
            console.print("nothing deleted")
            raise typer.Exit(1)
    for name in names:
        remove(name)
        console.print(f"deleted {name}")


@runs_app.command("forgetting")
def runs_forgetting(
    run: Annotated[str, typer.Argument(metavar="RUN", help="Run name or id.")],
    split: Annotated[EvalSplit, typer.Option(help="Split to score.")] = EvalSplit.test,
    device: Annotated[Device, typer.Option()] = Device.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Recall@1 of a run and its ancestors on every corpus they trained on.

    RUN and the runs it continues (`nlmm train --resume PARENT --data NEW`) are scored at their
    last.pt on each corpus: what training on a new corpus cost on the earlier ones."""
    from nlmm.cli.reports import forgetting_table
    from nlmm.eval.forgetting import forgetting

    report = forgetting(run, split=split.value, device=device.value)
    if as_json:
        print(json.dumps(report.to_dict()))
        return
    console.print(forgetting_table(report))
    for note in report.notes:
        console.print(f"note: {note}", style="yellow")


@runs_app.command("compare")
def runs_compare(runs: Annotated[list[str], typer.Argument(metavar="RUN", help="Run names or ids.")]) -> None:
    """Best retrieval figures of several runs side by side."""
    from nlmm.cli.reports import compare_table

    console.print(compare_table(runs))


# ------------------------------------------------------------------------------- model/eval

@model_app.command("info")
def model_info(
    config: Annotated[str, typer.Option("--config", "-c", metavar="NAME|FILE", help="Config name or YAML path.")] = "flickr8k",
    set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override a config key.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 32,
) -> None:
    """Parameters per part and per CMS level, FLOPs per triple, memory at a batch size."""
    from nlmm.config import resolve_config
    from nlmm.cli.reports import model_info_table

    console.print(model_info_table(resolve_config(config, set_ or []), batch_size))


@app.command("eval")
def eval_(
    target: Annotated[str, typer.Argument(metavar="RUN|CHECKPOINT", help="Run name/id or checkpoint path.")],
    split: Annotated[EvalSplit, typer.Option(help="Split to score.")] = EvalSplit.test,
    ttt: Annotated[Optional[bool], typer.Option(
        "--ttt/--no-ttt", help="Also evaluate with test-time training, or not (default: as the "
        "checkpoint's config says, ttt.enable).")] = None,
    data: Annotated[Optional[list[Path]], typer.Option(
        metavar="PATH", help="Score on this corpus (any layout) instead of the run's own: "
        "prepared with the run's data settings and tokenizer; a pack (`nlmm data pack`) is read "
        "as it is, and must have been packed with the run's data settings.")] = None,
    format_: Annotated[Optional[list[str]], typer.Option("--format", help=FORMAT_HELP)] = None,
    columns: Annotated[Optional[str], typer.Option(help=COLUMNS_HELP)] = None,
    protocol: Annotated[Optional[str], typer.Option(
        help="Score the test split as the literature does: test, karpathy-1k (Flickr8k/30k: "
        "1000 images), coco-5k (5000 images), coco-1k (5 folds of 1000, averaged).")] = None,
    device: Annotated[Device, typer.Option()] = Device.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Recall@1/5/10 in every direction the model has, on a split or under a test protocol
    (with and without TTT), beside the number of images, captions and audio items scored."""
    from nlmm.cli.reports import eval_table
    from nlmm.eval.evaluate import evaluate_target

    results = evaluate_target(target, split=split.value, ttt=ttt, device=device.value,
                              data=_corpus_specs(data, format_, columns), protocol=protocol)
    if as_json:
        print(json.dumps(results))
    else:
        console.print(eval_table(results))


@app.command("search")
def search(
    query: Annotated[Optional[str], typer.Argument(help="Text query.")] = None,
    image: Annotated[Optional[Path], typer.Option("--image", metavar="FILE", help="Query with an image file.")] = None,
    audio: Annotated[Optional[Path], typer.Option("--audio", metavar="FILE", help="Query with a WAV file.")] = None,
    run: Annotated[Optional[str], typer.Option(help="Run name/id (default: latest finished).")] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(metavar="FILE", help="Checkpoint file.")] = None,
    in_: Annotated[Optional[Modality], typer.Option("--in", help="Modality to retrieve.")] = None,
    k: Annotated[int, typer.Option("-k", help="Number of results.")] = 5,
    split: Annotated[Split, typer.Option(help="Gallery split.")] = Split.test,
    data: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Corpus folder (default: the run's).")] = None,
    ttt: Annotated[Optional[bool], typer.Option(
        "--ttt/--no-ttt", help="Adapt to the query first (test-time training), or not (default: "
        "as the checkpoint's config says, ttt.enable).")] = None,
    device: Annotated[Device, typer.Option()] = Device.auto,
    backend: Annotated[SearchBackend, typer.Option(help="exact top-k, or faiss (needs the "
                                                   "faiss extra).")] = SearchBackend.exact,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines output.")] = False,
    no_server: Annotated[bool, typer.Option("--no-server", help="Search in this process even "
                                            "when `nlmm serve` is running.")] = False,
) -> None:
    """Retrieve images, captions or spoken captions with a trained checkpoint (through a running
    `nlmm serve` when there is one)."""
    from nlmm.cli.reports import search_shortfall, search_table
    from nlmm.search.types import SearchRequest
    from nlmm.search.client import search as search_anywhere

    request = SearchRequest(text=query, image=image, audio=audio, run=run, checkpoint=checkpoint,
                            target=in_.value if in_ else None, k=k, split=split.value, data=data,
                            ttt=ttt, device=device.value, backend=backend.value)
    results = search_anywhere(request, console=err_console, use_server=not no_server)
    if as_json:
        for hit in results.hits:
            print(json.dumps(hit.to_dict()))
        shortfall = search_shortfall(results)
        if shortfall:  # stdout stays JSON lines
            err_console.print(escape(shortfall), soft_wrap=True)
    else:
        console.print(search_table(results))


@app.command("serve")
def serve(
    tcp: Annotated[Optional[int], typer.Option("--tcp", metavar="PORT", min=0, max=65535,
                                               help="Listen on 127.0.0.1:PORT (0: any free "
                                               "port) instead of the Unix socket "
                                               "runs/.serve.sock.")] = None,
    max_models: Annotated[int, typer.Option("--max-models", min=1, help="Models kept loaded; "
                                            "the least recently used goes first.")] = 2,
) -> None:
    """Keep models and gallery indexes loaded and answer `nlmm search` from them, until Ctrl-C."""
    from nlmm.search.serve import serve as serve_forever

    def log(line: str) -> None:  # plain text, one line per event however long its paths
        console.print(line, markup=False, highlight=False, soft_wrap=True)

    serve_forever(tcp_port=tcp, max_models=max_models, log=log)


@app.command("export")
def export(
    target: Annotated[str, typer.Argument(metavar="RUN|CHECKPOINT", help="Run name/id or checkpoint path.")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="DIR", help="Bundle folder to write.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite the bundle in a folder that "
                                        "is not empty.")] = False,
) -> None:
    """Write a self-contained inference bundle (safetensors weights, config, tokenizer)."""
    from nlmm.inference.export import export_bundle

    path = export_bundle(target, out, force=force)
    meta = json.loads((path / "bundle.json").read_text())
    mean = (meta.get("metrics") or {}).get("mean_r1")
    source = Path(meta["source"])
    console.print(f"[green]exported[/] {path} from {source.name} ({source}), step "
                  f"{meta.get('step')}" + (f", dev mean R@1 {mean:.1f}" if mean is not None
                                           else ", not yet evaluated"))


@app.command("plot")
def plot(
    runs: Annotated[list[str], typer.Argument(metavar="RUN", help="Run names or ids.")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="FILE", help="PNG file to write.")] = Path("training_progress.png"),
) -> None:
    """Plot losses and Recall@K curves of runs into a PNG (the guide's results plots)."""
    from nlmm.cli.plots import plot_runs

    path = plot_runs(runs, out)
    console.print(f"[green]wrote[/] {path}")


@app.command("dash")
def dash(
    db: Annotated[Optional[str], typer.Option(metavar="URL", help="Store URL (default runs/nlmm.db or NLMM_DB_URL).")] = None,
    run: Annotated[Optional[str], typer.Option(metavar="RUN", help="Open this run's view first.")] = None,
) -> None:
    """Open the live Textual dashboard: runs, curves, GPU stats, checkpoints, search."""
    from console.app import run_dashboard

    run_dashboard(db_url=db, run=run)


def _only_flickr8k(dataset: str) -> None:
    from nlmm.data.corpora import FORMATS

    if dataset.lower() == "flickr8k":
        return
    if dataset.lower() in FORMATS:
        raise NlmmError(f"only flickr8k is downloaded by nlmm; pass --data PATH with the "
                        f"{dataset} corpus you have on disk.")
    raise NlmmError(f"unknown dataset {dataset!r}; use flickr8k, or pass --data PATH with a "
                    f"corpus in one of the layouts {', '.join(FORMATS)} (--synthetic for the "
                    f"offline corpus).")


def _command_path(argv: list[str]) -> str:
    """`nlmm runs rm` for argv `runs rm x -y`: the command the user was typing."""
    path, command = ["nlmm"], typer.main.get_command(app)
    for token in argv:
        commands = getattr(command, "commands", {})
        if token in commands:
            path.append(token)
            command = commands[token]
        elif not token.startswith("-"):
            break
    return " ".join(path)


use_readable_help(app)


def main() -> None:
    """Entry point: user errors as one red sentence, tracebacks only with --debug."""
    try:
        # without standalone mode click returns a command's typer.Exit code instead of exiting
        sys.exit(app(prog_name="nlmm", standalone_mode=False) or 0)
    except (typer.Exit, SystemExit) as exc:
        code = getattr(exc, "exit_code", getattr(exc, "code", 0))
        sys.exit(code or 0)
    except typer.Abort:
        # a prompt was cut short (Ctrl-C, end of input): end its line first
        err_console.print("\n[yellow]aborted[/]")
        sys.exit(130)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        sys.exit(130)
    except Exception as exc:  # the one place that turns exceptions into exit codes
        shown = help_instead(exc)
        if shown is not None:
            print(shown)
            sys.exit(0)
        if _state["debug"] or "--debug" in sys.argv:
            raise
        message, code = describe(exc, _command_path(sys.argv[1:]))
        # one unwrapped line: the terminal folds it, so paths and URLs copy whole
        err_console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
