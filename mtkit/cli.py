"""The command line: parse options, call one library function, print. No logic lives here."""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from mtkit.errors import MtkitError
from mtkit.signals import Interrupted
from mtkit.utils import setup_logging

logger = logging.getLogger("mtkit")


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors into one ``error:`` line and exit 1; ``--debug`` re-raises."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool((click.get_current_context().find_root().obj or {}).get("debug"))
        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:
            sys.stderr.close()  # downstream closed the pipe (e.g. `| head`): not an error
            sys.exit(0)
        except (MtkitError, KeyboardInterrupt, Interrupted, OSError) as exc:
            if debug:
                raise
            if isinstance(exc, KeyboardInterrupt):
                _fail("interrupted", 130)
            if isinstance(exc, Interrupted):
                _fail(exc.message, exc.exit_code)
            if isinstance(exc, OSError):
                _fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
            _fail(str(exc))

    return wrapper


def examples(*lines: str) -> str:
    """A command's help epilog: a few real invocations, printed as written."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


def _verbosity(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """-q / -v / --debug given after the subcommand act as they do before it."""
    if not value or ctx.resilient_parsing:
        return
    obj = ctx.find_root().obj
    if param.name == "debug":
        obj["debug"] = True
        return
    obj["verbosity"] = 1 if param.name == "verbose" else -1
    setup_logging(obj["verbosity"])


VERBOSITY = (
    (("-v", "--verbose"), "Debug-level logs on stderr."),
    (("-q", "--quiet"), "Only warnings and errors on stderr (a run's log file keeps INFO)."),
    (("--debug",), "Show the full traceback of an error."),
)


class Commands(click.Group):
    """mtkit's command groups: every command also takes -q / -v / --debug after its name."""

    group_class = type  # subgroups (recipe, data) are Commands too

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        if not isinstance(cmd, click.Group):
            cmd.params += [click.Option(list(decls), is_flag=True, expose_value=False, callback=_verbosity, help=text)
                           for decls, text in VERBOSITY]
        super().add_command(cmd, name)


# options several commands share, word for word
device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                             show_default=True)
format_option = click.option("-f", "--format", "fmt", type=click.Choice(["text", "json"]), default="text",
                             show_default=True)
force_option = click.option("--force", is_flag=True, help="Overwrite a non-empty output directory.")
recipe_argument = click.argument("recipe_file", metavar="RECIPE")
recipe_data_dir_option = click.option("--data-dir", default=None,
                                      help="Directory holding the corpus files (default: $MTKIT_DATA).")


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if not value or ctx.resilient_parsing:
        return
    from mtkit.provenance import versions

    found = versions()
    click.echo(f"mtkit {found.pop('mtkit')} ({', '.join(f'{k} {v}' for k, v in found.items())})")
    ctx.exit()


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the versions of mtkit, torch, sentencepiece and sacrebleu and exit.")
@click.option("-v", "--verbose", is_flag=True, help=VERBOSITY[0][1])
@click.option("-q", "--quiet", is_flag=True, help=VERBOSITY[1][1])
@click.option("--debug", is_flag=True, help=VERBOSITY[2][1])
@click.pass_context
def main(ctx: click.Context, verbose: bool, quiet: bool, debug: bool) -> None:
    """mtkit: neural machine translation from raw text to scored, averaged models.

    Data goes to stdout, logs to stderr, so every command composes in shell pipelines.
    Without -q/-v the MTKIT_LOG_LEVEL environment variable (debug, info, warning) sets the level.
    """
    ctx.obj = {"debug": debug, "verbosity": 1 if verbose else -1 if quiet else 0}
    try:
        setup_logging(ctx.obj["verbosity"])
    except MtkitError as exc:
        _fail(str(exc))


@main.command(epilog=examples(
    "mtkit preprocess -s en -t de --train corpus/train --valid corpus/val -o data/m30k",
    "mtkit preprocess -s en -t de --train corpus/train --test corpus/test_2016_flickr -o data/m30k --vocab-size 8000 --separate",
))
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
@force_option
@handle_errors
def preprocess(**kwargs: Any) -> None:
    """Train/apply sentencepiece, clean and binarize a parallel corpus."""
    from mtkit.data.preprocess import preprocess as run

    kwargs["user_defined_symbols"] = [s for s in kwargs["user_defined_symbols"].split(",") if s]
    manifest = run(**kwargs)
    click.echo(json.dumps({k: manifest[k] for k in ("splits", "filters") if k in manifest}, indent=1))


