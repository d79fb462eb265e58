"""The CTranslate2 model directory that ``mtkit export`` writes and the CTranslate2 engine reads:
CTranslate2's own files, mtkit's sentencepiece models (:data:`SRC_SPM`, :data:`TGT_SPM`) and
:data:`META` (where the export came from, the decode defaults and the length limits)."""

from __future__ import annotations

from typing import Any

from mtkit.errors import MtkitError

SRC_SPM, TGT_SPM, META = "source.spm", "target.spm", "mtkit_export.json"


def import_ctranslate2() -> Any:
    """``import ctranslate2`` with a one-line error naming the optional extra when missing."""
    try:
        import ctranslate2
    except ImportError:
        raise MtkitError("the ctranslate2 engine is not installed: pip install 'mtkit[ct2]'") from None
    return ctranslate2
