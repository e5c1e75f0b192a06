"""The one typed config tree of cpt: a section per stage.

The same `CptConfig` is the flow's parameter (Prefect renders it as a form), loads from YAML and takes
`--set section.field=value` overrides. Only pydantic and yaml are imported here so config checks are instant.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STAGES = ("load", "shuffle", "tokenize", "token-stats", "chunk", "evaluate-base", "train", "evaluate", "gate", "push")
# transformers' scheduler names (SchedulerType), listed here so a typo fails `cpt validate`, not a training child.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt", "cosine_with_min_lr", "cosine_warmup_with_min_lr", "warmup_stable_decay")
# transformers' optimizer names (transformers.training_args.OptimizerNames, in its order), kept here for the same
# reason; tests/test_config.py checks the tuple against the installed library, so an upgrade that changes it fails.
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
              "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad",
              "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
              "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit", "paged_lion_8bit",
              "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw", "galore_adamw_8bit",
              "galore_adafactor", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise",
              "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw", "schedule_free_radam",
              "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw")
# The largest seed every consumer accepts: numpy's legacy np.random.seed (which transformers' set_seed calls)
# takes 0 <= seed < 2**32; numpy.random.default_rng refuses negative seeds.
SEED_MAX = 2**32 - 1


def seed_field(default: int, description: str) -> Any:
    return Field(default, ge=0, le=SEED_MAX, description=f"{description} 0 to 2**32 - 1 (numpy's range).")


def name_problem(name: str) -> str | None:
    """Why `name` is not usable as one folder or file name (the rule of line names), or None when it is."""
    if not name:
        return "it is empty"
    if "/" in name or "\\" in name:
        return "it contains a path separator ('/' or '\\')"
    if "\x00" in name:
        return "it contains a NUL character"
    if name.startswith("."):
        return "it starts with '.' ('.', '..' and hidden names are refused)"
    return None


class ConfigError(ValueError):
    """A config problem, phrased with the full key path (`chunk.overlap: ...`)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)
    # Fields that are not part of a cache key: settings proven not to change any output (batch sizes that
    # only bound memory), and where an input sits when its content is keyed by a fingerprint (paths, model id).
    KEY_NEUTRAL: ClassVar[frozenset[str]] = frozenset()

    def key_material(self) -> dict[str, Any]:
        """What of this section enters cache keys: every field less KEY_NEUTRAL, nested sections likewise."""
        out = self.model_dump(mode="json", exclude=set(self.KEY_NEUTRAL))
        for name in out:
            value = getattr(self, name)
            if isinstance(value, Section):
                out[name] = value.key_material()
        return out


class NearDedupConfig(Section):
    """MinHash + LSH near-duplicate removal across the whole line (every file, every drop)."""

    enabled: bool = Field(
        True, description="Remove near-duplicates (re-exports with another date, header, wrapping or a fixed typo) "
        "and count them as near_duplicates. On by default: on a cold load it costs under half the load stage's "
        "own seconds, a +1 file drop about a fifth (bench.near_dedup). Off gives a line exactly the outputs it "
        "had without it (only exact duplicates removed)."
    )
    threshold: float = Field(
        0.8, gt=0, lt=1, description="Estimated Jaccard similarity of the shingle sets at or above which two "
        "documents are near-duplicates (LSH candidates are verified against it on the signatures)."
    )
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash permutations per signature.")
    shingle_chars: int = Field(
        5, ge=2, le=64, description="Shingles are character n-grams of this length over the text lower-cased "
        "with whitespace collapsed: Korean words carry particles and endings, so word shingles miss re-exports "
        "that character n-grams catch, and re-wrapping changes no shingle."
    )
    seed: int = seed_field(1, "Seed of the MinHash permutations.")

    def key_material(self) -> dict[str, Any]:
        return super().key_material() if self.enabled else {"enabled": False}


