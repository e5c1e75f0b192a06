"""The training sources: `sources` (named, each read like `corpus`, each with a share of the trained tokens or a
number of passes), the anneal branch's own mixture, and `DataSource`, what the flow runs per source.

`corpus` + `replay` is the two-source case: `CptConfig.data_sources()` gives the same list for either spelling,
the legacy one keeping the stage calls (and so the cache keys) it always had.
"""

from __future__ import annotations

import dataclasses
import re
from pydantic import Field, model_validator

from tasks.core.config.base import Section
from tasks.core.config.data import CorpusConfig, DecontaminateConfig, ShuffleConfig, SplitConfig

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_]{0,39}$")
# Labels the flow gives its other calls: a source named so would share them (`general-load` is the load of
# evaluate.general_corpus; `anneal-mix` the anneal branch's mix).
RESERVED = frozenset({"general", "anneal", "mix", "evaluate"})


def name_problem(name: str) -> str | None:
    if not NAME.match(name):
        return "a source name is 1-40 letters, digits or '_', starting with a letter or digit"
    if name in RESERVED:
        return (f"{name!r} is reserved (the flow labels other calls with it: general-load is evaluate.general_corpus's "
                "load); call it e.g. general_ko")
    return None


class Share(Section):
    """How much of the trained tokens a source gives: a share, or a number of passes over it."""

    weight: float | None = Field(
        None, gt=0, le=1, description="Share of the trained (labelled) tokens drawn from this source. Sources with a "
        "weight share the total: with every source weighted the shares sum to 1 and the first source is read once "
        "(its tokens / its weight is the total); with some sources given in `epochs`, those take the rest (the "
        "weights sum to less than 1). Drawn seeded, exact to the token; a source smaller than its share is repeated "
        "(a fresh order per pass, counted)."
    )
    epochs: float | None = Field(
        None, gt=0, le=1000, description="Passes over this source instead of a share: 1 reads it once, 0.5 a seeded "
        "half of its tokens, 3 three passes (each in a fresh order). Exact to the token."
    )

    @model_validator(mode="after")
    def _one_of(self) -> Share:
        if (self.weight is None) == (self.epochs is None):
            raise ValueError("give each source exactly one of weight (a share of the trained tokens) or epochs "
                             "(passes over it)")
        return self


class SourceConfig(CorpusConfig, Share):
    """One named training source: read like `corpus` (paths, fields, template, exclude, dedup), its own split and
    decontamination, its share of the trained tokens."""

    KEY_NEUTRAL = CorpusConfig.KEY_NEUTRAL
    name: str = Field(..., description="The source's name: in stage labels (<name>-load, ...), the mix's counts, "
                      "evaluate's per-source perplexity, gate.sources and anneal.sources.")
    validation_fraction: float | None = Field(
        None, ge=0, lt=1, description="Share of this source's documents held out as its validation set (null: "
        "split.validation_fraction); 0: none (no perplexity is reported for it)."
    )
    decontaminate: DecontaminateConfig | None = Field(
        None, description="This source's decontamination (null: shuffle.decontaminate). Each source's training text "
        "is also kept clear of the validation splits of the sources listed before it."
    )
    eval_weight: float | None = Field(
        None, ge=0, description="Its weight in the validation loss that early stopping and the best checkpoint use "
        "(NeMo AutoModel's objective weight); null: the share of the trained tokens it actually got. Normalised over "
        "the sources that have a validation set."
    )

    @model_validator(mode="after")
    def _named(self) -> SourceConfig:
        why = name_problem(self.name)
        if why:
            raise ValueError(f"name {self.name!r}: {why}")
        return self

    def corpus(self) -> CorpusConfig:
        """How its files are read: a plain corpus section (the load stage's input, keyed as any corpus)."""
        return CorpusConfig(**{k: getattr(self, k) for k in CorpusConfig.model_fields})


class AnnealShare(Share):
    name: str = Field(..., description="A source of `sources` (or corpus / replay for the two-source spelling).")


class AnnealConfig(Section):
    """The decay branch's own mixture (train.schedule: stable_anneal with train.anneal: decay)."""

    sources: list[AnnealShare] = Field(
        default_factory=list, description="Shares of the decay branch's trained tokens, by source name, read like "
        "sources' weight/epochs (e.g. more of the domain's best text for the release); empty: the run's own mixture."
    )


class MixShare(Share):
    """A source's place in the mix stage's key: its name (its draw's seed) and its share, not how it is read."""

    name: str


@dataclasses.dataclass(frozen=True)
class DataSource:
    """What the flow runs for one source: `label` None for the first (its stages carry the pipeline's names), else
    the prefix of its calls' labels (`replay` -> replay-load, replay-shuffle, ...)."""

    name: str
    corpus: CorpusConfig
    split: SplitConfig
    shuffle: ShuffleConfig
    share: MixShare
    label: str | None
    eval_weight: float | None = None

    def stage_label(self, stage: str) -> str | None:
        return None if self.label is None else f"{self.label}-{stage}"


def legacy_sources(corpus: CorpusConfig, replay, split: SplitConfig, shuffle: ShuffleConfig) -> list[DataSource]:
    """`corpus` + `replay`: the corpus read once, the replay text at replay.fraction of the trained tokens, with no
    validation set of its own (as the flow always ran them)."""
    out = [DataSource("corpus", corpus, split, shuffle, MixShare(name="corpus", epochs=1.0), None)]
    if replay.active:
        out.append(DataSource("replay", replay.corpus(corpus), SplitConfig(validation_fraction=0.0), shuffle,
                              MixShare(name="replay", weight=replay.fraction), "replay"))
    return out


def configured_sources(sources: list[SourceConfig], split: SplitConfig, shuffle: ShuffleConfig) -> list[DataSource]:
    out = []
    for i, s in enumerate(sources):
        fraction = split.validation_fraction if s.validation_fraction is None else s.validation_fraction
        own = shuffle if s.decontaminate is None else shuffle.model_copy(update={"decontaminate": s.decontaminate})
        out.append(DataSource(s.name, s.corpus(), SplitConfig(validation_fraction=fraction), own,
                              MixShare(name=s.name, weight=s.weight, epochs=s.epochs), None if i == 0 else s.name,
                              s.eval_weight))
    return out


def check_shares(shares: list[Share], names: list[str], where: str) -> None:
    """Weights alone sum to 1; beside sources given in epochs they sum to less (those take the rest)."""
    weights = [s.weight for s in shares if s.weight is not None]
    total = sum(weights)
    if len(weights) == len(shares) and abs(total - 1.0) > 1e-6:
        raise ValueError(f"{where}: the weights of {names} sum to {total:.6g}; shares of the trained tokens sum to 1 "
                         "(or give some sources epochs instead)")
    if len(weights) < len(shares) and total >= 1.0:
        raise ValueError(f"{where}: the weights sum to {total:.6g}, leaving nothing for the sources given in epochs")

