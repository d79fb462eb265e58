"""The recipe's own YAML sections beside the config's: ``preprocess``, ``average`` and ``score``,
checked by the same field rules as the config (:mod:`mtkit.config_fields`)."""

from __future__ import annotations

from dataclasses import dataclass

from mtkit.config_fields import Section, any_value, choice, choices_list, number
from mtkit.errors import MtkitError

# sacrebleu's BLEU tokenizers (a test holds this list equal to sacrebleu's own)
BLEU_TOKENIZERS = ("none", "zh", "13a", "intl", "char", "ja-mecab", "ko-mecab", "spm", "flores101", "flores200", "spBLEU-1K")


@dataclass
class PreprocessSection(Section):
    """The recipe's ``preprocess`` keys: the options of ``mtkit preprocess`` (same defaults)."""

    vocab_size: int = number(8000, low=8)
    model_type: str = choice("bpe", "bpe", "unigram")
    joint: bool = True
    character_coverage: float = number(1.0, low=0, low_open=True, high=1)
    user_defined_symbols: list[str] | None = any_value(None)  # extra sentencepiece pieces, kept whole
    max_len: int = number(250, low=1)
    max_ratio: float = number(3.0, low=1)
    dedup: bool = False
    workers: int = number(2, low=1)


@dataclass
class AverageSection(Section):
    """The recipe's ``average`` keys: average the last N numbered checkpoints, or the best N."""

    last: int | None = number(None, low=0)
    best: int | None = number(None, low=0)

    def check(self, section: str) -> None:
        if self.last and self.best:
            raise MtkitError(f"give one of {section}.last and {section}.best, not both")


@dataclass
class ScoreSection(Section):
    """The recipe's ``score`` keys: which metrics, and the options of ``mtkit score`` for BLEU."""

    metrics: list[str] = choices_list(lambda: ["bleu"], "bleu", "chrf", "ter")
    tokenize: str | None = choice(None, *BLEU_TOKENIZERS, "moses")  # moses: Moses tokens, then BLEU
    lowercase: bool = False
    compound_split: bool = False  # a-b -> a ##AT##-##AT## b before BLEU (tokenize moses or none)

    def check(self, section: str) -> None:
        if "bleu" not in self.metrics:
            raise MtkitError(f"{section}.metrics must include bleu (the number the report compares)")
        if self.compound_split and self.tokenize not in ("moses", "none"):
            raise MtkitError(f"{section}.compound_split needs {section}.tokenize moses or none (tokenized text)")


RECIPE_SECTIONS = {"preprocess": PreprocessSection, "average": AverageSection, "score": ScoreSection}
