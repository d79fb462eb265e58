"""BLEU, chrF, chrF++ and TER through sacrebleu's library API: the figures and signatures that the
``sacrebleu`` command line prints for the same files and options (trailing whitespace is stripped
from every line, as its CLI does). Options and their sacrebleu equivalents:

- ``tokenize``: ``--tokenize`` (BLEU only; chrF and TER have their own processing). ``"moses"`` has
  none: both sides go through the Moses tokenizer (sacremoses, default escaping) and BLEU counts
  the tokens (``--tokenize none``), as Moses' ``multi-bleu.perl`` does; ``split_compounds``
  rewrites ``a-b`` as ``a ##AT##-##AT## b`` on both sides (the WMT14 En-De papers' BLEU). Either
  shows in the ``tok`` field (``tok:moses``, ``tok:moses+cs``, ``tok:none+cs``); chrF and TER
  always score the text as given.
- ``lowercase``: ``--lowercase --chrf-lowercase`` (TER is case-insensitive unless
  ``ter_case_sensitive``, as in sacrebleu); ``force``: ``--force``; ``sentence``: ``--sentence-level``;
  metric ``chrf++``: ``-m chrf --chrf-word-order 2``; several systems: ``-i SYS_A SYS_B ...``.
- ``paired="bs"|"ar"``: ``--paired-bs`` / ``--paired-ar`` (``paired_n``: ``--paired-bs-n`` /
  ``--paired-ar-n``); the first system is the baseline; the seed is sacrebleu's (``SACREBLEU_SEED``
  from the environment, 12345 by default).

Every result is a dict of sacrebleu's JSON fields (``name``, ``score`` rounded to ``width``
decimals, ``signature``, ``verbose_score`` for BLEU, one key per signature field) plus ``system``
(the hypothesis file); paired tests add ``baseline``, ``p_value``, ``mean``, ``ci``; sentence
scores add ``sentence`` (1-based line number)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sacrebleu.metrics.base import Metric, Score

from mtkit import scoring_metrics
from mtkit.data.text import display_name, iter_lines
from mtkit.errors import MtkitError
from mtkit.scoring_metrics import PAIRED_TESTS, TOKENIZERS, MetricFor, Systems, TextsFor

# --- reading --------------------------------------------------------------------------------

def load_piece_model(path: str | Path):
    """A sentencepiece model from a ``.model`` file or from an mtkit checkpoint (its target model)."""
    from mtkit.checkpoint import MAGIC, load_checkpoint
    from mtkit.data.subword import SubwordModel

    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
    except FileNotFoundError:
        raise MtkitError(f"sentencepiece model or checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise MtkitError(f"expected a sentencepiece model or checkpoint but {path} is a directory") from None
    if head == MAGIC:
        payload = load_checkpoint(path)
        if not isinstance(payload.get("spm"), dict) or "tgt" not in payload["spm"]:
            raise MtkitError(f"checkpoint {path} holds no target sentencepiece model")
        return SubwordModel(payload["spm"]["tgt"], f"{path}:spm.tgt")
    return SubwordModel.from_file(path)


def read_lines(path: str | Path, detok=None) -> list[str]:
    """Lines of a text file (gz or ``-``), trailing whitespace stripped as sacrebleu's CLI does;
    with ``detok`` (a :class:`~mtkit.data.subword.SubwordModel`) each line is read as
    space-separated sentencepiece pieces and detokenised."""
    lines = [line.rstrip() for line in iter_lines(path)]
    if detok is not None:
        lines = [detok.decode_pieces([line.split()])[0] for line in lines]
    return lines


def _check_lengths(systems: Systems, refs: Sequence[tuple[str, Sequence[str]]]) -> None:
    for name, hyps in systems:
        if not hyps:
            raise MtkitError(f"hypothesis file {name} is empty")
        for ref_name, ref in refs:
            if len(ref) != len(hyps):
                raise MtkitError(
                    f"line counts differ: hypothesis file {name} has {len(hyps)} lines, "
                    f"reference file {ref_name} has {len(ref)}"
                )


# --- scoring --------------------------------------------------------------------------------

def score_systems(
    systems: Systems, references: Sequence[Sequence[str]], metrics: Iterable[str] = ("bleu",),
    tokenize: str | None = None, lowercase: bool = False, force: bool = False, chrf_word_order: int = 0,
    sentence: bool = False, paired: str | None = None, paired_n: int = 0, width: int = 1,
    ter_case_sensitive: bool = False, split_compounds: bool = False, lang: str | None = None,
) -> list[dict[str, Any]]:
    """Score in-memory systems ``[(name, lines), ...]`` against ``references`` (one list per reference).

    Results come system by system, metrics in the given order (sentence mode: metric by metric,
    sentence by sentence). ``paired_n`` 0: sacrebleu's default (1000 / 10000). ``tokenize="moses"``
    needs ``lang``, the references' language; see the module docstring for the rest."""
    names = scoring_metrics.parse_metrics(metrics)
    _check_request(systems, references, paired, sentence, tokenize, split_compounds)
    refs = [list(r) for r in references]
    prepare = scoring_metrics.bleu_text(tokenize, split_compounds, lang) if "bleu" in names else None
    bleu_texts = None
    if prepare is not None:  # BLEU reads its own copy of the text; chrF and TER the original
        bleu_texts = ([(n, list(map(prepare, h))) for n, h in systems], [list(map(prepare, r)) for r in refs])

    def texts(name: str) -> tuple[Systems, list[list[str]]]:
        return bleu_texts if name == "bleu" and bleu_texts else (systems, refs)

    def build(name: str, with_refs: bool = True) -> Metric:
        own = name == "bleu" and bleu_texts is not None
        return scoring_metrics.make_metric(
            name, texts(name)[1] if with_refs else None, "none" if own and tokenize == "moses" else tokenize,
            lowercase, force or own, chrf_word_order, sentence, ter_case_sensitive,
        )

    if sentence:
        results = _sentence_scores(names, texts, build, width)
    elif paired:  # one test per metric when BLEU reads other text than the rest
        results = scoring_metrics.paired_scores(
            names, systems, texts, build, paired, paired_n, width, bleu_texts is not None
        )
    else:
        results = _corpus_scores(names, systems, texts, build, width)
    tok = scoring_metrics.bleu_tokenization(tokenize, split_compounds)
    return [scoring_metrics.relabel_bleu(d, tok) if tok and d["name"] == "BLEU" else d for d in results]


