"""Output of a translation run: one record per input line written as text, Moses/Marian n-best
lines or JSON lines, resuming a partly written output file, and attention heatmaps (source
pieces x target pieces, one PNG per sentence; needs matplotlib)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mtkit.data.subword import SubwordModel
from mtkit.decoding.search_base import Hypothesis
from mtkit.errors import MtkitError

OUTPUT_FORMATS = ("text", "nbest", "jsonl")


@dataclass
class Record:
    """One input line and its hypotheses."""

    index: int  # 0-based input line number
    src_ids: list[int]
    hyps: list[Hypothesis]  # empty for an empty input line


class Formatter:
    """A record as its output lines in format ``fmt`` (text, nbest, jsonl), hypotheses as target
    ``units`` (text, pieces, ids); jsonl carries the ``alignment`` (none, argmax, full)."""

    def __init__(self, tgt_spm: SubwordModel, fmt: str, units: str, alignment: str):
        self.tgt_spm, self.fmt, self.units, self.alignment = tgt_spm, fmt, units, alignment

    def hyp_text(self, h: Hypothesis) -> str:
        if self.units == "ids":
            return " ".join(map(str, h.tokens))
        if self.units == "pieces":
            return " ".join(self.tgt_spm.id_to_piece(h.tokens))
        return self.tgt_spm.decode([h.tokens])[0]

    def __call__(self, rec: Record) -> str:
        if self.fmt == "text":
            return (self.hyp_text(rec.hyps[0]) if rec.hyps else "") + "\n"
        if self.fmt == "nbest":
            return "".join(self.nbest_line(rec.index, h) for h in rec.hyps or [None])
        return json.dumps(self.jsonl(rec), ensure_ascii=False) + "\n"

    def nbest_line(self, index: int, h: Hypothesis | None) -> str:
        """Moses/Marian n-best: ``id ||| hypothesis ||| F0= log-prob ||| total score`` (the
        total is the search's final score, length and coverage penalties included)."""
        if h is None:  # an empty input line
            return f"{index} |||  ||| F0= 0.0000 ||| 0.0000\n"
        return f"{index} ||| {self.hyp_text(h)} ||| F0= {h.log_prob:.4f} ||| {h.score:.4f}\n"

    def jsonl(self, rec: Record) -> dict[str, Any]:
        if not rec.hyps:
            return {"line": rec.index, "hypothesis": "", "score": 0.0, "log_prob": 0.0, "tokens": []}
        out = [self.one(h) for h in rec.hyps]
        obj = {"line": rec.index, **out[0]}
        if len(out) > 1:
            obj["nbest"] = out
        return obj

    def one(self, h: Hypothesis) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "hypothesis": self.hyp_text(h),
            "score": round(h.score, 6),
            "log_prob": round(h.log_prob, 6),
            "tokens": self.tgt_spm.id_to_piece(h.tokens),
        }
        if h.attn is not None and self.alignment != "none":
            # row j: attention while producing target piece j; the last row is the EOS step;
            # the last source column is the source EOS
            obj["alignment"] = h.attn[: len(h.tokens)].argmax(1).tolist() if len(h.tokens) else []
            if self.alignment == "full":
                obj["attention"] = [[round(x, 4) for x in row] for row in h.attn.tolist()]
        return obj


def prepare_resume(path: Path, output_format: str) -> int:
    """Truncate ``path`` to its complete output and return how many input lines it covers."""
    if not path.exists():
        return 0
    with open(path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1  # drop a trailing partial line
        lines = data[:keep].split(b"\n")[:-1]
        done = len(lines)
        if output_format == "nbest" and lines:
            try:
                last = int(lines[-1].split(b" ||| ", 1)[0])
            except ValueError:
                raise MtkitError(f"{path}: not n-best output (line {len(lines)}), cannot resume") from None
            group = sum(1 for ln in lines if ln.split(b" ||| ", 1)[0] == str(last).encode())
            keep -= sum(len(ln) + 1 for ln in lines[len(lines) - group :])  # redo the last sentence
            done = last
        f.truncate(keep)
    return done


def check_available() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MtkitError("--plot-attention needs matplotlib: pip install 'mtkit[plot]'") from None


def plot_attention(
    attn: torch.Tensor, src_pieces: Sequence[str], tgt_pieces: Sequence[str], path: str | Path, title: str = ""
) -> None:
    """Save ``attn`` (T target steps, S source positions) as a heatmap at ``path``, with a colour
    bar for the weights and ``title`` saying which attention it is."""
    check_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MtkitError(f"cannot create attention plot directory {path.parent}: {exc.strerror}") from None
    t, s = attn.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * s + 2.5), max(3.5, 0.35 * t + 1.5)))
    image = ax.imshow(attn.float().numpy(), cmap="Greys", vmin=0.0, vmax=1.0, aspect="auto")
    fig.colorbar(image, ax=ax, label="attention weight")
    if title:
        ax.set_title(title, fontsize=9, wrap=True)
    ax.set_xticks(range(s), list(src_pieces)[:s], rotation=90, fontsize=8)
    ax.set_yticks(range(t), list(tgt_pieces)[:t], fontsize=8)
    ax.set_xlabel("source")
    ax.set_ylabel("target")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
