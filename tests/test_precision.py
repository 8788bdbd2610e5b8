"""unifier.precision: bf16 where the hardware has it, fp32 where it would be emulated, and the configs that use it."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from unifier import precision
from unifier.precision import has_native_bf16, resolve_bf16


@pytest.fixture
def x86(monkeypatch):
    """Pretend to be an x86 CPU whose bf16 instructions the test sets: {"avx512_bf16": bool, "amx": bool}."""
    flags = {"avx512_bf16": False, "amx": False}
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: flags["avx512_bf16"])
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: flags["amx"])
    return flags


def test_auto_takes_bf16_only_on_a_cpu_with_bf16_instructions(x86):
    assert resolve_bf16("auto", "cpu") is False  # AVX2 / plain AVX-512: emulated
    x86["avx512_bf16"] = True
    assert resolve_bf16("auto", "cpu") is True and resolve_bf16(" AUTO ", torch.device("cpu")) is True
    x86.update(avx512_bf16=False, amx=True)
    assert resolve_bf16("auto", "cpu") is True


def test_devices_without_cuda_or_other_kinds_have_no_native_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert has_native_bf16("cuda") is False and has_native_bf16("meta") is False


def test_true_and_false_are_obeyed_and_true_on_an_emulating_cpu_warns(x86):
    with pytest.warns(RuntimeWarning, match=r"no bf16 instructions.*--no-bf16"):
        assert resolve_bf16(True, "cpu") is True
    x86["amx"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_bf16(True, "cpu") is True
        assert resolve_bf16(False, "cpu") is False


@pytest.mark.parametrize("setting", ["yes", "bf16", 1, None])
def test_anything_else_is_an_error_naming_the_value(setting):
    with pytest.raises(ValueError, match=re.escape(f"bf16 must be true, false or auto, got {setting!r}")):
        resolve_bf16(setting, "cpu")


def test_configs_check_the_setting():
    from unifier.tokenization.vqgan_train import VQGANTrainConfig, VQGANTrainError
    from unifier.train import TrainConfig

    assert TrainConfig(bf16="auto").bf16 == "auto"
    with pytest.raises(ValueError, match="bf16 must be true, false or auto, got 'fast'"):
        TrainConfig(bf16="fast")
    assert VQGANTrainConfig.from_dict({"bf16": "auto"}).bf16 == "auto"
    with pytest.raises(VQGANTrainError, match="image.train: bf16 must be true, false or auto"):
        VQGANTrainConfig.from_dict({"bf16": "often"})
