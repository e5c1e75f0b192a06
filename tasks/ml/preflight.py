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


def model_id_problem(model_id: str) -> str | None:
    """Why `model.id` cannot be loaded from this machine, where that is known without the network: a folder here
    without a saved model, or a name that is neither a folder here nor a Hugging Face hub id (name or
    namespace/name: `huggingface_hub`'s own check). A hub id is not fetched: whether it exists is the run's to find."""
    from pathlib import Path

    local = Path(model_id).expanduser()
    if local.is_dir():
        return None if (local / "config.json").is_file() else (
            f"model.id: {model_id!r} is a folder without config.json ({local.resolve()}): not a saved model")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        if not (local.exists() or model_id.startswith((".", "/", "~"))):
            validate_repo_id(model_id)
            return None
    except HFValidationError:
        pass
    return (f"model.id: {model_id!r} is not a folder here ({local.resolve()}) nor a Hugging Face hub id "
            "(name or namespace/name): build or save the model there (the demo's: `cpt init-tiny-model "
            f"{model_id}`), or set model.id")


def check_model_here(cfg, needed: bool = True) -> None:
    """`model_id_problem` as a config error (when the run `needed` the model: its stages reach tokenize): for
    `cpt run` and `cpt retrain`, before a server starts for them."""
    problem = model_id_problem(cfg.model.id) if needed else None
    if problem:
        from tasks.core.config.base import ConfigError

        raise ConfigError(problem)


def machine_problems(cfg) -> list[str]:
    """Errors: what this config needs that this machine lacks."""
    problems = [p for p in [model_id_problem(cfg.model.id)] if p]
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
