"""The command line: parse options, call one library function, print. No logic lives here."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

import click

from mtkit import __version__
from mtkit.errors import MtkitError
from mtkit.utils import setup_logging

logger = logging.getLogger("mtkit")


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one ``error:`` line and exit 1; ``--debug`` re-raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool((click.get_current_context().find_root().obj or {}).get("debug"))
        try:
            return fn(*args, **kwargs)
        except MtkitError as exc:
            if debug:
                raise
            _fail(str(exc))
        except KeyboardInterrupt:
            if debug:
                raise
            _fail("interrupted")
        except BrokenPipeError:
            sys.stderr.close()  # downstream closed the pipe (e.g. `| head`): not an error
            sys.exit(0)
        except OSError as exc:
            if debug:
                raise
            where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
            _fail(f"{exc.strerror or exc}{':' if where else ''}{where}")

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mtkit")
@click.option("-v", "--verbose", is_flag=True, help="Debug-level logs on stderr.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors on stderr.")
@click.option("--debug", is_flag=True, help="Show the full traceback of an error.")
@click.pass_context
def main(ctx: click.Context, verbose: bool, quiet: bool, debug: bool) -> None:
    """mtkit: neural machine translation from raw text to scored, averaged models.

    Data goes to stdout, logs to stderr, so every command composes in shell pipelines.
    """
    ctx.obj = {"debug": debug}
    setup_logging(1 if verbose else -1 if quiet else 0)


# ---------------------------------------------------------------------------------------------
@main.command()
@click.option("-s", "--source-lang", "src_lang", required=True, help="Source language suffix, e.g. en.")
@click.option("-t", "--target-lang", "tgt_lang", required=True, help="Target language suffix, e.g. de.")
@click.option("--train", "train_prefix", required=True, help="Training prefix: reads PREFIX.SRC and PREFIX.TGT (plain or .gz).")
@click.option("--valid", "valid_prefix", default=None, help="Validation prefix.")
@click.option("--test", "test_prefixes", multiple=True, help="Test prefix (repeatable).")
@click.option("-o", "--out", "out_dir", required=True, help="Output data directory.")
@click.option("--vocab-size", default=8000, show_default=True, type=int)
@click.option("--model-type", type=click.Choice(["bpe", "unigram"]), default="bpe", show_default=True)
@click.option("--joint/--separate", default=True, show_default=True, help="One sentencepiece model for both sides, or one per side.")
@click.option("--spm", "spm_models", multiple=True, help="Reuse sentencepiece model(s): one (joint) or two (source, target).")
@click.option("--character-coverage", default=1.0, show_default=True, type=float)
@click.option("--user-defined-symbols", default="", help="Comma-separated pieces kept whole (e.g. <sep>,<2de>).")
@click.option("--max-len", default=250, show_default=True, type=int, help="Drop training pairs with more subword tokens on a side.")
@click.option("--max-ratio", default=3.0, show_default=True, type=float, help="Drop training pairs whose token-length ratio exceeds this (0: off).")
@click.option("--dedup", is_flag=True, help="Drop exact duplicate training pairs.")
@click.option("--workers", default=2, show_default=True, type=int, help="Encoding processes.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty output directory.")
@handle_errors
def preprocess(**kwargs: Any) -> None:
    """Train/apply sentencepiece, clean and binarize a parallel corpus."""
    from mtkit.data.preprocess import preprocess as run

    kwargs["user_defined_symbols"] = [s for s in kwargs["user_defined_symbols"].split(",") if s]
    manifest = run(**kwargs)
    click.echo(json.dumps({k: manifest[k] for k in ("splits", "filters") if k in manifest}, indent=1))


# ---------------------------------------------------------------------------------------------
@main.command()
@click.argument("data_dir")
@click.option("-c", "--config", "config", required=True, help="YAML file or preset name (e.g. transformer_small).")
@click.option("--save-dir", required=True, help="Checkpoint directory.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--resume", is_flag=True, help="Continue from SAVE_DIR/checkpoint_last.pt.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--nproc", type=int, default=0, help="Run N processes on this machine through torchrun.")
@handle_errors
def train(data_dir: str, config: str, save_dir: str, overrides: tuple[str, ...], resume: bool, device: str, nproc: int) -> None:
    """Train a model on a preprocessed DATA_DIR."""
    from mtkit.config import load_config
    from mtkit.training.trainer import train as run

    cfg = load_config(config, overrides)
    summary = run(data_dir, cfg, save_dir, resume=resume, device=device)
    click.echo(json.dumps(summary))


# ---------------------------------------------------------------------------------------------
@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def translate(args: tuple[str, ...]) -> None:
    """Translate text with one or more checkpoints (stdin to stdout)."""
    _fail("translate is not built yet")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def score(args: tuple[str, ...]) -> None:
    """Score hypotheses with BLEU / chrF / TER (sacrebleu signatures)."""
    _fail("score is not built yet")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def average(args: tuple[str, ...]) -> None:
    """Average the weights of several checkpoints."""
    _fail("average is not built yet")


@main.group()
def recipe() -> None:
    """Run or check a WMT-style recipe (YAML in recipes/)."""


@recipe.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def recipe_run(args: tuple[str, ...]) -> None:
    """Run a recipe's stages, resuming at the first unfinished one."""
    _fail("recipe is not built yet")


@recipe.command("check", context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def recipe_check(args: tuple[str, ...]) -> None:
    """Validate a recipe without running it."""
    _fail("recipe is not built yet")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def export(args: tuple[str, ...]) -> None:
    """Export a Transformer checkpoint to another inference engine."""
    _fail("export is not built yet")


if __name__ == "__main__":
    main()