@main.command(epilog=examples(
    "mtkit train data/m30k -c transformer_small --save-dir ckpt --set train.max_updates=3000",
    "mtkit train data/m30k -c transformer_small --save-dir ckpt --resume -q",
    "mtkit train data/m30k -c ckpt/config.yaml --save-dir ckpt2 --dump-config",
))
@click.argument("data_dir")
@click.option("-c", "--config", "config", required=True, help="YAML file or preset name (e.g. transformer_small; `mtkit presets` lists them).")
@click.option("--save-dir", required=True, help="Checkpoint directory.")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE", help="Override a config key (repeatable).")
@click.option("--resume", is_flag=True, help="Continue from SAVE_DIR/checkpoint_last.pt.")
@device_option
@click.option("--nproc", type=int, default=0, help="Data-parallel: run N ranks on this machine through torchrun (one per GPU).")
@click.option("--dump-config", is_flag=True, help="Print the resolved config (preset + file + --set, every key) as YAML and exit; writes nothing.")
@handle_errors
def train(data_dir: str, config: str, save_dir: str, overrides: tuple[str, ...], resume: bool, device: str, nproc: int,
          dump_config: bool) -> None:
    """Train a model on a preprocessed DATA_DIR.

    SAVE_DIR receives the checkpoints, metrics.jsonl, train.log (INFO level whatever the console
    shows, starting with the run's provenance: versions, command, machine, data hash) and the
    resolved config.yaml, which -c takes back to repeat the run exactly.
    Several GPUs or machines: `torchrun --nproc-per-node N -m mtkit train ...` (or --nproc N)."""
    from mtkit.training.command import train_command

    root = click.get_current_context().find_root().obj
    code, text = train_command(data_dir, config, save_dir, overrides, resume, device, nproc, dump_config,
                               verbosity=root["verbosity"], debug=root["debug"])
    if text:
        click.echo(text, nl=False)
    if code:
        sys.exit(code)


@main.command(epilog=examples(
    'echo "A man is riding a bike." | mtkit translate -m ckpt/checkpoint_best.pt',
    "mtkit translate -m a.pt -m b.pt -i test.en -o test.hyp --beam 5 --resume",
    "mtkit translate -m ckpt.pt -i test.en --beam 8 --nbest 8 --output-format nbest > test.nbest",
))
@click.option("-m", "--model", "model_paths", multiple=True, required=True, help="Checkpoint (repeat for an ensemble with the same vocabulary).")
@click.option("-i", "--input", "input_path", default="-", show_default=True, help="Input file (plain or .gz), - for stdin. Piped or typed input is answered as soon as it pauses (50 ms); flowing input and files are translated in full length-sorted buffers.")
@click.option("-o", "--output", "output_path", default="-", show_default=True, help="Output file, - for stdout.")
@click.option("--beam", type=int, default=None, help="Beam size (1 = greedy). Default: the checkpoint's decode.beam.")
@click.option("--nbest", type=int, default=None, help="Hypotheses per sentence (n-best / jsonl output, or samples).")
@click.option("--batch-size", type=int, default=None, help="Sentences per batch.")
@click.option("--max-tokens", type=int, default=None, help="Source tokens per batch (used unless --batch-size).")
@click.option("--lenpen", "length_penalty", type=click.Choice(["none", "average", "gnmt"]), default=None, help="Length normalisation.")
@click.option("--alpha", type=float, default=None, help="GNMT length-penalty exponent.")
@click.option("--beta", type=float, default=None, help="GNMT coverage-penalty weight.")
@click.option("--min-len", type=int, default=None, help="Minimum output tokens.")
@click.option("--max-len-a", type=float, default=None, help="Max output tokens = a * source tokens + b.")
@click.option("--max-len-b", type=int, default=None)
@click.option("--no-repeat-ngram", type=int, default=None, help="Never repeat an n-gram of this size.")
@click.option("--stopping", type=click.Choice(["full", "first"]), default=None, help="Beam search ends a sentence once beam-size hypotheses are finished (full) or once its best extension ends (first).")
@click.option("--sampling", is_flag=True, help="Sample instead of searching (back-translation).")
@click.option("--temperature", type=float, default=1.0, show_default=True)
@click.option("--topk", type=int, default=0, show_default=True, help="Sample among the k best tokens (0: all).")
@click.option("--topp", type=float, default=1.0, show_default=True, help="Nucleus sampling mass (1: off).")
@click.option("--seed", type=int, default=None, help="Random seed for sampling.")
@device_option
@click.option("--input-format", type=click.Choice(["text", "pieces", "ids"]), default="text", show_default=True)
@click.option("--output-format", type=click.Choice(["text", "nbest", "jsonl"]), default="text", show_default=True, help="nbest: Moses/Marian lines `id ||| hypothesis ||| F0= score ||| score` (0-based id, --nbest per sentence).")
@click.option("--output-units", type=click.Choice(["text", "pieces", "ids"]), default="text", show_default=True, help="Hypotheses as detokenized text, pieces or ids.")
@click.option("--alignment", type=click.Choice(["none", "argmax", "full"]), default="argmax", show_default=True, help="jsonl: attention argmax per target piece, or the full matrix too.")
@click.option("--errors", type=click.Choice(["strict", "replace"]), default="strict", show_default=True, help="Invalid UTF-8 input: fail with the line number, or replace.")
@click.option("--plot-attention", default=None, metavar="DIR", help="Write one attention heatmap PNG per sentence (needs matplotlib).")
@click.option("--engine", type=click.Choice(["torch", "ctranslate2"]), default="torch", show_default=True, help="ctranslate2: -m is a directory written by `mtkit export`.")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True, help="Weights and activations (torch engine): bfloat16 is faster on CPUs with AVX512-BF16 (BLEU within about 0.1); float16 needs CUDA. Scores stay float32.")
@click.option("--resume", is_flag=True, help="Continue a partly written --output file.")
@handle_errors
def translate(model_paths: tuple[str, ...], input_path: str, output_path: str, device: str, output_format: str, resume: bool, **kwargs: Any) -> None:
    """Translate text with one or more checkpoints (stdin to stdout)."""
    from mtkit.decoding.translate import translate_file

    decode_keys = ("beam", "nbest", "length_penalty", "alpha", "beta", "min_len", "max_len_a", "max_len_b", "no_repeat_ngram", "stopping")
    overrides = {k: v for k in decode_keys if (v := kwargs.pop(k)) is not None}
    stats = translate_file(list(model_paths), input_path, output_path, device=device, output_format=output_format,
                           resume=resume, decode_overrides=overrides, **kwargs)
    logger.info("translated %d lines (%d skipped) in %.1f s: %.1f sentences/s, %.1f target pieces/s",
                stats["lines"], stats["skipped"], stats["seconds"], stats["sentences_per_s"], stats["tgt_tokens_per_s"])


