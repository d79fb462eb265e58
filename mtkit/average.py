"""Checkpoint averaging: pick checkpoints (last N, best N, or a list) and average their weights.

Selection uses only a directory's numbered ``checkpoint_<update>.pt`` files (``checkpoint_last.pt``
and ``checkpoint_best.pt`` duplicate one of them): ``last=N`` takes the N highest update numbers of
the file names (not file times); ``best=N`` the N best by the validation ``payload["metrics"]`` of
each: BLEU (``valid_bleu``, higher is better) when every candidate has one, else loss
(``valid_loss``, lower is better), ties to the newer checkpoint.

Only one checkpoint and a float32 running sum are in memory at a time: about two copies of the
weights at peak, whatever the count. Floating-point tensors are averaged and cast back to their
dtype; integer/bool buffers, config, sentencepiece models and vocabulary come from the newest
checkpoint (highest ``update``, else the last given). The result is a normal self-contained
checkpoint without optimizer state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mtkit.checkpoint import build_payload, load_checkpoint, numbered_checkpoints, save_checkpoint
from mtkit.errors import MtkitError

logger = logging.getLogger("mtkit.average")

BLEU_KEYS = ("valid_bleu", "bleu")
LOSS_KEYS = ("valid_loss", "loss")


def _metric(metrics: Any, keys: Sequence[str]) -> float | None:
    values = [metrics.get(key) for key in keys] if isinstance(metrics, dict) else []
    return next((float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)), None)


def select_checkpoints(
    ckpt_dir: str | Path | Sequence[str | Path], last: int | None = None, best: int | None = None
) -> list[Path]:
    """The checkpoints to average, oldest first: from a directory ``ckpt_dir`` (with exactly one of
    ``last`` / ``best``) or an explicit list of checkpoint files (with neither)."""
    if last is not None and best is not None:
        raise MtkitError("give one of --last and --best, not both")
    for name, n in (("--last", last), ("--best", best)):
        if n is not None and n < 1:
            raise MtkitError(f"{name} must be at least 1, got {n}")
    if not isinstance(ckpt_dir, (str, Path)):
        if last is not None or best is not None:
            raise MtkitError("--last/--best take one checkpoint directory, not a list of files")
        return _explicit([Path(p) for p in ckpt_dir])
    path = Path(ckpt_dir)
    if last is None and best is None:
        if path.is_dir():
            raise MtkitError(f"{path} is a directory: give --last N or --best N, or list checkpoint files")
        return _explicit([path])

    found = numbered_checkpoints(path)
    if not found:
        raise MtkitError(f"no checkpoint_<update>.pt files in {path}")
    if last is not None:
        chosen = found[-last:]
    else:
        metrics = [(update, p, load_checkpoint(p).get("metrics")) for update, p in found]
        # (update, path, bleu, loss)
        scored = [(u, p, _metric(m, BLEU_KEYS), _metric(m, LOSS_KEYS)) for u, p, m in metrics]
        if all(s[2] is not None for s in scored):
            what, ranked = "valid BLEU", sorted(scored, key=lambda s: (s[2], s[0]), reverse=True)
        elif all(s[3] is not None for s in scored):
            what, ranked = "valid loss", sorted(scored, key=lambda s: (-s[3], s[0]), reverse=True)
        else:
            missing = next((s[1] for s in scored if s[2] is None and s[3] is None), None)
            if missing is None:
                raise MtkitError(f"the checkpoints in {path} do not all record the same validation metric "
                                 "(some only BLEU, some only loss); use --last or a list")
            raise MtkitError(f"checkpoint {missing} records no validation BLEU or loss; use --last or a list")
        chosen = sorted(ranked[:best])
    if len(chosen) < (last or best):
        logger.warning("only %d checkpoints in %s, averaging all of them", len(chosen), path)
    if best is not None:
        logger.info(
            "best %d by %s: %s", len(chosen), what,
            ", ".join(f"{s[1].name} ({s[2] if what == 'valid BLEU' else s[3]:.4g})" for s in chosen),
        )
    return [c[1] for c in chosen]


def _explicit(paths: list[Path]) -> list[Path]:
    if not paths:
        raise MtkitError("no checkpoints selected to average")
    seen = set()
    for p in paths:
        if not p.exists():
            raise MtkitError(f"checkpoint not found: {p}")
        if p.is_dir():
            raise MtkitError(f"{p} is a directory: use --last N or --best N with a directory")
        key = p.resolve()
        if key in seen:
            raise MtkitError(f"checkpoint {p} is given twice")
        seen.add(key)
    return paths


def _first_difference(a: Any, b: Any, prefix: str = "") -> str:
    """Name of the first differing key between two nested dicts ('' if equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{prefix}{key}"
            diff = _first_difference(a[key], b[key], f"{prefix}{key}.")
            if diff:
                return diff
        return ""
    return "" if a == b else prefix.rstrip(".") or "value"


def _aliases(state: dict[str, Any]) -> dict[str, str]:
    """Tied weights: key -> the first key that shares its storage, shape and strides."""
    first: dict[tuple, str] = {}
    alias = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if ident in first:
            alias[key] = first[ident]
        else:
            first[ident] = key
    return alias


class _Reference:
    """What every later checkpoint is checked against (from the first one read)."""

    def __init__(self, path: Path, payload: dict[str, Any]):
        self.path, self.config = path, payload["config"]
        self.spm, self.vocab = payload.get("spm"), payload.get("vocab")
        state = payload["model"]
        if not isinstance(state, dict):
            raise MtkitError(f"checkpoint {path} has no weights dict")
        self.shapes = {k: (tuple(v.shape), v.is_floating_point()) for k, v in state.items() if isinstance(v, torch.Tensor)}
        self.keys, self.aliases = set(state), _aliases(state)

    def check(self, path: Path, payload: dict[str, Any]) -> None:
        ref, cfg = self.config, payload["config"]
        arch_a = (ref.get("model") or {}).get("arch") if isinstance(ref, dict) else None
        arch_b = (cfg.get("model") or {}).get("arch") if isinstance(cfg, dict) else None
        if arch_a != arch_b:
            raise MtkitError(f"cannot average different architectures: {self.path} is '{arch_a}', {path} is '{arch_b}'")
        diff = _first_difference((ref or {}).get("model"), (cfg or {}).get("model"))
        if diff:
            raise MtkitError(f"cannot average different model configs: model.{diff} differs between {self.path} and {path}")
        if self.vocab != payload.get("vocab"):
            diff = _first_difference(self.vocab, payload.get("vocab"))
            raise MtkitError(f"cannot average different vocabularies: vocab.{diff} differs between {self.path} and {path}")
        spm = payload.get("spm")
        if self.spm != spm:
            side = next((s for s in ("src", "tgt") if (self.spm or {}).get(s) != (spm or {}).get(s)), "model")
            raise MtkitError(f"cannot average different vocabularies: the {side} sentencepiece models of {self.path} and {path} differ")
        state = payload["model"]
        if not isinstance(state, dict):
            raise MtkitError(f"checkpoint {path} has no weights dict")
        if set(state) != self.keys:
            extra, missing = sorted(set(state) - self.keys), sorted(self.keys - set(state))
            what = f"extra weight '{extra[0]}'" if extra else f"missing weight '{missing[0]}'"
            raise MtkitError(f"cannot average: {path} has {what} compared with {self.path}")
        for k, v in state.items():
            if isinstance(v, torch.Tensor) != (k in self.shapes):
                raise MtkitError(f"cannot average: '{k}' is a tensor in only one of {self.path} and {path}")
            if not isinstance(v, torch.Tensor):
                continue
            shape, is_float = self.shapes[k]
            if tuple(v.shape) != shape:
                raise MtkitError(f"cannot average: weight '{k}' has shape {list(v.shape)} in {path} "
                                 f"but {list(shape)} in {self.path}")
            if v.is_floating_point() != is_float:
                raise MtkitError(f"cannot average: weight '{k}' is floating-point in only one of {self.path} and {path}")
        if _aliases(state) != self.aliases:
            raise MtkitError(f"cannot average: {path} ties weights differently from {self.path}")


def _is_float(v: Any) -> bool:
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _accumulate(sums: dict[str, torch.Tensor], state: dict[str, Any], aliases: dict[str, str]) -> None:
    """Add ``state``'s float weights to their float32 ``sums`` (tied aliases skipped). A function of
    its own, so no reference to the checkpoint's tensors outlives the call."""
    for k, v in state.items():
        if k in aliases or not _is_float(v):
            continue
        if k in sums:
            sums[k].add_(v.to(torch.float32))
        else:
            sums[k] = v.to(torch.float32, copy=True)


def _averaged_state(
    sums: dict[str, torch.Tensor], n: int, newest: dict[str, Any], aliases: dict[str, str]
) -> dict[str, Any]:
    """The averaged state dict in the newest input's key order and dtypes (``newest`` maps each key to
    a dtype, or to the tensor itself where it is not averaged), tied aliases restored."""
    model = {k: sums.pop(k).div_(n).to(v) if k in sums else v for k, v in newest.items() if k not in aliases}
    return {k: model[aliases.get(k, k)] for k in newest}


def average_checkpoints(paths: Sequence[str | Path], out_path: str | Path) -> None:
    """Average the weights of ``paths`` into a new checkpoint ``out_path`` (see the module doc)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise MtkitError("no checkpoints selected to average")
    ref: _Reference | None = None
    sums: dict[str, torch.Tensor] = {}
    # what the averaged checkpoint takes from the newest input so far: its entries, and its weights in
    # their order, each a tensor that is not averaged or the dtype of one that is
    newest: dict[str, Any] = {}
    newest_key: tuple[int, int] = (-1, -1)
    updates: list[int | None] = []
    for i, path in enumerate(paths):
        payload = load_checkpoint(path, map_location="cpu")
        if ref is None:
            ref = _Reference(path, payload)
        else:
            ref.check(path, payload)
        update = payload.get("update")
        updates.append(update if isinstance(update, int) else None)
        _accumulate(sums, payload["model"], ref.aliases)
        order = (update if isinstance(update, int) else -1, i)
        if order > newest_key:
            newest_key = order
            newest = {key: payload.get(key) for key in ("config", "spm", "vocab", "update", "epoch")}
            newest["model"] = {k: v.dtype if _is_float(v) else v for k, v in payload["model"].items()}
        del payload  # only the running sum outlives this iteration
        logger.info("read %s (%d/%d)", path, i + 1, len(paths))

    assert ref is not None
    n = len(paths)
    model = _averaged_state(sums, n, newest["model"], ref.aliases)
    metrics = {"averaged": True, "averaged_updates": updates, "averaged_checkpoints": [str(p) for p in paths]}
    save_checkpoint(out_path, build_payload(newest["config"], model, spm=newest["spm"], vocab=newest["vocab"],
                                            update=newest["update"], epoch=newest["epoch"], metrics=metrics))
    shown = ", ".join(str(u) for u in updates) if all(u is not None for u in updates) else f"{n} checkpoints"
    logger.info("averaged %d checkpoints (updates %s) into %s", n, shown, out_path)