class CorpusConfig(Section):
    KEY_NEUTRAL = frozenset({"paths", "exclude"})  # the files are keyed by their content (the load fingerprint)
    paths: list[str] = Field(
        default_factory=list,
        description="Files, globs or folders. Formats by extension: .jsonl, .json (array or lines), "
        ".parquet, .csv, .txt (one file is one document). Folders are read recursively.",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Files, globs or folders whose files are never read, even when under `paths` (a retraining "
        "line uses it for drops it rejected or retired).",
    )
    text_field: str = Field("content", description="Field holding the document text.")
    question_field: str | None = Field(
        None, description="For Q/A corpora: field holding the question (set with answer_field)."
    )
    answer_field: str | None = Field(None, description="For Q/A corpora: field holding the answer.")
    template: str = Field(
        "{question} {answer}", description="How a Q/A pair becomes one document text."
    )
    on_bad_record: Literal["fail", "skip"] = Field(
        "fail",
        description="fail: stop at the first bad record with file:line: reason. "
        "skip: keep going, write every reject to the load output's rejects.jsonl and count them.",
    )
    min_chars: int = Field(
        1, ge=1, description="Documents shorter than this (after stripping whitespace) are removed and counted."
    )
    deduplicate: bool = Field(True, description="Remove exact-duplicate documents (counted).")
    max_document_bytes: int = Field(
        64 << 20, ge=1, le=1 << 30, description="A record whose text is longer than this (UTF-8 bytes; for .txt "
        "the whole file; for CSV the field limit, in characters) is a reject with file:line, never an "
        "out-of-memory: the readers hold about one 8 MiB block plus one record, and a JSON line or array element "
        "over twice this plus 1 MiB (room for escapes and other fields) is not even held. 64 MiB is far above "
        "any real document; at most 1 GiB (one Arrow string column holds under 2 GiB)."
    )
    near_dedup: NearDedupConfig = Field(
        default_factory=NearDedupConfig, description="Near-duplicate removal (MinHash + LSH) in load's assembly."
    )

    def key_material(self) -> dict[str, Any]:
        out = super().key_material()
        if not self.near_dedup.enabled:
            out.pop("near_dedup")  # off: the keys of today's outputs
        return out

    @model_validator(mode="after")
    def _qa_fields_together(self) -> CorpusConfig:
        if (self.question_field is None) != (self.answer_field is None):
            raise ValueError("question_field and answer_field must be set together")
        if self.question_field is not None:
            for name in ("question", "answer"):
                if "{" + name + "}" not in self.template:
                    raise ValueError(f"template must contain {{{name}}}")
        return self


class DropsConfig(Section):
    """The gate a newly announced corpus drop passes before it is registered to a training line."""

    roots: list[str] = Field(
        default_factory=list, description="Folders drops may come from: a drop outside every root is rejected "
        "with that reason. A run started by an event (the on-drop deployment) refuses every drop while this is "
        "empty (an event is untrusted input); `cpt retrain --drop` typed at a shell accepts any folder then."
    )
    min_documents: int = Field(1, ge=0, description="A drop must add at least this many documents.")
    max_reject_share: float = Field(
        0.05, ge=0, le=1, description="Most records that may be rejected (malformed, mis-encoded, missing the text "
        "field), as a share of the drop's records. Under corpus.on_bad_record: fail any reject fails the drop."
    )
    max_too_short_share: float = Field(
        0.5, ge=0, le=1, description="Most records that may be shorter than corpus.min_chars, as a share."
    )
    max_duplicate_share: float = Field(
        0.5, ge=0, le=1, description="Most of the drop's documents that may already be in the line (exact text)."
    )
    median_tokens_ratio: float = Field(
        10.0, ge=1, description="The drop's median document length in tokens must lie within this factor of the "
        "line's median (either way): a far shorter or longer median means another kind of text."
    )


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


class DecontaminateConfig(Section):
    """Training documents sharing a long span with held-out text are removed from training (never the reverse)."""

    enabled: bool = Field(
        False, description="Remove training documents that share a span of `min_words` words (or `min_chars` "
        "characters of Korean text) with the validation split, evaluate.general_corpus or the documents of "
        "evaluate.tasks (local data files, or registry tasks in the datasets cache; a task whose data is not at "
        "hand is reported as not checked), from the corpus and from the replay text (which is also kept clear of "
        "the validation split); counted as decontaminated_by_<source>."
    )
    min_words: int = Field(13, ge=4, description="Shared span in words that marks contamination (English-like "
                           "text; 13 as in GPT-3/OLMo decontamination).")
    min_chars: int = Field(50, ge=8, description="Shared span in characters that marks contamination of text "
                           "mostly in Hangul (no spaces between all morphemes, so words are too coarse).")

    def key_material(self) -> dict[str, Any]:
        return super().key_material() if self.enabled else {"enabled": False}


class ShuffleConfig(Section):
    seed: int = seed_field(42, "Seed of the document order, of the train/validation split and of the replay draw.")
    decontaminate: DecontaminateConfig = Field(
        default_factory=DecontaminateConfig, description="Decontamination of the training split against "
        "validation and evaluation text (done here: the validation split is made here)."
    )

    def key_material(self) -> dict[str, Any]:
        out = super().key_material()
        if not self.decontaminate.enabled:
            out.pop("decontaminate")
        return out


SPLITS = ("train", "validation")  # the splits the shuffle stage writes and the chunk stage fills


class SplitConfig(Section):
    validation_fraction: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Share of documents held out for validation, split by document before chunking "
        "(at least one document when > 0).",
    )


