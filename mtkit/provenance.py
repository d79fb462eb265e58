"""What a run was: versions, command line, config, machine and data, said once and kept.
:func:`collect` gathers the record; ``train`` and ``recipe run`` write it at the top of their log
file (:func:`run_log`), into every checkpoint (key ``provenance``) and into a recipe's
``results.json``; ``mtkit info CKPT`` prints it back (:func:`describe_checkpoint`)."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import platform
import socket
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mtkit import __version__
from mtkit.utils import LOG_FORMAT, SPEED_FLAGS, cpu_info

logger = logging.getLogger("mtkit")

PACKAGES = ("torch", "sentencepiece", "sacrebleu")
OPTIONAL_PACKAGES = ("ctranslate2",)


def versions() -> dict[str, str]:
    """mtkit and the versions of the packages that change its numbers (ctranslate2 if installed)."""
    out = {"mtkit": __version__}
    for name in PACKAGES + OPTIONAL_PACKAGES:
        if name in OPTIONAL_PACKAGES and importlib.util.find_spec(name) is None:
            continue
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "unknown"
    return out


def gpu_names() -> list[str]:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [torch.cuda.get_device_name(i) for i in range(n)]


def manifest_info(data_dir: str | Path | None) -> dict[str, Any]:
    """The sha256 of a preprocessed data dir's ``manifest.json`` and its languages (empty if absent)."""
    if data_dir is None:
        return {}
    try:
        data = (Path(data_dir) / "manifest.json").read_bytes()
    except OSError:
        return {}
    info: dict[str, Any] = {"dir": str(data_dir), "manifest_sha256": hashlib.sha256(data).hexdigest()}
    with contextlib.suppress(ValueError, AttributeError):
        manifest = json.loads(data)
        info.update(src_lang=manifest.get("src_lang"), tgt_lang=manifest.get("tgt_lang"))
    return info


def collect(config: dict[str, Any] | None, data_dir: str | Path | None = None, world_size: int = 1) -> dict[str, Any]:
    """The provenance record of a run about to start (plain JSON types only)."""
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "command": list(sys.argv),
        "python": platform.python_version(),
        "host": socket.gethostname(),
        "cpu": cpu_info(),
        "gpus": gpu_names(),
        "world_size": world_size,
        "seed": ((config or {}).get("train") or {}).get("seed"),
        "data": manifest_info(data_dir),
        "config": config,
    }


def format_block(prov: dict[str, Any]) -> list[str]:
    """The record as ``key: value`` lines (the config as indented YAML), for logs and ``mtkit info``."""
    import yaml

    cpu = prov.get("cpu") or {}
    data = prov.get("data") or {}
    lines = [
        "versions: " + ", ".join(f"{k} {v}" for k, v in (prov.get("versions") or {}).items()),
        "command: " + " ".join(prov.get("command") or []),
        f"started: {prov.get('time')}",
        f"host: {prov.get('host')}",
        f"cpu: {cpu.get('model')} (flags: {', '.join(cpu.get('flags') or []) or 'none of ' + ', '.join(SPEED_FLAGS)})",
        f"gpus: {', '.join(prov.get('gpus') or []) or 'none'}",
        f"world size: {prov.get('world_size')}",
        f"seed: {prov.get('seed')}",
        f"data manifest sha256: {data.get('manifest_sha256') or '-'}" + (f" ({data['dir']})" if data.get("dir") else ""),
    ]
    if prov.get("config") is not None:
        dumped = yaml.safe_dump(prov["config"], sort_keys=False, default_flow_style=None).rstrip()
        lines += ["config:", *("  " + line for line in dumped.splitlines())]
    return lines


@contextlib.contextmanager
def run_log(path: str | Path, prov: dict[str, Any], title: str) -> Iterator[None]:
    """Copy every INFO-or-above record of the ``mtkit`` loggers to ``path`` (appended), whatever
    the console shows, starting with the provenance block; the console's own level is kept."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%Y-%m-%d %H:%M:%S"))
    root = logging.getLogger("mtkit")
    level = root.level
    root.addHandler(handler)
    root.setLevel(min(root.getEffectiveLevel(), logging.INFO))  # the console handler keeps its level
    try:
        logger.info("%s", f"=== {title} ===")
        for line in format_block(prov):
            logger.info("%s", line)
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(level)


def describe_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's model size, languages, vocabularies and provenance (what ``mtkit info`` prints)."""
    from mtkit.checkpoint import build_from_checkpoint, load_checkpoint
    from mtkit.models.base import num_parameters

    payload = load_checkpoint(path)
    model, cfg, _, _ = build_from_checkpoint(payload, path)
    prov = payload.get("provenance") or {}
    data = prov.get("data") or {}
    vocab = payload["vocab"]
    return {
        "checkpoint": str(path),
        "arch": cfg.model.arch,
        "parameters": num_parameters(model),
        "languages": [data.get("src_lang"), data.get("tgt_lang")],
        "vocab": {"src": vocab["src_size"], "tgt": vocab["tgt_size"], "joint": vocab.get("joint")},
        "update": payload.get("update"),
        "metrics": payload.get("metrics") or {},
        "mtkit_version": payload.get("mtkit_version"),
        "provenance": prov or None,
    }


def format_info(info: dict[str, Any]) -> str:
    src, tgt = info["languages"]
    vocab = info["vocab"]
    lines = [
        f"checkpoint: {info['checkpoint']}",
        f"model: {info['arch']}, {info['parameters']:,} parameters",
        f"languages: {src or '?'} -> {tgt or '?'}",
        f"vocabulary: source {vocab['src']}, target {vocab['tgt']}{' (joint)' if vocab['joint'] else ''}",
        f"update: {info['update'] if info['update'] is not None else '-'}",
    ]
    if info["metrics"]:
        lines.append("valid: " + ", ".join(f"{k} {v}" for k, v in info["metrics"].items()))
    if info["provenance"]:
        lines += format_block(info["provenance"])
    else:
        lines.append(f"provenance: none recorded (written by mtkit {info['mtkit_version'] or '?'})")
    return "\n".join(lines)
