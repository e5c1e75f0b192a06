"""The data stages' sections: what is read (corpus, near-dedup, drops), how documents are split, shuffled,
decontaminated, tokenized and chunked, replay, and where per-file pieces run."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ByteSize, Field, model_validator

from tasks.core.config.base import Section, seed_field


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
        ".parquet, .csv, .txt (one file is one document, or one per paragraph: txt_split). Folders are read "
        "recursively.",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Files, globs or folders whose files are never read, even when under `paths` (a retraining "
        "line uses it for drops it rejected or retired).",
    )
    text_field: str = Field("content", description="Field holding the document text (.jsonl, .json, .csv, "
                            ".parquet); a record without it is a reject that lists the fields it has.")
    txt_split: Literal["document", "paragraph"] = Field(
        "document", description="What a .txt file becomes: one document (document), or one document per paragraph, "
        "the text between blank lines (paragraph: a book or a report kept as one .txt file per chapter)."
    )
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
        if self.txt_split == "document":
            out.pop("txt_split")  # the default: the keys outputs had before the setting existed
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

    # Which drops join a line is keyed by the corpus's content: the limits below shape no output of their own.
    KEY_NEUTRAL = frozenset({"max_files", "max_bytes", "max_depth", "max_pending_hours"})

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
    max_files: int = Field(
        100_000, ge=1, description="Most corpus files a drop may hold: a drop over it is rejected before any of "
        "it is read (counting stops at the limit)."
    )
    max_bytes: ByteSize = Field(
        100 * 2**30, description="Most bytes a drop's corpus files may hold on disk (e.g. 100GiB): a drop over it "
        "is rejected before any of it is read."
    )
    max_depth: int = Field(
        32, ge=1, description="Most levels of folders inside a drop: a deeper tree is rejected before any of it "
        "is read (the walk stops at the limit)."
    )
    max_pending_hours: float = Field(
        24.0, gt=0, description="A drop still being written (a `_WRITING` marker, or files younger than the settle "
        "time) is left out of the line's runs; one still unsettled this many hours after it was announced is "
        "rejected (its producer died mid-write)."
    )
    source: str | None = Field(
        None, description="The source of `sources` a line's drops join (read and gated with its settings); null: "
        "the first source (with `corpus`, the corpus)."
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
