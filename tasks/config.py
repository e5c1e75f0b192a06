"""The one typed config tree of cpt: a section per stage.

The same `CptConfig` is the flow's parameter (Prefect renders it as a form), loads from YAML and takes
`--set section.field=value` overrides. Only pydantic and yaml are imported here so config checks are instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

STAGES = ("load", "shuffle", "tokenize", "token-stats", "chunk")


class ConfigError(ValueError):
    """A config problem, phrased with the full key path (`chunk.overlap: ...`)."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class CorpusConfig(Section):
    paths: list[str] = Field(
        default_factory=list,
        description="Files, globs or folders. Formats by extension: .jsonl, .json (array or lines), "
        ".parquet, .csv, .txt (one file is one document). Folders are read recursively.",
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

    @model_validator(mode="after")
    def _qa_fields_together(self) -> CorpusConfig:
        if (self.question_field is None) != (self.answer_field is None):
            raise ValueError("question_field and answer_field must be set together")
        if self.question_field is not None:
            for name in ("question", "answer"):
                if "{" + name + "}" not in self.template:
                    raise ValueError(f"template must contain {{{name}}}")
        return self


class ModelConfig(Section):
    id: str = Field(
        ..., description="Hub id (e.g. unsloth/gemma-3-1b-pt) or a local directory; its tokenizer is the one used."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for model and tokenizer.")
    trust_remote_code: bool = Field(False, description="Allow custom model/tokenizer code from the hub.")


class ShuffleConfig(Section):
    seed: int = Field(42, description="Seed of the document order and of the train/validation split.")


class SplitConfig(Section):
    validation_fraction: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Share of documents held out for validation, split by document before chunking "
        "(at least one document when > 0).",
    )


class TokenizeConfig(Section):
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
        # The BOS-aware bound (overlap < max_seq_length - 1 when the tokenizer adds BOS) is checked
        # once the tokenizer is known, see `tasks.chunk.window_plan`.
        if self.overlap >= self.max_seq_length:
            raise ValueError(
                f"overlap ({self.overlap}) must be smaller than max_seq_length ({self.max_seq_length})"
            )
        return self


class CptConfig(Section):
    corpus: CorpusConfig = Field(default_factory=CorpusConfig, description="What to read (load stage).")
    model: ModelConfig = Field(..., description="Base model and its tokenizer.")
    shuffle: ShuffleConfig = Field(default_factory=ShuffleConfig, description="Document order (shuffle stage).")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Train/validation split (shuffle stage).")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig, description="Shared tokenization step.")
    token_stats: TokenStatsConfig = Field(default_factory=TokenStatsConfig, description="token-stats stage.")
    chunk: ChunkConfig = Field(default_factory=ChunkConfig, description="Overlapping windows (chunk stage).")

    @field_validator("corpus")
    @classmethod
    def _has_paths(cls, corpus: CorpusConfig) -> CorpusConfig:
        if not corpus.paths:
            raise ValueError("paths: at least one file, glob or folder is required")
        return corpus


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