@main.command(epilog=examples(
    "mtkit score -r test.de -i test.hyp -m bleu chrf ter",
    "mtkit score -t multi30k/test_2016_flickr -l en-de -i test.hyp",
    "mtkit score -r test.de -s base.hyp -s new.hyp --paired-bs",
))
@click.option("-r", "--ref", "refs", multiple=True, help="Reference file (repeatable for several references).")
@click.option("-t", "--test-set", default=None, metavar="DATASET/SPLIT", help="Take the reference from the dataset catalog (e.g. multi30k/test_2016_flickr; needs -l).")
@click.option("-l", "--langpair", default=None, metavar="SRC-TGT", help="Language pair, e.g. en-de: of -t (the reference is its second language), and the language -tok moses tokenizes (default: the reference file's suffix, e.g. de for test.de).")
@click.option("--data-dir", default=None, help="Directory holding the catalog's files for -t (default: $MTKIT_DATA, then the cache, then a download).")
@click.option("-i", "--input", "hyp", default=None, help="Hypothesis file (default: stdin unless -s is given).")
@click.option("-m", "--metrics", "metrics", multiple=True, metavar="METRIC", help="bleu (default), chrf, chrf++, ter; -m bleu chrf, -m bleu -m ter or -m bleu,ter.")
@click.argument("more_metrics", nargs=-1, metavar="")
@click.option("-tok", "--tokenize", default=None, help="BLEU tokenizer: 13a (default), intl, zh, char, none, ... (sacrebleu's names), or moses: the Moses tokenizer, then BLEU on its tokens (the papers' tokenized BLEU).")
@click.option("--compound-split", "split_compounds", is_flag=True, help="Split hyphenated compounds (a-b -> a ##AT##-##AT## b) on both sides before BLEU, as the WMT14 En-De papers do; with -tok moses, or -tok none for text already tokenized (but not already split).")
@click.option("-lc", "--lowercase", is_flag=True, help="Case-insensitive BLEU and chrF.")
@click.option("--ter-case-sensitive", is_flag=True, help="Case-sensitive TER (sacrebleu's TER lowercases by default).")
@click.option("--force", is_flag=True, help="Do not warn about hypotheses that look tokenized.")
@format_option
@click.option("-sl", "--sentence", is_flag=True, help="Per-sentence scores (one system).")
@click.option("-s", "--system", "systems", multiple=True, help="System output to compare (repeatable; the first system is the baseline).")
@click.option("--paired-bs", is_flag=True, help="Paired bootstrap resampling test against the baseline.")
@click.option("--paired-bs-n", type=click.IntRange(min=1), default=1000, show_default=True, help="Bootstrap resamples.")
@click.option("--paired-ar", is_flag=True, help="Paired approximate randomisation test against the baseline.")
@click.option("--paired-ar-n", type=click.IntRange(min=1), default=10000, show_default=True, help="Approximate randomisation trials.")
@click.option("-w", "--width", type=click.IntRange(0, 10), default=1, show_default=True, help="Decimals printed.")
@click.option("--detok-pieces", "detok", default=None, metavar="SPM_OR_CKPT", help="Detokenise space-separated sentencepiece pieces with this model (or a checkpoint's) first.")
@handle_errors
def score(refs: tuple[str, ...], test_set: str | None, langpair: str | None, data_dir: str | None, hyp: str | None, metrics: tuple[str, ...], more_metrics: tuple[str, ...], tokenize: str | None, split_compounds: bool, lowercase: bool, ter_case_sensitive: bool, force: bool, fmt: str, sentence: bool, systems: tuple[str, ...], paired_bs: bool, paired_bs_n: int, paired_ar: bool, paired_ar_n: int, width: int, detok: str | None) -> None:
    """Score hypotheses with BLEU / chrF / TER (sacrebleu signatures).

    Reads the hypotheses from -i or stdin; with -s SYS (repeatable) scores several systems
    against the same references, and --paired-bs / --paired-ar test each against the first.
    -tok, -l and --compound-split change BLEU only (its signature's tok field says how: e.g.
    tok:moses+cs); chrF and TER always score the text as given.
    """
    from mtkit.data.catalog import test_set_file
    from mtkit.scoring import format_results, score_files

    if test_set is not None and langpair is None:
        raise MtkitError("-t/--test-set needs -l/--langpair, e.g. -t multi30k/test_2016_flickr -l en-de")
    lang = None
    if langpair is not None:
        src, _, lang = langpair.partition("-")
        if not src or not lang or "-" in lang:
            raise MtkitError(f"-l/--langpair '{langpair}' must look like SRC-TGT, e.g. en-de")
    if test_set is not None:
        refs = (*refs, str(test_set_file(test_set, langpair, "ref", data_dir)))
    if not refs:
        raise MtkitError("no reference given: -r REF, or -t DATASET/SPLIT -l SRC-TGT")
    if more_metrics and not metrics:
        raise MtkitError(f"unexpected argument '{more_metrics[0]}' (references go after -r, hypotheses after -i)")
    if paired_bs and paired_ar:
        raise MtkitError("choose one of --paired-bs and --paired-ar")
    paired = "bs" if paired_bs else "ar" if paired_ar else None
    results = score_files(hyp if hyp is not None or systems else "-", refs, metrics + more_metrics,
                          tokenize=tokenize, split_compounds=split_compounds, lang=lang, lowercase=lowercase,
                          force=force, sentence=sentence, detok_spm=detok, systems=systems, paired=paired,
                          paired_n=paired_bs_n if paired == "bs" else paired_ar_n, width=width,
                          ter_case_sensitive=ter_case_sensitive)
    try:
        click.echo(format_results(results, fmt, width))
    except BrokenPipeError:
        raise
    except OSError as exc:  # e.g. a full disk behind a redirected stdout
        raise MtkitError(f"could not write the scores to stdout: {exc.strerror or exc}") from None


