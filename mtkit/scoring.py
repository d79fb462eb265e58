"""BLEU, chrF, chrF++ and TER through sacrebleu's library API, each with its sacrebleu signature.

The figures and signatures are the ones the ``sacrebleu`` command line prints for the same
files and options (its CLI strips trailing whitespace from every line; so does this module).
Option mapping to sacrebleu's command line:

- ``tokenize`` -> ``--tokenize`` (BLEU only; chrF and TER have their own processing)
- ``tokenize="moses"`` has no sacrebleu equivalent: hypotheses and references go through the
  Moses tokenizer (sacremoses, default escaping) and BLEU counts the resulting tokens
  (``--tokenize none``), as Moses' ``multi-bleu.perl`` does; ``split_compounds`` rewrites
  ``a-b`` as ``a ##AT##-##AT## b`` on both sides (the WMT14 En-De papers' BLEU). Either shows in
  the signature's ``tok`` field (``tok:moses``, ``tok:moses+cs``, ``tok:none+cs``). chrF and TER
  always score the text as given.
- ``lowercase`` -> ``--lowercase --chrf-lowercase`` (TER is case-insensitive unless
  ``ter_case_sensitive``, as in sacrebleu)
- ``force`` -> ``--force``; metric ``chrf++`` -> ``-m chrf --chrf-word-order 2``
- ``sentence`` -> ``--sentence-level``; several systems -> ``-i SYS_A SYS_B ...``
- ``paired="bs"|"ar"`` -> ``--paired-bs`` / ``--paired-ar`` (``paired_n`` -> ``--paired-bs-n`` /
  ``--paired-ar-n``); the first system is the baseline. The random seed is sacrebleu's:
  ``SACREBLEU_SEED`` from the environment, 12345 by default.

Every result is a dict with sacrebleu's JSON fields (``name``, ``score`` rounded to ``width``
decimals, ``signature``, ``verbose_score`` for BLEU, and one key per signature field) plus
``system`` (the hypothesis file). Paired tests add ``baseline``, ``p_value``, ``mean``, ``ci``;
sentence scores add ``sentence`` (1-based line number).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from sacrebleu.metrics import BLEU, CHRF, TER
from sacrebleu.metrics.base import Metric, Score
from sacrebleu.significance import PairedTest

from mtkit.data.text import display_name, iter_lines
from mtkit.errors import MtkitError

METRICS = ("bleu", "chrf", "chrf++", "ter")
SACREBLEU_TOKENIZERS = tuple(BLEU.TOKENIZERS)
TOKENIZERS = (*SACREBLEU_TOKENIZERS, "moses")
PAIRED_TESTS = {"bs": "bootstrap resampling", "ar": "approximate randomization"}


# --------------------------------------------------------------------------------------------
# reading


def parse_metrics(values: Iterable[str]) -> list[str]:
    """``["bleu chrf", "ter,chrf++"]`` -> ``["bleu", "chrf", "ter", "chrf++"]`` (checked, deduplicated)."""
    names: list[str] = []
    for value in values:
        for name in value.replace(",", " ").split():
            name = name.lower()
            if name not in METRICS:
                raise MtkitError(f"unknown metric '{name}'; valid: {', '.join(METRICS)}")
            if name not in names:
                names.append(name)
    return names or ["bleu"]


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
    """Lines of a text file (gz or ``-``), trailing whitespace stripped as sacrebleu's CLI does.

    ``detok``: a :class:`~mtkit.data.subword.SubwordModel`; each line is read as
    space-separated sentencepiece pieces and detokenised.
    """
    lines = [line.rstrip() for line in iter_lines(path)]
    if detok is not None:
        lines = [detok.decode_pieces([line.split()])[0] for line in lines]
    return lines


def _check_lengths(systems: Sequence[tuple[str, list[str]]], refs: Sequence[tuple[str, list[str]]]) -> None:
    for name, hyps in systems:
        if not hyps:
            raise MtkitError(f"hypothesis file {name} is empty")
        for ref_name, ref in refs:
            if len(ref) != len(hyps):
                raise MtkitError(
                    f"line counts differ: hypothesis file {name} has {len(hyps)} lines, "
                    f"reference file {ref_name} has {len(ref)}"
                )


# --------------------------------------------------------------------------------------------
# tokenized BLEU: Moses tokenization and compound splitting before sacrebleu

_COMPOUND = re.compile(r"(\S)-(\S)")


def compound_split(line: str) -> str:
    """``a-b`` -> ``a ##AT##-##AT## b`` for every hyphen between two non-space characters.

    The rewrite is Perl's ``s{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g``: matches do not overlap, so in
    ``a-b-c`` only the first hyphen is split (the ``b`` belongs to the first match).
    """
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", line)


def _sacremoses():
    try:
        import sacremoses.corpus  # binds the package too
    except ImportError:
        raise MtkitError("-tok moses needs the sacremoses package: pip install sacremoses") from None
    return sacremoses


def moses_tokenizer(lang: str) -> Callable[[str], str]:
    """The Moses tokenizer for ``lang`` with its default escaping (``&`` -> ``&amp;``, ...)."""
    tokenizer = _sacremoses().MosesTokenizer(lang=lang)
    return lambda line: tokenizer.tokenize(line, escape=True, return_str=True)


def moses_languages() -> set[str]:
    """Language codes with their own Moses rules (nonbreaking prefixes); others fall back to English."""
    return set(_sacremoses().corpus.NonbreakingPrefixes().available_langs.values())


def language_of(path: str | Path) -> str | None:
    """The language a file name ends in (``newstest2014.de``, ``test.de.gz`` -> ``de``), if Moses knows it."""
    name = Path(str(path)).name
    name = name[: -len(".gz")] if name.endswith(".gz") else name
    suffix = Path(name).suffix.lstrip(".").lower()
    return suffix if suffix in moses_languages() else None


def bleu_tokenization(tokenize: str | None, split_compounds: bool) -> str | None:
    """The signature's ``tok`` value when mtkit processes BLEU's text itself (None: sacrebleu's own)."""
    if tokenize == "moses" or split_compounds:
        return f"{tokenize}+cs" if split_compounds else tokenize
    return None


def _bleu_text(tokenize: str | None, split_compounds: bool, lang: str | None) -> Callable[[str], str] | None:
    """What every hypothesis and reference line goes through before BLEU (None: nothing)."""
    if tokenize != "moses":
        return compound_split if split_compounds else None
    if not lang:
        raise MtkitError("-tok moses needs the language of the references: -l SRC-TGT")
    tok = moses_tokenizer(lang)
    return (lambda line: compound_split(tok(line))) if split_compounds else tok


def _relabel(d: dict[str, Any], tok: str) -> dict[str, Any]:
    d["tok"] = tok
    d["signature"] = "|".join(f"tok:{tok}" if kv.startswith("tok:") else kv for kv in d["signature"].split("|"))
    return d


# --------------------------------------------------------------------------------------------
# scoring


def make_metric(
    name: str,
    references: Sequence[Sequence[str]] | None = None,
    tokenize: str | None = None,
    lowercase: bool = False,
    force: bool = False,
    chrf_word_order: int = 0,
    sentence: bool = False,
    ter_case_sensitive: bool = False,
) -> Metric:
    """One sacrebleu metric object, configured as sacrebleu's CLI would for the same options.

    ``references``: one list of lines per reference file (cached inside the metric).
    """
    if name == "bleu":
        if tokenize is not None and tokenize not in SACREBLEU_TOKENIZERS:
            raise MtkitError(f"unknown BLEU tokenizer '{tokenize}'; valid: {', '.join(SACREBLEU_TOKENIZERS)}")
        # sentence-level BLEU uses effective n-gram order, as sacrebleu's --sentence-level does
        return BLEU(lowercase=lowercase, force=force, tokenize=tokenize, effective_order=sentence, references=references)
    if name in ("chrf", "chrf++"):
        word_order = 2 if name == "chrf++" else chrf_word_order
        return CHRF(word_order=word_order, lowercase=lowercase, references=references)
    if name == "ter":
        return TER(case_sensitive=ter_case_sensitive, references=references)
    raise MtkitError(f"unknown metric '{name}'; valid: {', '.join(METRICS)}")


def _rounded(x: float | None, width: int) -> float | None:
    return None if x is None else float(f"{float(x):.{width}f}")


def _score_dict(score: Score, signature: str, width: int, system: str) -> dict[str, Any]:
    d = json.loads(score.format(width, False, signature, is_json=True))
    d["system"] = system
    return d


def score_systems(
    systems: Sequence[tuple[str, Sequence[str]]],
    references: Sequence[Sequence[str]],
    metrics: Iterable[str] = ("bleu",),
    tokenize: str | None = None,
    lowercase: bool = False,
    force: bool = False,
    chrf_word_order: int = 0,
    sentence: bool = False,
    paired: str | None = None,
    paired_n: int = 0,
    width: int = 1,
    ter_case_sensitive: bool = False,
    split_compounds: bool = False,
    lang: str | None = None,
) -> list[dict[str, Any]]:
    """Score in-memory systems ``[(name, lines), ...]`` against ``references`` (one list per reference).

    Results come system by system, metrics in the given order (sentence mode: metric by
    metric, sentence by sentence). ``paired`` ("bs" or "ar") compares every system with the
    first one (the baseline); ``paired_n`` 0 means sacrebleu's default (1000 / 10000).
    ``tokenize="moses"`` (which needs ``lang``, the references' language) and
    ``split_compounds`` change what BLEU reads; see the module docstring.
    """
    names = parse_metrics(metrics)
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
    seen = set()
    for name, _ in systems:
        if name in seen:
            raise MtkitError(f"system {name} is given twice")
        seen.add(name)
    if tokenize is not None and tokenize not in TOKENIZERS:
        raise MtkitError(f"unknown BLEU tokenizer '{tokenize}'; valid: {', '.join(TOKENIZERS)}")
    if split_compounds and tokenize not in ("moses", "none"):
        raise MtkitError("--compound-split works on tokenized text: use it with -tok moses or -tok none")
    refs = [list(r) for r in references]
    prepare = _bleu_text(tokenize, split_compounds, lang) if "bleu" in names else None
    bleu_texts = None
    if prepare is not None:  # BLEU reads its own copy of the text; chrF and TER the original
        bleu_texts = (
            [(n, [prepare(line) for line in h]) for n, h in systems],
            [[prepare(line) for line in r] for r in refs],
        )

    def texts(name: str) -> tuple[Sequence[tuple[str, Sequence[str]]], list[list[str]]]:
        return bleu_texts if name == "bleu" and bleu_texts else (systems, refs)

    def build(name: str, with_refs: bool = True) -> Metric:
        own = name == "bleu" and bleu_texts is not None
        return make_metric(
            name, texts(name)[1] if with_refs else None, "none" if own and tokenize == "moses" else tokenize,
            lowercase, force or own, chrf_word_order, sentence, ter_case_sensitive,
        )

    results: list[dict[str, Any]] = []
    if sentence:
        for name in names:
            (sys_name, hyps), name_refs = texts(name)[0][0], texts(name)[1]
            metric = build(name)
            signature = metric.get_signature().format()
            for i, (hyp, *sent_refs) in enumerate(zip(hyps, *name_refs), start=1):
                d = _score_dict(metric.sentence_score(hyp, sent_refs), signature, width, sys_name)
                d["sentence"] = i
                results.append(d)
    elif paired:
        # one test for all metrics, or one per metric when BLEU reads other text than the rest
        for group in [[name] for name in names] if bleu_texts else [names]:
            test = PairedTest(
                [(n, list(h)) for n, h in texts(group[0])[0]],
                {name: build(name) for name in group},
                references=None,
                test_type=paired,
                n_samples=paired_n,
            )
            sigs, table = test()
            for metric_name, column in table.items():
                if metric_name == "System":
                    continue
                signature = sigs[metric_name].format()
                for i, res in enumerate(column):
                    d: dict[str, Any] = {"name": metric_name, "score": _rounded(res.score, width), "signature": signature}
                    d.update(dict(kv.split(":", 1) for kv in signature.split("|")))
                    d.update(
                        system=systems[i][0],
                        baseline=i == 0,
                        p_value=_rounded(res.p_value, 4),
                        mean=_rounded(res.mean, width),
                        ci=_rounded(res.ci, width),
                        test=paired,
                        n=test.n_samples,
                    )
                    results.append(d)
        # order system by system, like the unpaired results
        order = {name: i for i, (name, _) in enumerate(systems)}
        results.sort(key=lambda d: order[d["system"]])
    else:
        for i, (sys_name, _) in enumerate(systems):
            for name in names:
                metric = build(name, with_refs=False)
                score = corpus_score_chunked(metric, texts(name)[0][i][1], texts(name)[1])
                results.append(_score_dict(score, metric.get_signature().format(), width, sys_name))
    tok = bleu_tokenization(tokenize, split_compounds)
    return [_relabel(d, tok) if tok and d["name"] == "BLEU" else d for d in results]


CHUNK_LINES = 20_000


def corpus_score_chunked(
    metric: Metric, hyps: Sequence[str], refs: Sequence[Sequence[str]], chunk: int | None = None
) -> Score:
    """``metric.corpus_score(hyps, refs)`` computed ``chunk`` sentences at a time.

    sacrebleu holds the n-gram statistics of every reference sentence while scoring (about
    20 kB per sentence for chrF: gigabytes for a million lines). BLEU, chrF and TER corpus
    statistics are sums over sentences, so adding up per-chunk sums gives the same score with
    memory bounded by the chunk. The tokenized-period warning counts over the whole corpus.
    """
    chunk = chunk or CHUNK_LINES
    if len(hyps) <= chunk:
        return metric.corpus_score(list(hyps), [list(r) for r in refs])
    from sacrebleu.utils import sum_of_lists

    original = metric._force
    warn = not original and sum(1 for h in hyps if h.endswith(" .")) >= 100
    metric._force = True  # counted above, not once per chunk
    try:
        sums = [
            sum_of_lists(metric._extract_corpus_statistics(hyps[i : i + chunk], [r[i : i + chunk] for r in refs]))
            for i in range(0, len(hyps), chunk)
        ]
    finally:
        metric._force = original
    if warn:
        logging.getLogger("sacrebleu").warning(
            "That's 100 lines that end in a tokenized period ('.'); it looks like you forgot to detokenize "
            "your test data, which may hurt your score (--force silences this)"
        )
    return metric._aggregate_and_compute(sums)


def score_files(
    hyp_path: str | Path | None,
    ref_paths: Sequence[str | Path],
    metrics: Iterable[str] = ("bleu",),
    tokenize: str | None = None,
    lowercase: bool = False,
    force: bool = False,
    chrf_word_order: int = 0,
    sentence: bool = False,
    detok_spm: str | Path | None = None,
    systems: Sequence[str | Path] = (),
    paired: str | None = None,
    paired_n: int = 0,
    width: int = 1,
    ter_case_sensitive: bool = False,
    split_compounds: bool = False,
    lang: str | None = None,
) -> list[dict[str, Any]]:
    """Score a hypothesis file (``-`` = stdin) and/or several ``systems`` against reference files.

    The systems are ``[hyp_path] + systems`` (``hyp_path`` may be None when ``systems`` is
    given); the first is the baseline of a paired test. ``detok_spm`` (a sentencepiece model
    or a checkpoint) detokenises piece-segmented hypotheses before scoring. ``tokenize="moses"``
    takes the language from ``lang`` or else from the first reference's name (``ref.de``). See
    :func:`score_systems` for the other options and the module docstring for the result dicts.
    """
    names = parse_metrics(metrics)  # fail on a bad metric before reading anything
    paths = ([hyp_path] if hyp_path is not None else []) + list(systems)
    if not paths:
        raise MtkitError("no hypothesis file given")
    if not ref_paths:
        raise MtkitError("no reference file given (-r REF)")
    if tokenize == "moses" and not lang and "bleu" in names:
        lang = language_of(ref_paths[0])
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
        named,
        [r for _, r in refs],
        names,
        tokenize=tokenize,
        lowercase=lowercase,
        force=force,
        chrf_word_order=chrf_word_order,
        sentence=sentence,
        paired=paired,
        paired_n=paired_n,
        width=width,
        ter_case_sensitive=ter_case_sensitive,
        split_compounds=split_compounds,
        lang=lang,
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


# --------------------------------------------------------------------------------------------
# printing


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
    systems: list[str] = []
    metrics: list[str] = []
    cells: dict[tuple[str, str], str] = {}
    sigs: dict[str, str] = {}
    for d in results:
        label = f"Baseline: {d['system']}" if d.get("baseline") else d["system"]
        if label not in systems:
            systems.append(label)
        if d["name"] not in metrics:
            metrics.append(d["name"])
        cells[label, d["name"]] = _cell(d, width)
        sigs[d["name"]] = d["signature"]
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

    ``text``: one ``NAME|signature = score`` line per metric, aligned on ``=`` (sentence mode:
    one line per sentence and metric); several systems: a table plus the signatures.
    ``json``: always a list of result objects (sacrebleu prints a bare object for one metric).
    """
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
    if len(pairs) == 1:
        return "".join(pairs[0])
    return "\n".join(f"{left:>{w}}{right}" for left, right in pairs)