def _check_request(
    systems: Systems, references: Sequence[Sequence[str]], paired: str | None, sentence: bool,
    tokenize: str | None, split_compounds: bool,
) -> None:
    """Refuse option combinations sacrebleu would not score, before any scoring."""
    if not systems:
        raise MtkitError("no hypotheses to score")
    if not references:
        raise MtkitError("no references given")
    if paired is not None and paired not in PAIRED_TESTS:
        raise MtkitError(f"unknown paired test '{paired}'; valid: bs, ar")
    if paired and len(systems) < 2:
        raise MtkitError("a paired test needs at least two systems (-s BASELINE -s SYSTEM ...)")
    if sentence and (len(systems) > 1 or paired):
        raise MtkitError("sentence-level scores take one system and no paired test")
    names = [name for name, _ in systems]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise MtkitError(f"system {name} is given twice")
    if tokenize is not None and tokenize not in TOKENIZERS:
        raise MtkitError(f"unknown BLEU tokenizer '{tokenize}'; valid: {', '.join(TOKENIZERS)}")
    if split_compounds and tokenize not in ("moses", "none"):
        raise MtkitError("--compound-split works on tokenized text: use it with -tok moses or -tok none")


def _sentence_scores(names: list[str], texts: TextsFor, build: MetricFor, width: int) -> list[dict[str, Any]]:
    """Every sentence of the one system, metric by metric."""
    results: list[dict[str, Any]] = []
    for name in names:
        (sys_name, hyps), name_refs = texts(name)[0][0], texts(name)[1]
        metric = build(name)
        signature = metric.get_signature().format()
        for i, (hyp, *sent_refs) in enumerate(zip(hyps, *name_refs), start=1):
            d = _score_dict(metric.sentence_score(hyp, sent_refs), signature, width, sys_name)
            d["sentence"] = i
            results.append(d)
    return results


def _corpus_scores(
    names: list[str], systems: Systems, texts: TextsFor, build: MetricFor, width: int
) -> list[dict[str, Any]]:
    """Corpus scores, system by system, metrics in the given order."""
    results: list[dict[str, Any]] = []
    for i, (sys_name, _) in enumerate(systems):
        for name in names:
            metric = build(name, with_refs=False)
            score = scoring_metrics.corpus_score_chunked(metric, texts(name)[0][i][1], texts(name)[1])
            results.append(_score_dict(score, metric.get_signature().format(), width, sys_name))
    return results


def _score_dict(score: Score, signature: str, width: int, system: str) -> dict[str, Any]:
    d = json.loads(score.format(width, False, signature, is_json=True))
    d["system"] = system
    return d


def score_files(
    hyp_path: str | Path | None, ref_paths: Sequence[str | Path], metrics: Iterable[str] = ("bleu",),
    tokenize: str | None = None, lowercase: bool = False, force: bool = False, chrf_word_order: int = 0,
    sentence: bool = False, detok_spm: str | Path | None = None, systems: Sequence[str | Path] = (),
    paired: str | None = None, paired_n: int = 0, width: int = 1, ter_case_sensitive: bool = False,
    split_compounds: bool = False, lang: str | None = None,
) -> list[dict[str, Any]]:
    """Score a hypothesis file (``-`` = stdin) and/or several ``systems`` against reference files.

    The systems are ``[hyp_path] + systems`` (``hyp_path`` may be None if ``systems`` is given).
    ``detok_spm`` (a sentencepiece model or a checkpoint) detokenises piece-segmented hypotheses.
    ``tokenize="moses"`` takes the language from ``lang``, else from the first reference's name
    (``ref.de``). Other options and the results: :func:`score_systems` and the module docstring."""
    names = scoring_metrics.parse_metrics(metrics)  # fail on a bad metric before reading anything
    paths = ([hyp_path] if hyp_path is not None else []) + list(systems)
    if not paths:
        raise MtkitError("no hypothesis file given")
    if not ref_paths:
        raise MtkitError("no reference file given (-r REF)")
    if tokenize == "moses" and not lang and "bleu" in names:
        lang = scoring_metrics.language_of(ref_paths[0])
        if lang is None:
            raise MtkitError(
                f"cannot tell the language of {display_name(ref_paths[0])} from its name "
                "(e.g. test.de); give it with -l SRC-TGT (e.g. -l en-de) for -tok moses"
            )
    detok = load_piece_model(detok_spm) if detok_spm is not None else None
    named = [(display_name(p), read_lines(p, detok)) for p in paths]
    refs = [(display_name(p), read_lines(p)) for p in ref_paths]
    _check_lengths(named, refs)
    return score_systems(
        named, [r for _, r in refs], names, tokenize=tokenize, lowercase=lowercase, force=force,
        chrf_word_order=chrf_word_order, sentence=sentence, paired=paired, paired_n=paired_n, width=width,
        ter_case_sensitive=ter_case_sensitive, split_compounds=split_compounds, lang=lang,
    )