@main.command(epilog=examples(
    "mtkit average ckpt/ --last 5 -o avg.pt          highest update numbers",
    "mtkit average ckpt/ --best 5 -o avg.pt          best valid BLEU (else lowest valid loss)",
    "mtkit average a.pt b.pt c.pt -o avg.pt          these files",
))
@click.argument("inputs", nargs=-1, required=True, metavar="(CKPT_DIR | CKPT ...)")
@click.option("--last", type=click.IntRange(min=1), default=None, help="Average the N checkpoint_<update>.pt with the highest update numbers.")
@click.option("--best", type=click.IntRange(min=1), default=None, help="Average the N checkpoint_<update>.pt with the best validation BLEU (or loss).")
@click.option("-o", "--output", "out_path", required=True, help="Averaged checkpoint to write.")
@handle_errors
def average(inputs: tuple[str, ...], last: int | None, best: int | None, out_path: str) -> None:
    """Average the weights of several checkpoints."""
    from mtkit.average import average_checkpoints, select_checkpoints

    if (last is not None or best is not None) and len(inputs) != 1:
        raise MtkitError("--last/--best take exactly one checkpoint directory")
    paths = select_checkpoints(inputs[0] if len(inputs) == 1 else list(inputs), last=last, best=best)
    average_checkpoints(paths, out_path)
    click.echo(json.dumps({"output": out_path, "averaged": [str(p) for p in paths]}))


