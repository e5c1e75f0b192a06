"""The one typed config tree of cpt, `CptConfig`: a section per stage.

The same `CptConfig` is the flow's parameter (Prefect renders it as a form), loads from YAML and takes
`--set section.field=value` overrides. Only pydantic and yaml are imported here so config checks are instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from tasks.core.config.base import ConfigError, Section
from tasks.core.config.data import (ChunkConfig, CorpusConfig, DropsConfig, ReplayConfig, RuntimeConfig,
                                    ShuffleConfig, SplitConfig, TokenizeConfig, TokenStatsConfig)
from tasks.core.config.model import EvaluateConfig, GateConfig, ModelConfig, PushConfig, TrainConfig
from tasks.core.config.task_files import task_path_like


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
    def _adapter_to_release(self) -> CptConfig:
        if self.push.adapter_only and self.train.method == "full":
            raise ValueError("push.adapter_only: train.method is full, there is no adapter to release (set "
                             "train.method: lora or qlora, or push.adapter_only: false)")
        return self

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