class TokenizeConfig(Section):
    KEY_NEUTRAL = frozenset({"batch_size", "batch_bytes"})  # the same ids whatever the batching
    batch_size: int = Field(
        1000, ge=1, description="Documents per tokenizer call; the fast tokenizer spreads a batch over all cores."
    )
    batch_bytes: int = Field(
        4 << 20,
        ge=1,
        description="Also end a batch at about this much UTF-8 text: the tokenizer keeps every token of a "
        "batch in memory (~200 bytes each), so this bounds peak memory whatever the document sizes.",
    )


class TokenStatsConfig(Section):
    bins: int = Field(30, ge=1, le=1000, description="Histogram bins.")


class ChunkConfig(Section):
    max_seq_length: int = Field(1000, ge=2, description="Tokens per training row, BOS included.")
    overlap: int = Field(
        500, ge=0, description="Tokens each window repeats from its predecessor, as context for the next."
    )
    mask_overlap: bool = Field(
        True,
        description="Set labels of the repeated overlap to -100 so every token is trained exactly once "
        "(false reproduces the seed notebook, which trains overlapped tokens twice).",
    )

    @model_validator(mode="after")
    def _overlap_below_window(self) -> ChunkConfig:
        # The tokenizer is not known here, so the bound is the BOS-aware one `tasks.chunk.window_plan` applies to
        # a tokenizer that adds BOS (window = max_seq_length - 1, overlap < window): a config that validates never
        # fails the chunk stage, whatever the tokenizer.
        if self.overlap > self.max_seq_length - 2:
            raise ValueError(
                f"overlap ({self.overlap}) must be at most max_seq_length - 2 ({self.max_seq_length - 2}): a "
                "tokenizer that adds BOS takes one position of every window, and the overlap must leave at least "
                "one new token in each window"
            )
        return self


