"""Golden digests: each data stage's output on a fixed fixture, recorded with the stage's explicit version.

A stage's cache key carries its explicit version (`@stage(..., version=N)`), the code it reaches (read from the
code, tasks/core/keys.py) and its libraries' versions. A change that reaches the output through what the key
does not see (a library's behaviour, a data file) would serve stale output on a rerun. This test catches that: when a stage's output on the
fixture changes while its version does not, it fails and asks for the bump. After a deliberate change:

    CPT_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

Train and evaluate are left out: their floating-point results vary with the CPU and thread count, so a digest
of them would fail on another machine without any code change. Their keys still carry their versions.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
from pathlib import Path

import pytest

from tasks.core.keys import stage_version
from tasks.core.manifest import StageOutput, combine_digests, read_manifest

GOLDEN = Path(__file__).parent / "golden" / "stage_outputs.json"
LIBRARIES = ["tokenizers", "transformers", "numpy", "pyarrow", "datasets"]

DOCS = [
    "질문: 고혈압 환자는 하루에 소금을 얼마나 먹어도 되나요?\n답변: 하루 나트륨 섭취를 2,000mg 이하로 줄이는 것이 좋습니다.",
    "당뇨병 환자는 식후 혈당을 자주 확인하고, 규칙적으로 운동하며 정제된 탄수화물을 줄여야 합니다.",
    "감기에 걸렸을 때는 충분히 쉬고 물을 많이 마시는 것이 도움이 됩니다. 열이 사흘 넘게 계속되면 진료를 받으세요.",
    "Aspirin lowers the risk of a second heart attack, but it is not for everyone: ask your doctor first.",
    "수면 무호흡증은 코골이와 낮 졸림을 일으키며, 체중 감량과 양압기 치료로 좋아질 수 있습니다. " * 6,
    "골다공증 예방에는 칼슘과 비타민 D, 그리고 체중을 싣는 운동이 중요합니다.",
    "당뇨병 환자는 식후 혈당을 자주 확인하고, 규칙적으로 운동하며 정제된 탄수화물을 줄여야 합니다.",  # a duplicate
    "",  # empty: skipped by load
    "편두통이 자주 오면 두통 일기를 쓰고, 유발 요인(수면 부족, 카페인, 스트레스)을 찾아 피하세요.",
    "빈혈이 있으면 철분이 많은 음식(붉은 고기, 시금치, 콩)을 먹고 원인을 검사받아야 합니다. " * 4,
]
REPLAY = ["The quick brown fox jumps over the lazy dog. " * 5, "General text keeps the model's old knowledge."]


def output_digest(out: StageOutput, artifacts: Path) -> str:
    """The content of an entry and of the entries it refers to; images (the plotting library's bytes) and
    datasets' state.json (its fingerprint is the key) left out."""
    parts = []
    # The entries it refers to in an order of their content, not of their keys: a key holds the code version, so a
    # change of code that changes no output reorders keys but not contents.
    deps = sorted(out.deps, key=lambda rel: read_manifest(artifacts / rel).content)
    for rel in [out.path, *deps]:
        manifest = read_manifest(artifacts / rel)
        for name, digest in sorted(manifest.digests.items()):
            if name == "docs.arrow" and out.stage == "load":
                digest = without_provenance(artifacts / rel / name)
            if not name.endswith((".png", "state.json")):
                parts.append((name, digest))
    parts.append(("counts", json.dumps({k: v for k, v in out.counts.items() if not k.startswith("files_")},
                                       sort_keys=True)))
    return combine_digests(parts)


def without_provenance(path: Path) -> str:
    """The assembled documents less their `source` column (file path:line, which moves with the fixture's
    temp dir; the load stage's `content` leaves it out for the same reason)."""
    import hashlib

    from tasks.data.arrow import read_arrow

    table = read_arrow(path)
    table = table.drop_columns([c for c in ("source",) if c in table.column_names])
    h = hashlib.blake2b(digest_size=16)
    for column in table.column_names:
        h.update(column.encode())
        h.update(json.dumps(table.column(column).to_pylist(), ensure_ascii=False).encode())
    return h.hexdigest()


def run_data_stages(tmp_path: Path) -> dict[str, StageOutput]:
    from helpers import write_jsonl
    from tasks.chunk import chunk
    from tasks.core.config.data import ChunkConfig, CorpusConfig, ReplayConfig, ShuffleConfig, SplitConfig
    from tasks.core.config.model import ModelConfig
    from tasks.core.config.data import TokenStatsConfig, TokenizeConfig
    from tasks.data.files import fingerprint_corpus
    from tasks.load import load
    from tasks.mix import mix
    from tasks.shuffle import shuffle
    from tasks.ml.tiny_model import train_tokenizer
    from tasks.token_stats import token_stats
    from tasks.tokenize import resolve_tokenizer, tokenize

    artifacts = str(tmp_path / "artifacts")
    corpus_file = write_jsonl(tmp_path / "corpus" / "a.jsonl", [{"content": t} for t in DOCS])
    replay_file = write_jsonl(tmp_path / "replay" / "r.jsonl", [{"content": t} for t in REPLAY])
    tok_dir = tmp_path / "tokenizer"
    train_tokenizer(DOCS + REPLAY, vocab_size=320).save_pretrained(tok_dir)
    (tok_dir / "config.json").write_text("{}")
    tokenizer = resolve_tokenizer(ModelConfig(id=str(tok_dir)))
    chunk_cfg = ChunkConfig(max_seq_length=24, overlap=6)
    outs = {}

    def data(corpus_path: Path, split_cfg: SplitConfig, prefix: str):
        # Near-dedup off: these digests are the outputs a line had before it (issue: off gives today's outputs);
        # tests/test_near_dedup.py covers it on.
        corpus = CorpusConfig(paths=[str(corpus_path)], near_dedup={"enabled": False})
        sources = fingerprint_corpus(corpus)
        docs = load.fn(corpus=corpus, sources=sources, files=[i["path"] for i in sources.items], artifacts=artifacts)
        split = shuffle.fn(shuffle=ShuffleConfig(), split=split_cfg, docs=docs, artifacts=artifacts)
        tokens = tokenize.fn(tokenize=TokenizeConfig(), tokenizer=tokenizer, docs=docs, artifacts=artifacts)
        chunks = chunk.fn(chunk=chunk_cfg, tokens=tokens, split=split, artifacts=artifacts)
        outs.update({f"{prefix}load": docs, f"{prefix}shuffle": split, f"{prefix}tokenize": tokens,
                     f"{prefix}chunk": chunks})
        return tokens, split, chunks

    tokens, split, chunks = data(corpus_file, SplitConfig(validation_fraction=0.2), "")
    outs["token-stats"] = token_stats.fn(token_stats=TokenStatsConfig(), chunk=chunk_cfg, tokens=tokens, split=split,
                                         artifacts=artifacts)
    *_, replay_chunks = data(replay_file, SplitConfig(validation_fraction=0.0), "replay-")
    outs["mix"] = mix.fn(replay=ReplayConfig(paths=[str(replay_file)], fraction=0.25), shuffle=ShuffleConfig(),
                         chunks=chunks, replay_chunks=replay_chunks, artifacts=artifacts)
    order = ["load", "shuffle", "tokenize", "token-stats", "chunk", "mix"]
    return {k: outs[k] for k in order}


def test_a_stage_whose_output_changes_bumps_its_version(tmp_path):
    artifacts = tmp_path / "artifacts"
    outs = run_data_stages(tmp_path)
    libraries = {lib: importlib.metadata.version(lib) for lib in LIBRARIES}
    current = {stage: {"version": stage_version(stage), "digest": output_digest(out, artifacts)}
               for stage, out in outs.items()}
    if os.environ.get("CPT_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps({"libraries": libraries, "stages": current}, indent=2, sort_keys=True) + "\n")
        return
    golden = json.loads(GOLDEN.read_text())
    if golden["libraries"] != libraries:
        pytest.skip(f"golden digests were recorded with {golden['libraries']}, this environment has {libraries}: "
                    "the keys differ anyway (libraries are part of them); rerun with CPT_UPDATE_GOLDEN=1")
    problems, changed = [], None
    for stage, now in current.items():  # pipeline order: a change shows in every stage below it too
        then = golden["stages"].get(stage)
        if then is None or then["version"] != now["version"]:
            problems.append(f"{stage}: version {now['version']}, golden has "
                            f"{then and then['version']}: record it with CPT_UPDATE_GOLDEN=1")
        elif then["digest"] != now["digest"] and changed is not None:
            problems.append(f"{stage}: its output changed too (it reads {changed}'s; recheck after that one)")
        elif then["digest"] != now["digest"]:
            changed = stage
            problems.append(f"{stage}: its output on the fixture changed but its version is still {now['version']}: "
                            "bump `version` in its stage declaration (cached outputs would be served stale), then "
                            "record it with CPT_UPDATE_GOLDEN=1")
    assert not problems, "\n".join(problems)