@main.group()
def recipe() -> None:
    """List, check or run a WMT-style recipe: a shipped one by name (`mtkit recipe list`) or a YAML file."""


@recipe.command("list", epilog=examples(
    "mtkit recipe list",
    "mtkit recipe list | grep multi30k",
    "mtkit recipe check multi30k_en_de_transformer          (a listed recipe, by name)",
))
@handle_errors
def recipe_list() -> None:
    """The shipped recipes: languages, model family and the number each cites."""
    from mtkit.recipes.load import format_recipe_list, list_recipes

    click.echo(format_recipe_list(list_recipes()))


@recipe.command("run", epilog=examples(
    "MTKIT_DATA=data/multi30k mtkit recipe run multi30k_en_de_transformer --workdir runs/m30k",
    "mtkit recipe run multi30k_en_de_gnmt --workdir /tmp/smoke --smoke",
    "mtkit recipe run my_recipe.yaml --workdir runs/mine --stages train-score --set train.lr=5e-4",
))
@recipe_argument
@click.option("--workdir", required=True, help="Directory for every stage's outputs and markers (and run.log).")
@click.option("--stages", multiple=True, metavar="STAGE[,STAGE|A-B]",
              help="Run only these stages (prepare, preprocess, train, average, translate, score).")
@click.option("--set", "overrides", multiple=True, metavar="KEY.SUB=VALUE",
              help="Override a recipe key, e.g. train.lr=5e-4 or average.last=3 (repeatable).")
@recipe_data_dir_option
@click.option("--smoke", is_flag=True, help="Tiny model, a few updates, a few hundred lines: checks every stage.")
@click.option("--force", is_flag=True, help="Redo the selected stages even if they are done.")
@device_option
@handle_errors
def recipe_run(recipe_file: str, workdir: str, stages: tuple[str, ...], overrides: tuple[str, ...],
               data_dir: str | None, smoke: bool, force: bool, device: str) -> None:
    """Run a recipe's stages, resuming at the first unfinished one.

    RECIPE is a shipped recipe's name or a YAML file. WORKDIR/run.log keeps the run's INFO log
    (appended on resume) after its provenance; results.json carries the same record."""
    from mtkit.utils import limit_onednn_caches

    limit_onednn_caches()  # training is most of a recipe's time (see there)
    from mtkit.recipes.runner import run_recipe

    summary = run_recipe(recipe_file, workdir, stages=stages, overrides=overrides, data_dir=data_dir,
                         smoke=smoke, device=device, force=force)
    click.echo(json.dumps(summary, indent=1))


@recipe.command("check", epilog=examples(
    "mtkit recipe check multi30k_en_de_transformer",
    "mtkit recipe check wmt14_en_de_transformer_base --data-dir /data/wmt14",
    "mtkit recipe check my_recipe.yaml --smoke",
))
@recipe_argument
@click.option("--set", "overrides", multiple=True, metavar="KEY.SUB=VALUE", help="Override a recipe key (repeatable).")
@recipe_data_dir_option
@click.option("--smoke", is_flag=True, help="Check the --smoke variant.")
@handle_errors
def recipe_check(recipe_file: str, overrides: tuple[str, ...], data_dir: str | None, smoke: bool) -> None:
    """Validate a recipe (name or YAML file) without running it; show where each data file would come from."""
    from mtkit.recipes.load import check_recipe

    click.echo(json.dumps(check_recipe(recipe_file, overrides, data_dir=data_dir, smoke=smoke), indent=1))


@main.group()
def data() -> None:
    """The dataset catalog's files: a test set's source or reference, as sacrebleu's -t gives them."""