class TrainConfig(Section):
    KEY_NEUTRAL = frozenset({"dataloader_num_workers"})  # how batches are fetched, not what they hold
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

    def static_length(self, max_seq_length: int) -> int | None:
        """The positions of every packed row with static shapes, or None (padding-free rows of varying length)."""
        if not self.packing or self.packed_length is None:
            return None
        if self.packed_length == "auto":
            return -(-max_seq_length // 128) * 128
        return self.packed_length

    @model_validator(mode="after")
    def _checkpoints_line_up_with_evaluations(self) -> TrainConfig:
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


def task_path_like(name: str) -> bool:
    """A local task (a path) rather than a registry name: registry names hold no '/' and no YAML suffix."""
    return "/" in name or "\\" in name or name.endswith((".yaml", ".yml")) or Path(name).expanduser().exists()


def local_task_files(path: Path) -> list[Path]:
    """A local task's YAML files (the file, or every YAML under the folder), sorted."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml"))


class _TaskYamlLoader(yaml.SafeLoader):
    """lm-eval's `!function` tags name code: read here as data (None), never run."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def read_task_yaml(yaml_file: Path) -> dict[str, Any]:
    """A local lm-eval task YAML as a mapping ({} when it is not one)."""
    try:
        doc = yaml.load(yaml_file.read_text(encoding="utf-8"), Loader=_TaskYamlLoader)
    except yaml.YAMLError as e:
        raise ValueError(f"{yaml_file}: not valid YAML: {e}") from None
    return doc if isinstance(doc, dict) else {}


def local_task_data(yaml_file: Path) -> list[Path]:
    """The local data files a task YAML reads (`dataset_kwargs.data_files`), as written (against the cwd)."""
    files = (read_task_yaml(yaml_file).get("dataset_kwargs") or {}).get("data_files") or {}
    values = files.values() if isinstance(files, dict) else [files]
    out: list[Path] = []
    for v in values:
        out += [Path(x).expanduser() for x in (v if isinstance(v, list) else [v]) if isinstance(x, str)]
    return out


def local_task_problems(path: Path) -> list[str]:
    yamls = local_task_files(path)
    if not yamls:
        return [f"{path} holds no task YAML file"]
    return [f"{y}: its data file {d} does not exist (data_files resolve against the working directory)"
            for y in yamls for d in local_task_data(y) if not d.is_file()]


class TaskCheck(Section):
    task: str = Field(..., description="An lm-eval task name (as in evaluate.tasks, or a task a local YAML names).")
    metric: str = Field("acc", description="Its metric as lm-eval reports it, without the filter (acc, acc_norm).")
    max_drop: float = Field(
        0.0, ge=0, description="Most the new model's metric may fall below the reference's, absolute (0.02 = two "
        "points of accuracy). 0: not below the reference."
    )


class ReplayConfig(Section):
    """General text mixed into training so continued pretraining does not erode what the base model knew."""

    KEY_NEUTRAL = frozenset({"paths"})  # the replay files are keyed by their content
    paths: list[str] = Field(
        default_factory=list, description="General-text files, globs or folders (read like corpus.paths): a sample "
        "of what the base model was pretrained on."
    )
    fraction: float = Field(
        0.0, ge=0, lt=1, description="Share of the training tokens (labelled ones) drawn from the replay text; 0 is "
        "off. A few percent for a mild domain shift, ~0.25 for a strong one (Ibrahim et al. 2024)."
    )
    text_field: str | None = Field(None, description="Field holding the text (null: corpus.text_field).")

    @model_validator(mode="after")
    def _paths_when_on(self) -> ReplayConfig:
        if self.fraction > 0 and not self.paths:
            raise ValueError("paths: replay.fraction > 0 needs at least one replay file, glob or folder")
        return self

    @property
    def active(self) -> bool:
        return self.fraction > 0

    def corpus(self, domain: CorpusConfig) -> CorpusConfig:
        """How replay files are read: plain text documents, with the domain corpus's record rules."""
        return CorpusConfig(paths=self.paths, text_field=self.text_field or domain.text_field,
                            on_bad_record=domain.on_bad_record, min_chars=domain.min_chars, deduplicate=True)


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

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, name: str | None) -> str | None:
        if name is not None and (why := name_problem(name)):
            raise ValueError(f"{name!r} is not a valid name: {why}; it names one folder under artifacts/models/")
        return name


class RuntimeConfig(Section):
    # Where the per-file pieces run changes when they are done, never what they hold: no field is in a key
    # (tests/test_flow.py checks that every runner gives the same keys and outputs).
    KEY_NEUTRAL = frozenset({"task_runner", "max_workers", "dask_address"})
    task_runner: Literal["sequential", "threads", "processes", "dask"] = Field(
        "sequential", description="How the per-file pieces of load, tokenize and chunk run: one after another in "
        "the flow process, or as concurrent Prefect tasks on a thread pool, a process pool, or Dask "
        "(prefect-dask's DaskTaskRunner: runtime.dask_address, or a local cluster)."
    )
    max_workers: int | None = Field(
        None, ge=1, description="Threads, processes or local Dask workers (default: the machine's cores)."
    )
    dask_address: str | None = Field(
        None, description="Scheduler of an existing Dask cluster (e.g. tcp://10.0.0.5:8786); none: a local cluster."
    )


