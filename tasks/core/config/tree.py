"""The one typed config tree of cpt, `CptConfig`: a section per stage.

The same `CptConfig` is the flow's parameter (Prefect renders it as a form), loads from YAML and takes
`--set section.field=value` overrides. Only pydantic and yaml are imported here so config checks are instant.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from tasks.core.config.base import ConfigError, Section
from tasks.core.config.data import (ChunkConfig, CorpusConfig, DropsConfig, ReplayConfig, RuntimeConfig,
                                    ShuffleConfig, SplitConfig, TokenizeConfig, TokenStatsConfig)
from tasks.core.config.model import EvaluateConfig, GateConfig, ModelConfig, PushConfig, TrainConfig
from tasks.core.config.retention import RetentionConfig
from tasks.core.config.sources import (AnnealConfig, DataSource, SourceConfig, check_shares, configured_sources,
                                       legacy_sources)
from tasks.core.config.task_files import task_path_like


class CptConfig(Section):
    KEY_NEUTRAL = frozenset({"retention"})  # what the disk keeps, never what a stage writes
    # Before `corpus`: its check reads whether sources are given.
    sources: list[SourceConfig] = Field(
        default_factory=list, description="Named training sources, each read like `corpus` with its share of the "
        "trained tokens (weight) or its passes (epochs), its own validation set and decontamination; they replace "
        "`corpus` and `replay` (the two-source spelling, which keeps working). The first source is the domain: its "
        "stages carry the stage names, drops join it unless drops.source says otherwise."
    )
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
    anneal: AnnealConfig = Field(default_factory=AnnealConfig, description="The release branch's own mixture "
                                 "(train.schedule: stable_anneal).")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="Where the per-file pieces run.")
    retention: RetentionConfig = Field(default_factory=RetentionConfig,
                                       description="What the artifacts root keeps (cpt cache gc, docs/retention.md).")

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
    def _has_paths(cls, corpus: CorpusConfig, info: ValidationInfo) -> CorpusConfig:
        if "sources" not in info.data:  # sources failed: said there
            return corpus
        if info.data["sources"]:
            if corpus.paths:
                raise ValueError("paths: `sources` replaces corpus (the first source is the domain): move these "
                                 "paths into a source")
            return corpus
        if not corpus.paths:
            raise ValueError("paths: at least one file, glob or folder is required")
        return corpus

    @model_validator(mode="after")
    def _sources_named_and_shared(self) -> CptConfig:
        names = [s.name for s in self.sources]
        if self.sources:
            if len(set(names)) != len(names):
                raise ValueError(f"sources: a name is given twice ({names})")
            if self.replay.active:
                raise ValueError("replay: `sources` replaces replay; add the replay text as a source with its weight")
            check_shares(self.sources, names, "sources")
        known = [d.name for d in self.data_sources()]
        with_validation = [d.name for d in self.data_sources() if d.split.validation_fraction > 0]
        if self.drops.source is not None and self.drops.source not in known:
            raise ValueError(f"drops.source: {self.drops.source!r} is not one of the sources {known}")
        for i, limit in enumerate(self.gate.sources):
            if limit.source not in with_validation:
                raise ValueError(f"gate.sources[{i}]: {limit.source!r} is not a source with a validation set "
                                 f"({with_validation})")
        anneal = [a.name for a in self.anneal.sources]
        if anneal:
            unknown = [n for n in anneal if n not in known]
            if unknown or len(set(anneal)) != len(anneal):
                raise ValueError(f"anneal.sources: {unknown or anneal} must name each of the sources {known} at "
                                 "most once")
            check_shares(self.anneal.sources, anneal, "anneal.sources")
            if self.train.schedule != "stable_anneal" or self.train.anneal != "decay":
                raise ValueError("anneal.sources: the decay branch's mixture needs train.schedule: stable_anneal "
                                 "with train.anneal: decay")
        return self

    def data_sources(self) -> list[DataSource]:
        """The sources the flow runs, in order: `sources`, or `corpus` (+ `replay` when active)."""
        if self.sources:
            return configured_sources(self.sources, self.split, self.shuffle)
        return legacy_sources(self.corpus, self.replay, self.split, self.shuffle)

    @property
    def drop_source(self) -> str:
        """The source a line's drops join."""
        return self.drops.source or self.data_sources()[0].name

    @property
    def drop_corpus(self) -> CorpusConfig:
        """How a line's drops are read: the corpus settings of the source they join."""
        return next(d.corpus for d in self.data_sources() if d.name == self.drop_source)

    def with_drop_corpus(self, corpus: CorpusConfig) -> CptConfig:
        """This config with the drops' source reading `corpus` (its paths with the line's drops, less the others)."""
        if not self.sources:
            return self.model_copy(update={"corpus": corpus})
        sources = [s.model_copy(update={"paths": corpus.paths, "exclude": corpus.exclude})
                   if s.name == self.drop_source else s for s in self.sources]
        return self.model_copy(update={"sources": sources})

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