def score(
    hyps: Sequence[str], refs: Sequence[str] | Sequence[Sequence[str]], metrics: Iterable[str] = ("bleu",),
    **options: Any,
) -> list[dict[str, Any]]:
    """Score hypotheses (strings) against one reference list, or several (a list of lists), as
    ``mtkit score`` scores files; ``options`` as :func:`score_systems` (tokenize, lowercase, width, ...)."""
    several = bool(refs) and not isinstance(refs[0], str)
    references = [[line.rstrip() for line in r] for r in (refs if several else [refs])]
    system = ("hypotheses", [line.rstrip() for line in hyps])
    _check_lengths([system], [(f"references {i + 1}", r) for i, r in enumerate(references)])
    return score_systems([system], references, metrics, **options)


# --- printing -------------------------------------------------------------------------------

def _score_line(d: dict[str, Any], width: int) -> tuple[str, str]:
    rest = f" = {d['score']:.{width}f}"
    if d.get("verbose_score"):
        rest += f" {d['verbose_score']}"
    return f"{d['name']}|{d['signature']}", rest


def _cell(d: dict[str, Any], width: int) -> str:
    text = f"{d['score']:.{width}f}"
    if d.get("mean") is not None:
        text += f" ({d['mean']:.{width}f} ± {d['ci']:.{width}f})"
    if d.get("p_value") is not None:
        text += f" (p = {d['p_value']:.4f})" + ("*" if d["p_value"] <= 0.05 else "")
    return text


def _table(results: list[dict[str, Any]], width: int) -> str:
    cells: dict[tuple[str, str], str] = {}  # (system label, metric) -> cell
    sigs: dict[str, str] = {}  # metric -> signature
    for d in results:
        label = f"Baseline: {d['system']}" if d.get("baseline") else d["system"]
        cells[label, d["name"]] = _cell(d, width)
        sigs[d["name"]] = d["signature"]
    systems, metrics = list(dict.fromkeys(label for label, _ in cells)), list(sigs)  # in first-seen order
    paired = results[0].get("test")
    heads = [f"{m} (μ ± 95% CI)" if results[0].get("mean") is not None else m for m in metrics]
    rows = [["System", *heads]] + [[s, *(cells.get((s, m), "") for m in metrics)] for s in systems]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join([r[0].rjust(widths[0])] + [c.ljust(w) for c, w in zip(r[1:], widths[1:])]).rstrip() for r in rows]
    lines.append("")
    if paired:
        n = results[0]["n"]
        trials = "resampling trials" if paired == "bs" else "trials"
        lines.append(f"Paired {PAIRED_TESTS[paired]} test with {n} {trials}: every system against the baseline;")
        lines.append("p-values < 0.05 (marked *) reject the hypothesis that both come from the same process.")
        lines.append("")
    lines += ["-----------------", "Metric signatures", "-----------------"]
    lines += [f" - {name:<10} {sig}" for name, sig in sigs.items()]
    return "\n".join(lines)


def format_results(results: list[dict[str, Any]], fmt: str = "text", width: int = 1) -> str:
    """Render :func:`score_files` results as sacrebleu prints them (``text``) or as a JSON list.
    ``text``: one ``NAME|signature = score`` line per metric, aligned on ``=`` (sentence mode: one
    line per sentence and metric); several systems: a table plus the signatures. ``json``: always a
    list of result objects (sacrebleu prints a bare object for one metric)."""
    if fmt == "json":
        return json.dumps(results, indent=1, ensure_ascii=False)
    if fmt != "text":
        raise MtkitError(f"unknown output format '{fmt}'; valid: text, json")
    if not results:
        return ""
    if "sentence" in results[0]:
        return "\n".join("".join(_score_line(d, width)) for d in results)
    if len({d["system"] for d in results}) > 1:
        return _table(results, width)
    pairs = [_score_line(d, width) for d in results]
    w = max(len(left) for left, _ in pairs)
    return "\n".join(f"{left:>{w}}{right}" for left, right in pairs)
