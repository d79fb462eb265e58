"""sacrebleu's metrics as mtkit scores them: the metric names, a metric object configured as
sacrebleu's command line configures it (so the signatures match), corpus scores computed in
bounded chunks, tokenized BLEU (the Moses tokenizer and compound splitting before BLEU, shown in
the signature's ``tok`` field), and paired significance tests through sacrebleu's
:class:`~sacrebleu.significance.PairedTest`: bootstrap resampling (``bs``) or approximate
randomization (``ar``), with sacrebleu's seed (``SACREBLEU_SEED``, 12345 by default)."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from sacrebleu.metrics import BLEU, CHRF, TER
from sacrebleu.metrics.base import Metric, Score
from sacrebleu.significance import PairedTest

from mtkit.errors import MtkitError

METRICS = ("bleu", "chrf", "chrf++", "ter")
TOKENIZERS = (*BLEU.TOKENIZERS, "moses")
PAIRED_TESTS = {"bs": "bootstrap resampling", "ar": "approximate randomization"}
CHUNK_LINES = 20_000  # corpus scores are computed this many sentences at a time

Systems = Sequence[tuple[str, Sequence[str]]]  # [(name, hypothesis lines), ...]
TextsFor = Callable[[str], tuple[Systems, list[list[str]]]]  # metric name -> (systems, references)
MetricFor = Callable[..., Metric]  # metric name (, with_refs) -> a metric object


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


# --- metric objects and corpus scores -------------------------------------------------------

def make_metric(
    name: str, references: Sequence[Sequence[str]] | None = None, tokenize: str | None = None,
    lowercase: bool = False, force: bool = False, chrf_word_order: int = 0, sentence: bool = False,
    ter_case_sensitive: bool = False,
) -> Metric:
    """One sacrebleu metric object, configured as sacrebleu's CLI would for the same options;
    ``references``: one list of lines per reference file (cached inside the metric)."""
    if name == "bleu":
        # sentence-level BLEU uses effective n-gram order, as sacrebleu's --sentence-level does
        return BLEU(lowercase=lowercase, force=force, tokenize=tokenize, effective_order=sentence, references=references)
    if name in ("chrf", "chrf++"):
        word_order = 2 if name == "chrf++" else chrf_word_order
        return CHRF(word_order=word_order, lowercase=lowercase, references=references)
    if name == "ter":
        return TER(case_sensitive=ter_case_sensitive, references=references)
    raise MtkitError(f"unknown metric '{name}'; valid: {', '.join(METRICS)}")


def corpus_score_chunked(
    metric: Metric, hyps: Sequence[str], refs: Sequence[Sequence[str]], chunk: int | None = None
) -> Score:
    """``metric.corpus_score(hyps, refs)`` computed ``chunk`` sentences at a time. sacrebleu holds
    the n-gram statistics of every reference sentence while scoring (about 20 kB per sentence for
    chrF: gigabytes for a million lines); BLEU, chrF and TER corpus statistics are sums over
    sentences, so adding up per-chunk sums gives the same score with memory bounded by the chunk.
    The tokenized-period warning counts over the whole corpus."""
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


# --- tokenized BLEU: Moses tokenization and compound splitting before sacrebleu --------------

_COMPOUND = re.compile(r"(\S)-(\S)")


def compound_split(line: str) -> str:
    """``a-b`` -> ``a ##AT##-##AT## b`` for every hyphen between two non-space characters, as
    Perl's ``s{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g``: matches do not overlap, so in ``a-b-c`` only
    the first hyphen is split (the ``b`` belongs to the first match)."""
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


def language_of(path: str | Path) -> str | None:
    """The language a file name ends in (``newstest2014.de``, ``test.de.gz`` -> ``de``), if Moses
    knows it: has its own rules (nonbreaking prefixes; other languages fall back to English)."""
    name = Path(str(path)).name.removesuffix(".gz")
    suffix = Path(name).suffix.lstrip(".").lower()
    moses_langs = _sacremoses().corpus.NonbreakingPrefixes().available_langs.values()
    return suffix if suffix in moses_langs else None


def bleu_tokenization(tokenize: str | None, split_compounds: bool) -> str | None:
    """The signature's ``tok`` value when mtkit processes BLEU's text itself (None: sacrebleu's own)."""
    if tokenize == "moses" or split_compounds:
        return f"{tokenize}+cs" if split_compounds else tokenize
    return None


def bleu_text(tokenize: str | None, split_compounds: bool, lang: str | None) -> Callable[[str], str] | None:
    """What every hypothesis and reference line goes through before BLEU (None: nothing)."""
    if tokenize != "moses":
        return compound_split if split_compounds else None
    if not lang:
        raise MtkitError("-tok moses needs the language of the references: -l SRC-TGT")
    tok = moses_tokenizer(lang)
    return (lambda line: compound_split(tok(line))) if split_compounds else tok


def relabel_bleu(d: dict[str, Any], tok: str) -> dict[str, Any]:
    """Show mtkit's own BLEU text processing (``tok``) in a BLEU result and its signature."""
    d["tok"] = tok
    d["signature"] = "|".join(f"tok:{tok}" if kv.startswith("tok:") else kv for kv in d["signature"].split("|"))
    return d


# --- paired significance tests --------------------------------------------------------------

def _rounded(x: float | None, width: int) -> float | None:
    return None if x is None else float(f"{float(x):.{width}f}")


def paired_scores(
    names: list[str], systems: Systems, texts: TextsFor, build: MetricFor, paired: str, paired_n: int, width: int,
    per_metric: bool,
) -> list[dict[str, Any]]:
    """Test every system against the first (the baseline) on every metric in ``names``;
    ``per_metric``: one test per metric (BLEU reads other text than the rest), else one for all.
    The results come system by system, as the unpaired ones do."""
    results: list[dict[str, Any]] = []
    for group in [[name] for name in names] if per_metric else [names]:
        test = PairedTest(
            [(n, list(h)) for n, h in texts(group[0])[0]], {name: build(name) for name in group},
            references=None, test_type=paired, n_samples=paired_n,
        )
        sigs, table = test()
        for metric_name, column in table.items():
            if metric_name == "System":
                continue
            signature = sigs[metric_name].format()
            fields = dict(kv.split(":", 1) for kv in signature.split("|"))
            for i, res in enumerate(column):
                results.append({
                    "name": metric_name, "score": _rounded(res.score, width), "signature": signature, **fields,
                    "system": systems[i][0], "baseline": i == 0, "p_value": _rounded(res.p_value, 4),
                    "mean": _rounded(res.mean, width), "ci": _rounded(res.ci, width), "test": paired,
                    "n": test.n_samples,
                })
    order = {name: i for i, (name, _) in enumerate(systems)}
    results.sort(key=lambda d: order[d["system"]])
    return results
