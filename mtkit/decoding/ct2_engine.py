"""Decoding with CTranslate2 on a model written by ``mtkit export --format ctranslate2`` (a directory
as :mod:`mtkit.ct2_dir` describes). Sentences go in and come back as pieces (CTranslate2 appends the
source EOS). Decode settings -> CTranslate2 options:

- ``beam`` -> ``beam_size`` (1: greedy), ``nbest`` -> ``num_hypotheses``, ``no_repeat_ngram`` ->
  ``no_repeat_ngram_size``, ``min_len`` -> ``min_decoding_length``;
- ``max_decoding_length``: ``max_len_a * (source tokens + EOS) + max_len_b`` of the batch's longest
  sentence; longer hypotheses of shorter ones are cut to their own limit (score kept). mtkit forces EOS
  at the limit, CTranslate2 stops without it: beam search may pick other hypotheses for sentences that
  hit it (greedy gives the same tokens);
- ``length_penalty`` none / average -> 0 / 1 (same final scores: both count EOS); gnmt ((5+|Y|)/6)^alpha
  has no equivalent and becomes |Y|^alpha (a warning says so); ``beta`` -> ``coverage_penalty``
  (CTranslate2's own formula);
- pad and BOS are never generated (``suppress_sequences``), as in mtkit; CTranslate2 renormalises after
  banning them (and EOS before ``min_len``), so its scores can be slightly above mtkit's for the same
  tokens; teacher-forced scores (``score_batch``) are exact.

Attention: the last decoder layer's cross-attention averaged over heads, as in mtkit (the export sets
``alignment_heads`` to all heads); the source EOS column CTranslate2 leaves out is restored as the
remaining mass. Greedy attention equals mtkit's; under beam search CTranslate2's rows do not match the
model's (its own behaviour)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtkit.config import DecodeConfig
from mtkit.ct2_dir import META, SRC_SPM, TGT_SPM, import_ctranslate2
from mtkit.data.batching import length_sorted_batches
from mtkit.data.subword import SubwordModel
from mtkit.decoding.search_base import Hypothesis
from mtkit.devices import check_device_name
from mtkit.errors import MtkitError

logger = logging.getLogger("mtkit.ct2")
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def length_penalty_value(cfg: DecodeConfig) -> float:
    """CTranslate2's exponent for the length normalisation |Y|^p."""
    if cfg.length_penalty == "none":
        return 0.0
    if cfg.length_penalty == "average":
        return 1.0
    if cfg.length_penalty == "gnmt":
        _warn_once("gnmt", f"ctranslate2 has no GNMT length penalty ((5+|Y|)/6)^alpha; using |Y|^{cfg.alpha} instead")
        return float(cfg.alpha)
    raise MtkitError(f"unknown length penalty '{cfg.length_penalty}' (decode.length_penalty)")


