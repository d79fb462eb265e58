"""Paired significance tests of several systems against a baseline, through sacrebleu's
:class:`~sacrebleu.significance.PairedTest`: bootstrap resampling (``bs``) or approximate
randomization (``ar``), with sacrebleu's seed (``SACREBLEU_SEED``, 12345 by default)."""

from __future__ import annotations

from typing import Any

from sacrebleu.significance import PairedTest

from mtkit.scoring_metrics import MetricFor, Systems, TextsFor

PAIRED_TESTS = {"bs": "bootstrap resampling", "ar": "approximate randomization"}


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
