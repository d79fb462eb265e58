"""mtkit: a command-line neural machine translation toolkit. In Python (a notebook, a script)::

    from mtkit import Translator, score
    tr = Translator.load("ckpt/checkpoint_best.pt", device="cpu")
    hyps = tr.translate(["A man is riding a bike."], beam=5)
    score(hyps, ["Ein Mann fährt Fahrrad."], metrics=["bleu", "chrf"])

The names are imported on first use, so ``import mtkit`` stays light."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["Translator", "score", "__version__"]

_LAZY = {"Translator": "mtkit.decoding.translate", "score": "mtkit.scoring"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mtkit' has no attribute {name!r}")
