"""Small shared mechanisms: logging and progress reporting (tqdm on a terminal, plain log lines
otherwise), atomic file writes, memory figures."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from mtkit.errors import MtkitError

T = TypeVar("T")
# the CPU features that decide training and decoding speed (bf16 matmuls, AVX width)
SPEED_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2")
logger = logging.getLogger("mtkit")
LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"
LEVELS = {"quiet": logging.WARNING, "warning": logging.WARNING, "info": logging.INFO, "debug": logging.DEBUG}
ONEDNN_CACHES = ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY")
_libc = None  # glibc, loaded on first use (False where unavailable)


def rss_gib() -> float:
    """The process's resident memory now, in GiB (0.0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return 0.0


def limit_onednn_caches(entries: int = 64) -> None:
    """Cap oneDNN's two per-shape caches (PyTorch's and oneDNN's own) at ``entries`` each, unless
    the environment sets them; training does this, decoding keeps oneDNN's 1024. oneDNN runs mtkit's
    float32 CPU matmuls (:mod:`mtkit.kernels.linear`) and keeps every shape it has met: training's
    hundreds of batch shapes fill the caches, whose long-lived entries, allocated between a step's
    activations, fragment the heap (64 hold the shapes one step reuses). Decoding, whose row counts
    change per step and recur across batches, gains from the larger default. The sizes are read at
    the process's first oneDNN matmul: call this before that."""
    for name in ONEDNN_CACHES:
        os.environ.setdefault(name, str(entries))


def cpu_info(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """The CPU's model name and which of :data:`SPEED_FLAGS` it has."""
    model, flags = "", set()
    with contextlib.suppress(OSError), open(cpuinfo, encoding="utf-8", errors="replace") as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key == "flags" and not flags:
                flags = set(value.split())
    return {"model": model or platform.processor() or platform.machine(),
            "flags": [f for f in SPEED_FLAGS if f in flags]}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX). Elsewhere
    (AVX2-only CPUs such as many AMD EPYCs) torch emulates them, slower than float32, so bf16
    autocast would slow training down instead of up."""
    import torch

    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if probes := [getattr(torch.cpu, name) for name in names if hasattr(torch.cpu, name)]:
        return any(p() for p in probes)
    # an older torch: read the CPU flags
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_info()["flags"]))


def release_free_memory() -> bool:
    """Return the C allocator's free pages to the OS (glibc ``malloc_trim``); False where unsupported."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 (glibc only)
        except (OSError, AttributeError):
            _libc = False
    return bool(_libc) and bool(_libc.malloc_trim(0))


def setup_logging(verbosity: int = 0) -> None:
    """verbosity: -1 quiet (warnings only), 0 info, 1 debug. Logs always go to stderr.
    Without -q/-v the ``MTKIT_LOG_LEVEL`` environment variable (debug, info, warning) decides."""
    level = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[max(-1, min(1, verbosity))]
    env = os.environ.get("MTKIT_LOG_LEVEL", "").strip().lower()
    if verbosity == 0 and env:
        if env not in LEVELS:
            raise MtkitError(f"MTKIT_LOG_LEVEL={env!r} is not one of debug, info, warning")
        level = LEVELS[env]
    root = logging.getLogger("mtkit")
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, "%H:%M:%S"))
    handler.setLevel(level)  # a run's log file may lower the logger's level, never the console's
    root.addHandler(handler)
    root.setLevel(level)


def progress_enabled() -> bool:
    """Whether stderr is a terminal that shows INFO records (the console's level, not the one a
    run's log file keeps)."""
    root = logging.getLogger("mtkit")
    levels = [h.level for h in root.handlers if type(h) is logging.StreamHandler and h.level]
    return sys.stderr.isatty() and (min(levels) if levels else root.getEffectiveLevel()) <= logging.INFO


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """The one way mtkit replaces a file: yields a temp path beside ``path``
    (``<name>.tmp-<pid>``, same directory so the rename stays on one file system) for the
    caller to write; when the block ends normally the temp file is renamed over ``path``,
    when it raises the temp file is removed. Readers see the old file or the whole new one."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)  # left by an earlier writer of this process (os.link needs it gone)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def progress(
    items: Iterable[T], total: int | None = None, desc: str = "", unit: str = "it", log_every: float = 30.0
) -> Iterator[T]:
    """Iterate with a tqdm bar on a terminal; otherwise log a plain line every ``log_every`` s."""
    if progress_enabled():
        from tqdm import tqdm

        yield from tqdm(items, total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
        return
    start = last = time.monotonic()
    for n, item in enumerate(items, start=1):
        yield item
        now = time.monotonic()
        if now - last >= log_every:
            last = now
            of = f"/{total}" if total else ""
            logger.info("%s: %d%s %s (%.1f %s/s)", desc, n, of, unit, n / (now - start), unit)