def _section_of(model: type, key: str) -> type | None:
    """The Section class a field of `model` holds (through `X | None`), or None for a plain value."""
    import typing

    field = model.model_fields.get(key)
    if field is None:
        return None
    for t in (field.annotation, *typing.get_args(field.annotation)):
        if isinstance(t, type) and issubclass(t, Section):
            return t
    return None


def known_keys(model: type = CptConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the config tree (sections and their fields), for "did you mean"."""
    out = []
    for name in model.model_fields:
        dotted = f"{prefix}{name}"
        out.append(dotted)
        sub = _section_of(model, name)
        if sub is not None:
            out += known_keys(sub, f"{dotted}.")
    return out


def closest_key(dotted: str) -> str | None:
    """The known key a mistyped one most likely meant: the same depth, spelled alike (`chunk.max_seq_lenght` ->
    `chunk.max_seq_length`; `train.max_seq_length` -> `chunk.max_seq_length`)."""
    import difflib

    depth = dotted.count(".")
    same_depth = [k for k in known_keys() if k.count(".") == depth]
    found = difflib.get_close_matches(dotted, same_depth, n=1, cutoff=0.6)
    if not found and depth:  # the field right, the section wrong: match the last part alone
        last = dotted.rsplit(".", 1)[1]
        by_last = {k.rsplit(".", 1)[1]: k for k in same_depth}
        found = [by_last[m] for m in difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.8)]
    return found[0] if found else None


def format_validation_error(err: ValidationError, prefix: str = "",
                            origin: Callable[[str], str | None] | None = None) -> str:
    """One line per problem, with the full key; `origin(key)` says where a key was given (`--set ...` or the file),
    and an unknown key gets the closest known one."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if prefix:
            key = f"{prefix}.{key}" if key != "<root>" else prefix
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            where = origin(key) if origin else None
            if where:
                msg += f" (given {where})"
            close = closest_key(key)
            if close:
                msg += f"; did you mean {close}?"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif origin and (where := origin(key)) and where.startswith("by --set"):
            msg += f" (given {where})"
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


def validate_config(data: dict[str, Any], source: str = "config",
                    origin: Callable[[str], str | None] | None = None) -> CptConfig:
    try:
        return CptConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}:\n{format_validation_error(e, origin=origin)}") from None


def _origin(path: str | None, overrides: list[str]) -> Callable[[str], str | None]:
    """Where a dotted key was given: the last `--set` that names it (or a key under it), else the file."""
    given = []
    for item in overrides:
        keys, _ = parse_override(item)
        given.append((".".join(keys), item))

    def origin(key: str) -> str | None:
        for dotted, item in reversed(given):
            if dotted == key or dotted.startswith(key + "."):
                return f"by --set {item}"
        return f"in {path}" if path else None

    return origin


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
    if path is not None and overrides:
        source = f"{path} with --set"
    return validate_config(data, source, _origin(str(path) if path is not None else None, overrides or []))


def dump_config(cfg: CptConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
