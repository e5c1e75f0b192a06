"""What `cpt validate` checks of the machine it runs on, without importing torch: a config that needs CUDA
(train.method: qlora) on a machine without a CUDA device is refused there, naming why, and the memory estimate
is compared with train.gpu_memory_gb (tasks/ml/memory.py).

The config itself stays valid everywhere: the preprocessing pool of a two-pool setup loads the same config on a
CPU machine and must not refuse it. The train stage checks again where it runs (`refuse_on_this_machine`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os


def cuda_devices() -> tuple[int, str]:
    """(CUDA devices the driver sees, why none when 0), from the driver library itself (libcuda's cuInit and
    cuDeviceGetCount), as torch would find them, without importing torch. CUDA_VISIBLE_DEVICES is honoured by the
    driver."""
    if os.environ.get("CPT_FAKE_CUDA_DEVICES"):  # tests: a machine with GPUs, seen from one without
        return int(os.environ["CPT_FAKE_CUDA_DEVICES"]), ""
    name = ctypes.util.find_library("cuda") or "libcuda.so.1"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return 0, "no CUDA driver on this machine (libcuda not found)"
    if lib.cuInit(0) != 0:
        return 0, "the CUDA driver found no usable device (cuInit failed)"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, "the CUDA driver reports no device"
    return count.value, ""


def machine_problems(cfg) -> list[str]:
    """Errors: what this config needs that this machine lacks."""
    problems = []
    if cfg.train.method == "qlora":
        n, why = cuda_devices()
        if n == 0:
            problems.append(f"train.method: qlora loads the base model in 4 bits through bitsandbytes, which needs a "
                            f"CUDA GPU: {why}. Use train.method: lora here, or validate on the GPU machine")
    return problems


def refuse_on_this_machine(cfg_train) -> None:
    """The train stage's check before it starts a child: the same refusal as `cpt validate`."""
    if cfg_train.method == "qlora":
        n, why = cuda_devices()
        if n == 0:
            from tasks.core.config.base import ConfigError

            raise ConfigError(f"train.method: qlora needs a CUDA GPU (bitsandbytes 4-bit): {why}")


def warnings(cfg) -> list[str]:
    from tasks.ml.memory import memory_warning

    out = []
    memory = memory_warning(cfg)
    if memory:
        out.append(memory)
    return out
