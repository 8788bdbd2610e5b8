"""Whether to compute in bf16 here: the one place that decides it for training, the tokenizer build and evaluation.

bf16 autocast pays only where the hardware multiplies bf16 itself. On a CPU without bf16 instructions oneDNN
emulates it: on a 2-core AMD EPYC with AVX2 and no AVX-512, a 1024 x 1024 matrix product took 2.56 s in bf16 against
0.019 s in fp32 (137x slower), where an AVX-512 BF16 CPU of the same family ran it 4.3x faster than fp32. So a config
says `bf16: auto` and gets bf16 only where it is fast; `true` and `false` are obeyed, with a warning when `true`
will be slow.
"""

from __future__ import annotations

import platform
import warnings

import torch

AUTO = "auto"


def has_native_bf16(device: str | torch.device) -> bool:
    """True when `device` computes bf16 matrix products in hardware: a GPU with bf16 tensor cores, an x86 CPU with
    AVX-512 BF16 or AMX, an Arm CPU with the BF16 extension."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return False
    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        # torch has no public query for the instructions; its private ones read the same cpuinfo oneDNN dispatches on.
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    # Arm: oneDNN's bf16 kernels need the BF16 extension, which is what this reports there.
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def describe_device(device: str | torch.device) -> str:
    """A few words naming `device`'s kind and its fastest instructions, for logs and warnings."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return f"{platform.machine()} CPU ({torch.backends.cpu.get_cpu_capability()})"
    return device.type


def bf16_setting_problem(setting: object) -> str | None:
    """What is wrong with a config's `bf16` value (None: true, false or "auto"), for the configs' own checks."""
    if isinstance(setting, bool) or (isinstance(setting, str) and setting.strip().lower() == AUTO):
        return None
    return f"bf16 must be true, false or {AUTO}, got {setting!r}"


def resolve_bf16(setting: bool | str, device: str | torch.device) -> bool:
    """A config's `bf16` (true, false or "auto") as the bool to run with on `device`.

    "auto" is bf16 where `has_native_bf16(device)`, fp32 elsewhere; true on a device without it is kept (the user
    asked) but warned about, since it can be two orders of magnitude slower.
    """
    problem = bf16_setting_problem(setting)
    if problem:
        raise ValueError(problem)
    if isinstance(setting, str):
        return has_native_bf16(device)
    if setting and not has_native_bf16(device):
        warnings.warn(
            f"bf16 was asked for on {describe_device(device)}, which has no bf16 instructions: it is emulated and can "
            f"run 100x slower than fp32 (use bf16: {AUTO}, or --no-bf16)",
            RuntimeWarning,
            stacklevel=2,
        )
    return setting
