"""Device names: the one place that turns ``--device`` (auto, cpu, cuda, cuda:N) into a device.
Training, translation and the CTranslate2 engine all check a device name with
:func:`check_device_name`, each saying in its own words what is missing when CUDA is asked for
but absent (torch and CTranslate2 may disagree about the GPUs they see)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mtkit.errors import MtkitError

NO_CUDA = "device '{device}' requested but CUDA is not available"
NO_CUDA_FOR_TRAINING = "--device cuda requested but no CUDA device is available"


def check_device_name(
    device: str, cuda_device_count: Callable[[], int] | None = None, no_cuda: str = NO_CUDA,
    allow_index: bool = True,
) -> str:
    """Check ``device`` and resolve ``auto``: returns ``cpu``, ``cuda`` or (with ``allow_index``)
    ``cuda:N`` as given. ``cuda_device_count`` (torch's by default) is asked only for ``auto`` and
    CUDA names; ``no_cuda`` is the error (``{device}`` filled in) when CUDA is asked for but none is seen."""
    count = cuda_device_count or torch.cuda.device_count
    if device == "auto":
        return "cuda" if count() > 0 else "cpu"
    wants_cuda = device.startswith("cuda") if allow_index else device == "cuda"
    if wants_cuda and count() == 0:
        raise MtkitError(no_cuda.format(device=device))
    if device != "cpu" and not wants_cuda:
        raise MtkitError(f"unknown device '{device}' (auto, cpu or cuda)")
    return device


def torch_device(device: str | torch.device) -> torch.device:
    """A device for decoding: ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N``; a torch.device is kept."""
    if isinstance(device, torch.device):
        return device
    return torch.device(check_device_name(device))


def training_device(device: str | torch.device, local_rank: int | None = None) -> torch.device:
    """A device for training: ``auto`` / ``cpu`` / ``cuda``; a data-parallel rank (``local_rank``
    given) uses, and makes current, ``cuda:LOCAL_RANK``."""
    if isinstance(device, torch.device):
        return device
    device = check_device_name(device, no_cuda=NO_CUDA_FOR_TRAINING, allow_index=False)
    if device == "cuda" and local_rank is not None:
        if local_rank >= torch.cuda.device_count():
            raise MtkitError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(device)
