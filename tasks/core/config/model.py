"""The model stages' sections: the base model, training, evaluation, the promotion gate and the push."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.core.config.base import OPTIMIZERS, SCHEDULERS, Section, name_problem, seed_field
from tasks.core.config.task_files import local_task_problems, task_path_like


class ModelConfig(Section):
    KEY_NEUTRAL = frozenset({"id"})  # stages key the model and tokenizer by content digest (or hub commit)
    id: str = Field(
        ..., description="Hub id (e.g. unsloth/gemma-3-1b-pt) or a local directory; its tokenizer is the one used."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for model and tokenizer.")
    trust_remote_code: bool = Field(False, description="Allow custom model/tokenizer code from the hub.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype for training and evaluation. auto: bfloat16 on a GPU that supports it, "
        "float32 on CPU."
    )
    attn_implementation: Literal["auto", "eager", "sdpa", "flash_attention_2", "flex_attention"] = Field(
        "auto", description="Attention kernel. auto: sdpa (fast, exact), or eager for models with attention "
        "soft-capping (Gemma 2), which only eager implements. With train.packing on a GPU, flex_attention skips "
        "the masked blocks between packed chunks (python -m bench.gpu_check: 2.4x sdpa on an H200; compiles once)."
    )


# LoRA's usual targets: every linear layer of a decoder block (axolotl's lora_target_linear, Unsloth's default).
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# What lora.train_embeddings trains in full (peft's modules_to_save); never LoRA targets (unsloth #9326: listed in
# target_modules they got a low-rank adapter, or were dropped, instead of the full training CPT needs).
EMBEDDING_MODULES = ("embed_tokens", "lm_head")
TRACKERS = ("tensorboard", "mlflow", "wandb", "trackio")


class LoraSettings(Section):
    """train.method lora or qlora: the adapter (peft's LoraConfig) and what else trains in full."""

    r: int = Field(16, ge=1, description="The adapter's rank.")
    alpha: int = Field(32, ge=1, description="lora_alpha: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(LORA_TARGETS), min_length=1,
        description="Module names that get an adapter (peft's target_modules): by default every linear layer of a "
        "decoder block. embed_tokens and lm_head are not LoRA targets: use train_embeddings."
    )
    train_embeddings: bool = Field(
        False, description="Also train embed_tokens and lm_head in full (peft's modules_to_save; one copy when they "
        "are tied), as continued pretraining on a new language or domain needs (Unsloth's CPT recipe)."
    )
    embedding_learning_rate: float | None = Field(
        None, gt=0, description="The learning rate of embed_tokens and lm_head with train_embeddings (Unsloth's "
        "embedding_learning_rate). null: train.learning_rate / 10 (Unsloth's CPT notebooks: 5e-5 and 5e-6)."
    )

    @field_validator("target_modules")
    @classmethod
    def _no_embeddings(cls, names: list[str]) -> list[str]:
        wrong = [n for n in names if n.rsplit(".", 1)[-1] in EMBEDDING_MODULES]
        if wrong:
            raise ValueError(f"{wrong}: embeddings are not LoRA targets (a low-rank adapter on them is not what CPT "
                             "needs); set train.lora.train_embeddings: true to train embed_tokens and lm_head in full")
        if len(set(names)) != len(names):
            raise ValueError("a module is listed twice")
        return names


class TrainConfig(Section):
    # How batches are fetched, not what they hold; where the run is reported; what the memory estimate is told.
    KEY_NEUTRAL = frozenset({"dataloader_num_workers", "report_to", "gpu_memory_gb", "model_params_b"})
    num_train_epochs: float = Field(3.0, gt=0, description="Passes over the training chunks (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Optimizer steps; > 0 overrides num_train_epochs.")
    per_device_train_batch_size: int = Field(2, ge=1, description="Rows per device per micro-batch.")
    per_device_eval_batch_size: int = Field(4, ge=1, description="Rows per device per evaluation batch.")
    gradient_accumulation_steps: int = Field(4, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate (CPT uses a low one).")
    lr_scheduler_type: Literal[SCHEDULERS] = Field(
        "cosine", description="Learning-rate schedule (transformers' names). Every run warms up and decays afresh, "
        "also when it continues a promoted model (train.init); warmup_stable_decay holds the peak and decays over "
        "the last `decay_ratio` of the steps, the usual choice for open-ended continual pretraining."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Share of steps spent warming the learning rate up.")
    decay_ratio: float = Field(
        0.1, gt=0, le=1, description="warmup_stable_decay only: share of the steps spent in the final decay."
    )
    init: Literal["base", "last_promoted"] = Field(
        "base",
        description="Weights training starts from. base: model.id. last_promoted: the last model the promotion "
        "gate let through on this line (cpt retrain --line) or push.name, else model.id; a rerun on the same "
        "data and settings reuses its training instead of stacking it on itself.",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    optim: str = Field(
        "paged_adamw_8bit",
        description="Optimizer (transformers' OptimizerNames). paged_adamw_8bit needs bitsandbytes on a CUDA "
        "device; elsewhere optim_fallback is used and the switch is logged once.",
    )
    optim_fallback: str = Field(
        "adamw_torch", description="Optimizer used where `optim` cannot run on the device (transformers' names)."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward: less GPU memory, ~30% slower. Turned off (and "
        "logged) on CPU, where it would only cost time."
    )
    packing: bool = Field(
        False,
        description="Pack several chunks into each row (best-fit), position ids restarting per chunk so no token "
        "attends across chunks: no padding.",
    )
    packed_length: int | Literal["auto"] | None = Field(
        None, description="With packing: static shapes. Every packed row is padded to this many positions (a "
        "multiple of 128, at least chunk.max_seq_length) and every micro-batch to per_device_train_batch_size "
        "rows, so a compiled model and flex_attention compile once; the padding is its own sequence with labels "
        "-100 (never trained on) and is reported (padding_fraction). auto: chunk.max_seq_length rounded up to 128. "
        "null: padding-free batches as long as their tokens (a new shape per batch)."
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer (regional: one layer's graph serves them all, so it "
        "compiles in seconds, not minutes); the LM head and loss stay TRL's fused kernel. Pays with static shapes "
        "(packed_length); the first step's compile time is reported apart (compile_seconds)."
    )
    compile_mode: Literal["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"] = Field(
        "default", description="torch.compile mode with compile: true. default: fused kernels without autotuning or "
        "CUDA graphs (the cudagraph modes keep a static memory pool per shape and re-record for validation "
        "batches; the autotune modes spend minutes per shape). bench/gpu_check measures the alternatives."
    )
    logging_steps: int = Field(25, ge=1, description="Log the training loss every this many steps.")
    eval_steps: int = Field(100, ge=1, description="Validation loss every this many steps.")
    save_steps: int = Field(100, ge=1, description="Checkpoint every this many steps (a multiple of eval_steps).")
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept (the best one is always kept).")
    early_stopping_patience: int | None = Field(
        5, ge=1, description="Stop after this many evaluations without a better validation loss; null disables."
    )
    seed: int = seed_field(42, "Seed of initialisation-dependent parts and data order.")
    num_processes: int = Field(1, ge=1, description="Processes for `accelerate launch` (one per GPU).")
    accelerate_config: str | None = Field(
        None, description="An `accelerate config` YAML (e.g. FSDP or DeepSpeed) passed to `accelerate launch`; "
        "null: plain DDP across num_processes GPUs."
    )
    dataloader_num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    method: Literal["full", "lora", "qlora"] = Field(
        "full", description="full: every weight trains. lora: a low-rank adapter per train.lora.target_modules on "
        "the frozen base (plus embed_tokens and lm_head with train.lora.train_embeddings). qlora: lora on a 4-bit "
        "(NF4, bitsandbytes) base, CUDA only. The model published, evaluated and gated is always the merged one "
        "(base + adapter, in model.dtype); push.adapter_only releases the adapter instead."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="The adapter, with method lora or qlora.")
    sharding: Literal["none", "fsdp"] = Field(
        "none", description="none: every process holds the whole model (DDP). fsdp: FSDP2 through accelerate, fully "
        "sharded, each decoder layer its own unit, compute in model.dtype with float32 master weights, activation "
        "checkpointing per layer with gradient_checkpointing; sharded checkpoints (verified against their manifest "
        "before a resume reads them), one safetensors model at the end. Needs num_processes >= 2."
    )
    report_to: list[Literal[TRACKERS]] = Field(
        default_factory=lambda: ["tensorboard"], description="Experiment trackers the training, evaluate's numbers "
        "and the gate's decision are logged to, any of tensorboard, mlflow, wandb, trackio. The run is named after "
        "the Prefect flow run and tagged with the line, the drop, the train key and the flow run's URL. Settings and "
        "credentials come from the environment only (MLFLOW_TRACKING_URI, WANDB_API_KEY, WANDB_MODE, ...). "
        "TensorBoard logs are always written into the train entry. Not part of any key."
    )
    gpu_memory_gb: float | None = Field(
        None, gt=0, description="Memory of one GPU in GiB (an 80 GB card: 80): `cpt validate` warns when the estimate per GPU for this "
        "config (tasks/ml/memory.py: weights, gradients, optimizer states, activations) exceeds it."
    )
    model_params_b: float | None = Field(
        None, gt=0, description="The model's parameters in billions, for the memory estimate when its config.json is "
        "not at hand (a hub id not downloaded yet); the config's own count wins when it is."
    )

    def key_material(self) -> dict:
        out = super().key_material()
        if self.method == "full":
            out.pop("lora")  # adapter settings shape nothing a full training makes
        return out

    @field_validator("report_to")
    @classmethod
    def _each_once(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError("a tracker is listed twice")
        return names

    @field_validator("optim", "optim_fallback")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        if name not in OPTIMIZERS:
            close = difflib.get_close_matches(name, OPTIMIZERS, n=4, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}?" if close else "see transformers.training_args.OptimizerNames"
            raise ValueError(f"unknown optimizer {name!r} (not one of transformers' OptimizerNames); {hint}")
        return name

    @field_validator("packed_length")
    @classmethod
    def _aligned_length(cls, length: int | str | None) -> int | str | None:
        if isinstance(length, int) and (length <= 0 or length % 128):
            raise ValueError(f"packed_length ({length}) must be a positive multiple of 128 (flex_attention's block)")
        return length

    @model_validator(mode="after")
    def _checkpoints_line_up_with_evaluations(self) -> TrainConfig:
        if self.sharding == "fsdp":
            if self.num_processes < 2:
                raise ValueError("sharding: fsdp shards the model across processes; set num_processes >= 2 (one per "
                                 "GPU)")
            if self.accelerate_config:
                raise ValueError("sharding: fsdp writes its own accelerate setup; accelerate_config passes yours: set "
                                 "one of them")
            if self.method != "full":
                raise ValueError(f"method {self.method} with sharding: fsdp is not supported yet: an 8B model's "
                                 "adapter training fits one GPU (configs/llama3.1-8b-qlora-1gpu.yaml); use sharding: "
                                 "none with several processes for DDP")
            if self.compile:
                raise ValueError("compile with sharding: fsdp is not supported yet (each FSDP unit would be compiled "
                                 "around its collectives); set compile: false")
        if self.packed_length is not None and not self.packing:
            raise ValueError("packed_length: static packed rows need packing: true")
        if self.save_steps % self.eval_steps:
            raise ValueError(
                f"save_steps ({self.save_steps}) must be a multiple of eval_steps ({self.eval_steps}) so the best "
                "model by validation loss has a checkpoint"
            )
        return self


class GenerationConfig(Section):
    do_sample: bool = Field(True, description="Sample (true) or greedy (false).")
    max_new_tokens: int = Field(512, ge=1, description="Tokens generated per prompt.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(64, ge=0, description="Top-k sampling (0 disables).")
    repetition_penalty: float = Field(1.05, gt=0, description="Penalty on repeated tokens.")
    seed: int = seed_field(0, "Seed set before each prompt, so before and after are comparable.")


class EvaluateConfig(Section):
    KEY_NEUTRAL = frozenset({"batch_size", "task_batch_size", "general_corpus"})  # corpus: keyed by its fingerprint
    prompts: list[str] = Field(
        default_factory=list, description="Prompts generated from before and after training (the seed's questions)."
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Sampling settings.")
    general_corpus: list[str] | None = Field(
        None, description="Optional paths of general-domain text: perplexity there before and after shows forgetting."
    )
    max_eval_rows: int | None = Field(
        None, ge=1, description="Evaluate on at most this many validation rows (null: all)."
    )
    batch_size: int = Field(4, ge=1, description="Rows per perplexity batch.")
    tasks: list[str] = Field(
        default_factory=list, description="lm-evaluation-harness tasks run on the base model, the gate's reference "
        "and the new model: registry names (`kormedmcqa`; their data comes from the Hub) or paths to local task "
        "YAML files or folders of them (lm-eval's include_path; `dataset_path: json` with "
        "`dataset_kwargs.data_files` reads local JSON lines, resolved against the working directory). A YAML "
        "file runs the task it names; a folder, every task its YAML files name. Empty: no tasks (lm-eval is not "
        "imported)."
    )
    task_limit: int | None = Field(
        None, ge=1, description="Examples per task (lm-eval's limit; null: all). The card shows how many ran."
    )
    num_fewshot: int | None = Field(
        None, ge=0, description="Few-shot examples per prompt (null: each task's own default)."
    )
    task_batch_size: int = Field(8, ge=1, description="Requests per lm-eval batch (memory only, not results).")

    @field_validator("tasks")
    @classmethod
    def _tasks_reachable(cls, tasks: list[str]) -> list[str]:
        import os

        offline = [v for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE") if os.environ.get(v, "").upper()
                   in ("1", "ON", "YES", "TRUE")]
        for i, name in enumerate(tasks):
            if task_path_like(name):
                path = Path(name).expanduser()
                if not path.exists():
                    raise ValueError(f"[{i}] {name!r}: no such task YAML file or folder")
                if path.is_file() and path.suffix not in (".yaml", ".yml"):
                    raise ValueError(f"[{i}] {name!r}: a local task is a .yaml/.yml file or a folder of them")
                for problem in local_task_problems(path):
                    raise ValueError(f"[{i}] {name!r}: {problem}")
            elif offline:
                raise ValueError(
                    f"[{i}] {name!r} is an lm-eval registry task whose data comes from the Hub, but "
                    f"{' and '.join(offline)} is set: run online once (the datasets cache keeps it), or use a "
                    "local task YAML with `dataset_path: json` (a path here)")
        if len(set(tasks)) != len(tasks):
            raise ValueError("a task is listed twice")
        return tasks

    def local_tasks(self) -> list[Path]:
        return [Path(t).expanduser() for t in self.tasks if task_path_like(t)]


class TaskCheck(Section):
    task: str = Field(..., description="An lm-eval task name (as in evaluate.tasks, or a task a local YAML names).")
    metric: str = Field("acc", description="Its metric as lm-eval reports it, without the filter (acc, acc_norm).")
    max_drop: float = Field(
        0.0, ge=0, description="Most the new model's metric may fall below the reference's, absolute (0.02 = two "
        "points of accuracy). 0: not below the reference."
    )


class GateConfig(Section):
    """The promotion gate between evaluate and push: a model that fails it is not pushed."""

    enabled: bool = Field(True, description="false: push every trained model (no comparison).")
    max_validation_increase: float = Field(
        0.0, ge=0, description="Most the domain validation perplexity may rise over the reference model's (the "
        "last promoted one, else the base), as a share. 0: it must be better (strictly below, see "
        "min_improvement); > 0 explicitly accepts a model up to this much worse, a tie included."
    )
    min_improvement: float = Field(
        0.0, ge=0, lt=1, description="The domain validation perplexity must fall below the reference's by more "
        "than this share (new < reference * (1 - min_improvement)). 0: any strict improvement; a tie is refused. "
        "Only with max_validation_increase 0."
    )
    max_general_increase: float = Field(
        0.10, ge=0, description="Most the general-text perplexity may rise over the base model's, as a share "
        "(checked when evaluate.general_corpus is set)."
    )
    tasks: list[TaskCheck] = Field(
        default_factory=list, description="Downstream task checks ({task, metric, max_drop}) on evaluate.tasks' "
        "results: the new model's metric may not fall below the reference's by more than max_drop. A result that "
        "is missing or not finite refuses."
    )

    @model_validator(mode="after")
    def _better_or_explicitly_worse(self) -> GateConfig:
        if self.min_improvement > 0 and self.max_validation_increase > 0:
            raise ValueError(
                f"min_improvement ({self.min_improvement}) and max_validation_increase "
                f"({self.max_validation_increase}) exclude each other: max_validation_increase > 0 accepts a model "
                "worse than its reference, min_improvement > 0 demands a better one; set one of them to 0"
            )
        return self


class PushConfig(Section):
    name: str | None = Field(
        None, description="Folder under artifacts/models/ for the final model (default: <base>-cpt-<key>): one "
        "folder name, like a line name (no '/' or '\\', not starting with '.', not empty)."
    )
    repo_id: str | None = Field(None, description="Hub repo to upload to (user/name); null saves locally only.")
    private: bool = Field(True, description="Create the hub repo private.")
    revision: str | None = Field(None, description="Hub branch to upload to (created if missing); null: main.")
    token_secret: str | None = Field(
        None, description="Name of a Prefect Secret block holding the hub token; else HF_TOKEN from the environment."
    )
    retries: int = Field(3, ge=0, description="Upload retries with exponential backoff.")
    adapter_only: bool = Field(
        False, description="With train.method lora or qlora: release the adapter (adapter_config.json, "
        "adapter_model.safetensors, the tokenizer) instead of the merged model. The card says which. The gate "
        "measured the merged model either way."
    )

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, name: str | None) -> str | None:
        if name is not None and (why := name_problem(name)):
            raise ValueError(f"{name!r} is not a valid name: {why}; it names one folder under artifacts/models/")
        return name