@data.command("get", epilog=examples(
    "mtkit data get multi30k/test_2016_flickr -l en-de --side src > test.en",
    "mtkit data get multi30k/test_2016_flickr -l en-de --side src | mtkit translate -m ckpt.pt "
    "| mtkit score -t multi30k/test_2016_flickr -l en-de",
))
@click.argument("test_set", metavar="DATASET/SPLIT")
@click.option("-l", "--langpair", required=True, metavar="SRC-TGT", help="Language pair, e.g. en-de.")
@click.option("--side", type=click.Choice(["src", "ref"]), default="src", show_default=True, help="src: the pair's first language; ref: its second.")
@click.option("--data-dir", default=None, help="Directory holding the catalog's files (default: $MTKIT_DATA, then the cache, then a download).")
@handle_errors
def data_get(test_set: str, langpair: str, side: str, data_dir: str | None) -> None:
    """Print one side of a catalog split to stdout."""
    from mtkit.data.catalog import test_set_file
    from mtkit.data.text import iter_lines

    out = click.get_text_stream("stdout", encoding="utf-8")
    out.writelines(line + "\n" for line in iter_lines(test_set_file(test_set, langpair, side, data_dir)))
    out.flush()


@main.command(epilog=examples("mtkit info ckpt/checkpoint_best.pt", "mtkit info avg.pt --format json"))
@click.argument("checkpoint")
@format_option
@handle_errors
def info(checkpoint: str, fmt: str) -> None:
    """What a checkpoint holds and how it was made: model size, languages, vocabularies and the
    training run's provenance (versions, command, machine, config, data hash)."""
    from mtkit.provenance import describe_checkpoint, format_info

    found = describe_checkpoint(checkpoint)
    click.echo(json.dumps(found, indent=1, default=str) if fmt == "json" else format_info(found))


@main.command(epilog=examples("mtkit presets", "mtkit train data/m30k -c transformer_small --save-dir ckpt --dump-config"))
@handle_errors
def presets() -> None:
    """The built-in config presets that `train -c NAME` takes, with their descriptions."""
    from mtkit.config import preset_descriptions

    found = preset_descriptions()
    width = max(map(len, found), default=0)
    for name, text in found.items():
        click.echo(f"{name:<{width}}  {text}")


@main.command(epilog=examples("mtkit plot ckpt/metrics.jsonl -o curves.png",
                              "mtkit plot runs/m30k/checkpoints/metrics.jsonl -o m30k.png --title m30k"))
@click.argument("metrics_file", metavar="METRICS.jsonl")
@click.option("-o", "--output", "out_png", required=True, help="Image to write (PNG; the suffix picks the format).")
@click.option("--title", default="", help="Figure title.")
@handle_errors
def plot(metrics_file: str, out_png: str, title: str) -> None:
    """Draw a training run's loss and validation BLEU curves (needs matplotlib)."""
    from mtkit.report import plot_curves

    click.echo(str(plot_curves(metrics_file, out_png, title=title)))


@main.command(epilog=examples(
    "mtkit export --format ctranslate2 -m avg.pt -o model-ct2",
    "mtkit export -m avg.pt -o model-ct2-int8 --quantization int8",
    "mtkit translate --engine ctranslate2 -m model-ct2 -i test.en",
))
@click.option("--format", "fmt", type=click.Choice(["ctranslate2"]), default="ctranslate2", show_default=True, help="Target engine.")
@click.option("-m", "--model", "ckpt_path", required=True, help="Transformer checkpoint to export.")
@click.option("-o", "--output", "out_dir", required=True, help="Output model directory.")
@click.option("--quantization", default=None, help="Weight type: int8, int8_float32, int8_float16, int8_bfloat16, int16, float16, bfloat16, float32 (default: float32).")
@force_option
@handle_errors
def export(fmt: str, ckpt_path: str, out_dir: str, quantization: str | None, force: bool) -> None:
    """Export a Transformer checkpoint to another inference engine (pip install 'mtkit[ct2]').

    The output directory is self-contained (model, vocabularies, sentencepiece models) and is
    what `mtkit translate --engine ctranslate2 -m DIR` reads.
    """
    from mtkit.export import export as run

    meta = run(fmt, ckpt_path, out_dir, quantization=quantization, force=force)
    click.echo(json.dumps({"output": out_dir, "format": fmt, "quantization": meta["quantization"],
                           "ctranslate2_version": meta["ctranslate2_version"]}))


if __name__ == "__main__":
    main()