class CptConfig(Section):
    corpus: CorpusConfig = Field(default_factory=CorpusConfig, description="What to read (load stage).")
    model: ModelConfig = Field(..., description="Base model and its tokenizer.")
    shuffle: ShuffleConfig = Field(default_factory=ShuffleConfig, description="Document order (shuffle stage).")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Train/validation split (shuffle stage).")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig, description="Shared tokenization step.")
    token_stats: TokenStatsConfig = Field(default_factory=TokenStatsConfig, description="token-stats stage.")
    chunk: ChunkConfig = Field(default_factory=ChunkConfig, description="Overlapping windows (chunk stage).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Continued pretraining (train stage).")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Before/after evaluation.")
    push: PushConfig = Field(default_factory=PushConfig, description="Saving and uploading the model.")
    drops: DropsConfig = Field(default_factory=DropsConfig, description="Gate for corpus drops (cpt retrain).")
    replay: ReplayConfig = Field(default_factory=ReplayConfig, description="General text replayed in training.")
    gate: GateConfig = Field(default_factory=GateConfig, description="Promotion gate before push.")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Where the per-file pieces run.")

    @model_validator(mode="after")
    def _gate_tasks_evaluated(self) -> CptConfig:
        if self.gate.enabled and self.gate.tasks and not self.evaluate.tasks:
            raise ValueError("gate.tasks: checks tasks but evaluate.tasks is empty: nothing would be measured")
        registry = {t for t in self.evaluate.tasks if not task_path_like(t)}
        if self.evaluate.tasks and not self.evaluate.local_tasks():
            unknown = [c.task for c in self.gate.tasks if c.task not in registry]
            if unknown:
                raise ValueError(f"gate.tasks: {unknown} not in evaluate.tasks {sorted(registry)}")
        return self

    @field_validator("corpus")
    @classmethod
    def _has_paths(cls, corpus: CorpusConfig) -> CorpusConfig:
        if not corpus.paths:
            raise ValueError("paths: at least one file, glob or folder is required")
        return corpus

    @model_validator(mode="after")
    def _packed_rows_hold_a_chunk(self) -> CptConfig:
        length = self.train.packed_length
        if isinstance(length, int) and length < self.chunk.max_seq_length:
            raise ValueError(f"train.packed_length ({length}) must be at least chunk.max_seq_length "
                             f"({self.chunk.max_seq_length}): a packed row holds a whole chunk")
        return self


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if prefix:
            key = f"{prefix}.{key}" if key != "<root>" else prefix
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{key}: {msg}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.field=value` with the value parsed as YAML (`[a, b]`, `3`, `true`, `null`)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.field=value")
    dotted, raw = item.split("=", 1)
    keys = [k.strip() for k in dotted.strip().split(".")]
    if not all(keys):
        raise ConfigError(f"--set {item!r}: empty key in {dotted!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {dotted}: value is not valid YAML: {e}") from None
    return keys, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for i, k in enumerate(keys[:-1]):
            child = node.setdefault(k, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(keys[: i + 1])}: is a value, cannot set {'.'.join(keys)}")
            node = child
        node[keys[-1]] = value
    return data


def validate_config(data: dict[str, Any], source: str = "config") -> CptConfig:
    try:
        return CptConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}:\n{format_validation_error(e)}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> CptConfig:
    """YAML file (optional) + `--set` overrides → validated config. Relative corpus paths and a local
    model dir stay as written: they are resolved against the working directory, like any CLI path."""
    data: dict[str, Any] = {}
    source = "--set"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{p}: cannot read config: {e.strerror or e}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: top level must be a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    data = apply_overrides(data, overrides or [])
    return validate_config(data, source)


def dump_config(cfg: CptConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
