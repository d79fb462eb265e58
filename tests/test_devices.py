from __future__ import annotations

import pytest
import torch

from mtkit.devices import check_device_name, torch_device, training_device
from mtkit.errors import MtkitError


def no_gpu() -> int:
    return 0


def two_gpus() -> int:
    return 2


def test_auto_picks_cuda_only_when_a_gpu_is_seen():
    assert check_device_name("auto", no_gpu) == "cpu"
    assert check_device_name("auto", two_gpus) == "cuda"


def test_names_are_kept_as_given():
    assert check_device_name("cpu", no_gpu) == "cpu"
    assert check_device_name("cuda", two_gpus) == "cuda"
    assert check_device_name("cuda:1", two_gpus) == "cuda:1"


def test_cuda_without_a_gpu_fails_in_the_callers_words():
    with pytest.raises(MtkitError, match=r"^device 'cuda:1' requested but CUDA is not available$"):
        check_device_name("cuda:1", no_gpu)
    with pytest.raises(MtkitError, match=r"^device 'cuda' requested but CTranslate2 sees no CUDA device$"):
        check_device_name("cuda", no_gpu, "device '{device}' requested but CTranslate2 sees no CUDA device")


def test_unknown_names_are_refused():
    for name in ("gpu", "mps", "CPU", ""):
        with pytest.raises(MtkitError, match=rf"^unknown device '{name}' \(auto, cpu or cuda\)$"):
            check_device_name(name, two_gpus)
    with pytest.raises(MtkitError, match=r"^unknown device 'cuda:0' \(auto, cpu or cuda\)$"):
        check_device_name("cuda:0", two_gpus, allow_index=False)


def test_the_gpu_count_is_not_asked_for_the_cpu():
    def fail() -> int:
        raise AssertionError("asked")

    assert check_device_name("cpu", fail) == "cpu"


def test_torch_and_training_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", no_gpu)
    assert torch_device("auto") == torch.device("cpu") == training_device("auto", local_rank=0)
    assert torch_device(torch.device("cuda", 3)) == torch.device("cuda", 3)  # kept as given
    with pytest.raises(MtkitError, match=r"^device 'cuda:0' requested but CUDA is not available$"):
        torch_device("cuda:0")
    with pytest.raises(MtkitError, match=r"^--device cuda requested but no CUDA device is available$"):
        training_device("cuda")
    with pytest.raises(MtkitError, match=r"^unknown device 'cuda:0' \(auto, cpu or cuda\)$"):
        training_device("cuda:0")


def test_a_rank_needs_its_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", two_gpus)
    with pytest.raises(MtkitError, match=r"^LOCAL_RANK 2 but only 2 CUDA devices are visible$"):
        training_device("cuda", local_rank=2)