@dataclass
class CT2Engine:
    """A loaded CTranslate2 translator with the vocabularies and defaults of the export."""

    translator: Any  # ctranslate2.Translator
    src_spm: SubwordModel
    tgt_spm: SubwordModel
    cfg: DecodeConfig  # the checkpoint's decode defaults
    max_src_len: int | None  # source tokens incl. EOS
    max_positions: int | None
    model_dir: Path

    @classmethod
    def load(
        cls, model_dir: str | Path, device: str = "cpu", compute_type: str = "default", intra_threads: int = 0,
        inter_threads: int = 1,
    ) -> CT2Engine:
        ct2 = import_ctranslate2()
        model_dir = Path(model_dir)
        meta_path = model_dir / META
        if not model_dir.is_dir():
            raise MtkitError(f"{model_dir} is not a directory (the ctranslate2 engine takes an export directory; "
                             "run `mtkit export --format ctranslate2` first)")
        if not meta_path.exists():
            raise MtkitError(f"{model_dir} is not an mtkit CTranslate2 export (no {META})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MtkitError(f"{meta_path} is not valid JSON") from None
        src_spm = SubwordModel.from_file(model_dir / SRC_SPM)
        tgt_spm = SubwordModel.from_file(model_dir / TGT_SPM)
        fields = {f.name for f in dataclasses.fields(DecodeConfig)}
        cfg = DecodeConfig(**{k: v for k, v in (meta.get("decode") or {}).items() if k in fields})
        no_cuda = "device '{device}' requested but CTranslate2 sees no CUDA device"
        name = check_device_name(device, ct2.get_cuda_device_count, no_cuda)  # auto: CUDA if one is seen
        try:
            translator = ct2.Translator(str(model_dir), device="cuda" if name.startswith("cuda") else "cpu",
                                        compute_type=compute_type, intra_threads=intra_threads,
                                        inter_threads=inter_threads)
        except (RuntimeError, ValueError) as exc:
            raise MtkitError(f"CTranslate2 could not load {model_dir}: {str(exc).splitlines()[0]}") from None
        return cls(translator, src_spm, tgt_spm, cfg, meta.get("max_src_len"), meta.get("max_positions"), model_dir)

    def options(self, cfg: DecodeConfig) -> dict[str, Any]:
        """CTranslate2 ``translate_batch`` keyword arguments for a checked decode config (no max length)."""
        spm = self.tgt_spm
        if cfg.beta:
            _warn_once("beta", "ctranslate2 applies its own coverage penalty formula for decode.beta")
        return {
            "beam_size": cfg.beam,
            "num_hypotheses": cfg.nbest,
            "length_penalty": length_penalty_value(cfg),
            "coverage_penalty": float(cfg.beta),
            "no_repeat_ngram_size": cfg.no_repeat_ngram,
            "min_decoding_length": cfg.min_len,
            "suppress_sequences": [[p] for p in spm.id_to_piece(sorted({spm.pad, spm.bos} - {spm.eos}))],
            "max_input_length": 0,  # sources are truncated before they get here
            "return_scores": True,
            "return_end_token": True,
        }

    def max_decoding_length(self, longest_src: int, cfg: DecodeConfig) -> int:
        """mtkit's ``a * src_len + b`` (src_len counts EOS) within the model's position limit."""
        n = max(0, math.floor(cfg.max_len_a * (longest_src + 1) + cfg.max_len_b))
        if self.max_positions:
            n = min(n, self.max_positions - 1)
        return n

    def truncate(self, pieces: list[str]) -> list[str]:
        """At most ``max_src_len`` source tokens with EOS."""
        return pieces if self.max_src_len is None else pieces[: self.max_src_len - 1]

    def translate_batch(self, pieces: Sequence[Sequence[str]], cfg: DecodeConfig, attention: bool = False) -> list:
        """One batch of source pieces (no EOS) -> CTranslate2 results (end token included)."""
        if not pieces:
            return []
        src = [self.truncate(list(p)) for p in pieces]
        limit = self.max_decoding_length(max(len(p) for p in src), cfg)
        return self.translator.translate_batch(
            src, max_decoding_length=limit, return_attention=attention, **self.options(cfg)
        )

    def strip_eos(self, toks: Sequence[str], src_len: int, cfg: DecodeConfig) -> list[str]:
        """Pieces without EOS, cut to the sentence's own length limit."""
        eos_piece = self.tgt_spm.id_to_piece([self.tgt_spm.eos])[0]
        body = list(toks[:-1] if toks and toks[-1] == eos_piece else toks)
        return body[: self.max_decoding_length(src_len, cfg)]

    def hypotheses(self, result: Any, cfg: DecodeConfig, src_len: int) -> list[Hypothesis]:
        """A CTranslate2 result -> mtkit hypotheses; ``src_len`` counts the source pieces without EOS."""
        lp = length_penalty_value(cfg)
        out = []
        for j, toks in enumerate(result.hypotheses):
            body = self.strip_eos(toks, src_len, cfg)
            score = float(result.scores[j]) if result.scores else float("nan")
            log_prob = score * max(len(toks), 1) ** lp
            attn = None
            if result.attention:  # CTranslate2 leaves out the source EOS column: it is the rest of the mass
                rows = torch.tensor(result.attention[j], dtype=torch.float32)[: len(body) + 1, :src_len]
                attn = torch.cat([rows, (1.0 - rows.sum(1, keepdim=True)).clamp(min=0.0)], dim=1)
            out.append(Hypothesis([self.tgt_spm.sp.piece_to_id(t) for t in body], score, log_prob, attn))
        return out

    def decode_ids(self, seqs: Sequence[Sequence[int]], cfg: DecodeConfig, attention: bool = False) -> list[list[Hypothesis]]:
        """Source id sequences (no EOS) -> per sentence hypotheses, like ``search.generate``."""
        pieces = [self.src_spm.id_to_piece(s) for s in seqs]
        results = self.translate_batch(pieces, cfg, attention)
        return [self.hypotheses(r, cfg, len(self.truncate(p))) for r, p in zip(results, pieces)]

    def translate_pieces(
        self, pieces: Sequence[Sequence[str]], cfg: DecodeConfig, batch_size: int = 32
    ) -> list[list[str]]:
        """Best hypothesis (pieces, no EOS) per input, batching length-sorted inputs; empty in, empty out."""
        out: list[list[str]] = [[] for _ in pieces]
        todo = [i for i, p in enumerate(pieces) if p]
        for batch in length_sorted_batches([len(pieces[i]) for i in todo], batch_size=max(batch_size, 1)):
            rows = [todo[j] for j in batch]
            for i, res in zip(rows, self.translate_batch([pieces[i] for i in rows], cfg)):
                out[i] = self.strip_eos(res.hypotheses[0], len(self.truncate(list(pieces[i]))), cfg)
        return out


@dataclass
class CT2Decoder:
    """A drop-in for :class:`mtkit.decoding.translate.OomSplittingBatchDecoder` (same ``batches`` /
    ``oom_splits`` counters; ``cfg`` checked)."""

    engine: CT2Engine
    cfg: DecodeConfig
    attention: bool = False
    batches: int = 0
    oom_splits: int = 0

    def __call__(self, seqs: list[list[int]]) -> list[list[Hypothesis]]:
        self.batches += 1
        return self.engine.decode_ids(seqs, self.cfg, self.attention)


def translate_lines_ct2(
    model_dir: str | Path | CT2Engine, lines: Sequence[str], beam: int | None = None,
    max_batch_size: int = 32, length_penalty: str | None = None, alpha: float | None = None,
    min_len: int | None = None, max_len_a: float | None = None, max_len_b: int | None = None,
    no_repeat_ngram: int | None = None, device: str = "cpu", compute_type: str = "default",
    intra_threads: int = 0, decode_cfg: DecodeConfig | None = None,
) -> list[str]:
    """Translate text lines with an exported model (or a loaded :class:`CT2Engine`): one output line
    per input line, in order, blank lines staying blank. Settings left ``None`` come from
    ``decode_cfg`` or else the checkpoint's decode section."""
    engine = model_dir if isinstance(model_dir, CT2Engine) else CT2Engine.load(
        model_dir, device=device, compute_type=compute_type, intra_threads=intra_threads
    )
    cfg = decode_cfg if decode_cfg is not None else engine.cfg
    given = {"beam": beam, "length_penalty": length_penalty, "alpha": alpha, "min_len": min_len,
             "max_len_a": max_len_a, "max_len_b": max_len_b, "no_repeat_ngram": no_repeat_ngram}
    cfg = dataclasses.replace(cfg, nbest=1, **{k: v for k, v in given.items() if v is not None}).check_for_search()
    pieces = [engine.src_spm.encode_pieces([ln])[0] if ln.strip() else [] for ln in lines]
    hyps = engine.translate_pieces(pieces, cfg, max_batch_size)
    return [engine.tgt_spm.decode_pieces([h])[0] if h else "" for h in hyps]
