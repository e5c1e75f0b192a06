"""A model that only gets better: the promotion gate, continuing from the last promoted model, the verified
release folder, replay and the lineage the card records."""

import json
import math
import random
from pathlib import Path

import pytest

from helpers import sample_texts, touched_entries, write_jsonl
from tasks.core.config.model import GateConfig
from tasks.core.config.tree import validate_config
from tasks.core.root import open_root
from tasks.gate import decide

PROMPT = "질문: 고혈압의 약물 치료는 어떻게 해야 하나요? \n답변:"


# ------------------------------------------------------------------------------------------ the rules


def test_gate_refuses_non_finite_numbers_instead_of_crashing():
    cfg = GateConfig()
    ok = {"train_loss": 2.0, "last_loss": 1.9, "best_eval_loss": 2.1}
    for new, training in [({"validation": math.nan, "general": None}, ok),
                          ({"validation": None, "general": None}, ok),  # NaN comes back from JSON as null
                          ({"validation": 10.0, "general": math.inf}, ok),
                          ({"validation": 10.0, "general": None}, {**ok, "train_loss": math.nan}),
                          ({"validation": 10.0, "general": None}, {**ok, "train_loss": None})]:
        d = decide(cfg, new, {"validation": 20.0}, {"validation": 20.0, "general": 5.0}, training, "the base model")
        assert d["promoted"] is False and d["reason"].startswith("diverged"), (new, training)


def test_gate_compares_validation_with_the_reference_and_general_with_the_base():
    cfg = GateConfig(max_general_increase=0.10)
    train = {"train_loss": 2.0}
    base = {"validation": 30.0, "general": 10.0}
    assert decide(cfg, {"validation": 19.9, "general": 10.9}, {"validation": 20.0}, base, train, "r")["promoted"]
    worse = decide(cfg, {"validation": 20.01, "general": 10.0}, {"validation": 20.0}, base, train, "r")
    assert not worse["promoted"] and "validation perplexity" in worse["reason"]
    forgot = decide(cfg, {"validation": 15.0, "general": 11.1}, {"validation": 20.0}, base, train, "r")
    assert not forgot["promoted"] and "general perplexity" in forgot["reason"]
    lenient = GateConfig(max_validation_increase=0.05)
    assert decide(lenient, {"validation": 20.9, "general": 10.0}, {"validation": 20.0}, base, train, "r")["promoted"]


def test_gate_promotes_only_a_strictly_better_model():
    train = {"train_loss": 2.0}
    base = {"validation": 30.0, "general": None}
    ref = {"validation": 20.0}

    def promoted(cfg, value):
        d = decide(cfg, {"validation": value, "general": None}, ref, base, train, "the base model")
        return d["promoted"], d["reason"]

    ok, reason = promoted(GateConfig(), 20.0)  # a tie is not an improvement
    assert not ok and reason.startswith("worse: validation perplexity 20 >= 20 (below the base model's 20"), reason
    assert promoted(GateConfig(), 19.999)[0]
    strict = GateConfig(min_improvement=0.05)  # must fall below 20 * 0.95 = 19
    assert not promoted(strict, 19.0)[0] and not promoted(strict, 19.5)[0] and promoted(strict, 18.99)[0]
    assert "5%" in promoted(strict, 19.0)[1]
    lenient = GateConfig(max_validation_increase=0.05)  # explicitly allows worse: up to 21, a tie included
    assert promoted(lenient, 20.0)[0] and promoted(lenient, 21.0)[0] and not promoted(lenient, 21.01)[0]


@pytest.mark.parametrize("cfg", [GateConfig(), GateConfig(max_validation_increase=0.05),
                                 GateConfig(min_improvement=0.01)])
@pytest.mark.parametrize("ref, shown", [({}, "missing"), ({"validation": None}, "missing"),
                                        ({"validation": math.nan}, "nan"), ({"validation": math.inf}, "inf")])
def test_gate_refuses_without_a_finite_reference(cfg, ref, shown):
    d = decide(cfg, {"validation": 1.5, "general": None}, ref, {"validation": 30.0, "general": None},
               {"train_loss": 2.0}, "the last promoted model")
    assert not d["promoted"]
    assert d["reason"] == f"no reference: the last promoted model's validation perplexity is {shown}", d["reason"]


@pytest.mark.parametrize("base_general, shown", [(None, "missing"), (math.nan, "nan"), (-math.inf, "-inf")])
def test_gate_refuses_without_a_finite_base_general_perplexity(base_general, shown):
    new, ref, train = {"validation": 10.0, "general": 5.0}, {"validation": 20.0}, {"train_loss": 2.0}
    base = {"validation": 20.0, "general": base_general}
    for general in (None, True):  # inferred from the new model's general perplexity, or told
        d = decide(GateConfig(), new, ref, base, train, "the base model", general=general)
        assert not d["promoted"] and d["reason"] == f"no reference: the base model's general perplexity is {shown}"
    # No general corpus in this run: the general check does not apply.
    assert decide(GateConfig(), {**new, "general": None}, ref, {**base, "general": None}, train, "b")["promoted"]


def test_gate_refuses_a_missing_general_perplexity_when_the_base_has_one():
    """With a general corpus, the new model's NaN general perplexity comes back from the stage's counts as null: it
    must not read as 'no general corpus'."""
    base = {"validation": 20.0, "general": 5.0}
    d = decide(GateConfig(), {"validation": 10.0, "general": None}, {"validation": 20.0}, base, {"train_loss": 2.0},
               "the base model")
    assert not d["promoted"] and d["reason"] == "diverged: general perplexity not finite"
    assert decide(GateConfig(), {"validation": 10.0, "general": None}, {"validation": 20.0}, base,
                  {"train_loss": 2.0}, "the base model", general=False)["promoted"]


def test_a_model_with_nan_weights_is_evaluated_and_refused_not_a_crash(tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.core.config.model import EvaluateConfig, GenerationConfig, ModelConfig
    from tasks.evaluate import evaluate_model

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan")
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path / "nan")
    rows = [{"input_ids": [1, 5, 6, 7, 8], "labels": [-100, 5, 6, 7, 8]}]
    cfg = EvaluateConfig(prompts=[PROMPT], generation=GenerationConfig(max_new_tokens=4))
    result = evaluate_model(str(tmp_path / "nan"), ModelConfig(id="x"), cfg, rows, rows)
    assert math.isnan(result["validation"]["perplexity"]) and isinstance(result["generations"][0], str)
    d = decide(GateConfig(), {"validation": result["validation"]["perplexity"],
                              "general": result["general"]["perplexity"]},
               {"validation": 20.0}, {"validation": 20.0, "general": 5.0}, {"train_loss": 3.0}, "the base model")
    assert not d["promoted"] and d["reason"] == "diverged: validation perplexity, general perplexity not finite"


def test_replay_draw_hits_the_share_to_the_token_and_repeats_a_small_pool():
    import numpy as np

    from tasks.mix import draw, replay_target

    labelled = np.array([7, 3, 9, 4, 12, 5])
    target = replay_target(1000, 0.25)
    assert target == 333
    rows, keep, passes = draw(labelled, target, seed=1)
    taken = labelled[rows].sum() - (labelled[rows[-1]] - keep if keep else 0)
    assert taken == target and passes > 1
    again = draw(labelled, target, seed=1)
    assert (again[0] == rows).all() and again[1:] == (keep, passes)  # seeded: the same draw


def test_the_replay_windows_are_drawn_in_blocks_and_the_last_cut_to_the_token():
    """The drawn windows are streamed a block at a time (a block boundary must not change them), refer to the
    replay's token pieces after the domain's, and the last one is cut to the shortest prefix holding the
    labelled tokens still needed."""
    import numpy as np
    import pyarrow as pa

    from tasks.data.windows import window_batch, window_plan
    from tasks.core.config.data import ChunkConfig
    from tasks.mix import drawn_windows, labelled_per_window

    lengths = np.array([30, 7, 19, 4, 25])
    pool = pa.Table.from_batches([window_batch(pa.array([f"d{i}" for i in range(5)]), lengths, np.arange(5),
                                               window_plan(ChunkConfig(max_seq_length=8, overlap=3), True))])
    rows = np.array([4, 0, 2, 7, 1, 3, 3])
    got = pa.concat_tables(list(drawn_windows(pool, rows, 2, 1, part_offset=3, batch_rows=3))).to_pylist()
    whole = pool.take(pa.array(rows)).to_pylist()
    assert [r["part"] for r in got] == [3] * len(rows)
    strip = [{k: v for k, v in r.items() if k != "part"} for r in got]
    assert strip[:-1] == [{k: v for k, v in r.items() if k != "part"} for r in whole[:-1]]
    last = whole[-1]
    assert got[-1]["length"] == last["trained_from"] + 2 - 1 and got[-1]["start"] == last["start"]
    assert labelled_per_window(pa.Table.from_pylist(got[-1:]), 1).tolist() == [2]


# ------------------------------------------------------------------------------------------ the flow

@pytest.fixture
def config(tmp_path, tiny_model):
    write_jsonl(tmp_path / "corpus" / "corpus.jsonl", [{"content": t} for t in sample_texts()])
    return {
        "corpus": {"paths": [str(tmp_path / "corpus")]},
        "model": {"id": str(tiny_model)},
        "split": {"validation_fraction": 0.1},
        "chunk": {"max_seq_length": 96, "overlap": 16},
        "train": {"max_steps": 12, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                  "learning_rate": 3e-3, "warmup_ratio": 0.0, "logging_steps": 1, "eval_steps": 6,
                  "save_steps": 6, "early_stopping_patience": None},
        "evaluate": {"max_eval_rows": 32},
        "push": {"name": "promoted-test"},
    }


def run(config, artifacts, **sections):
    from flows.continued_pretraining import continued_pretraining

    cfg = json.loads(json.dumps(config))
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    summary = continued_pretraining(config=validate_config(cfg), artifacts=str(artifacts))
    return {s["name"]: s["state"] for s in summary["stages"]}, {s["name"]: s for s in summary["stages"]}, summary


def wait_for_log(flow_run: str, prefix: str, seconds: float = 20.0) -> bool:
    """Prefect ships log lines in the background: poll until the line is there."""
    import time

    from helpers import flow_run_logs

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if any(m.startswith(prefix) for m in flow_run_logs(flow_run)):
            return True
        time.sleep(0.5)
    return False


def tree_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_a_diverged_model_is_refused_and_leaves_the_release_and_the_hub_untouched(config, artifacts, monkeypatch):
    from fake_hub import FakeHub, online

    from helpers import flow_run_artifacts

    push = {"repo_id": "me/line", "name": "promoted-test"}
    release = artifacts / "models" / "promoted-test"
    with FakeHub(user="me") as hub:
        online(monkeypatch, hub.url)
        monkeypatch.setenv("HF_TOKEN", "hf_test_token_for_the_gate_test")
        states, stages, _ = run(config, artifacts, push=push)
        assert states["gate"] == "Completed" and stages["gate"]["counts"]["promoted"] is True
        assert states["push"] == "Completed" and len(hub.commits) == 1
        assert hub.commits[0]["message"].startswith("cpt: promote model ")
        before, commits = tree_bytes(release), list(hub.commits)

        # An absurd learning rate: the loss explodes.
        states, stages, summary = run(config, artifacts, push=push, train={"learning_rate": 1e4})
        g = stages["gate"]["counts"]
        assert states["train"] == "Completed" and states["gate"] == "Completed" and states["push"] == "Skipped"
        assert g["promoted"] is False and g["reference"] == "promoted" and summary["status"] == "Completed"
        assert summary["gate"]["promoted"] is False and summary["gate"]["reason"] == g["reason"]
        assert g["reason"].startswith(("diverged", "worse"))
        assert tree_bytes(release) == before and hub.commits == commits
        arts = {a.key: a.data for a in flow_run_artifacts(summary["flow_run"]) if a.type == "markdown"}
        assert arts["gate"].startswith("# Promotion gate: refused") and g["reason"] in arts["gate"]
        assert wait_for_log(summary["flow_run"], "gate: refused, not pushed:")

        # gate.enabled: false is the old behaviour: whatever trained is pushed.
        states, _, summary = run(config, artifacts, push=push, train={"learning_rate": 1e4}, gate={"enabled": False})
        assert "gate" not in states and states["push"] == "Completed" and len(hub.commits) == 2
        assert "promotion gate disabled" in hub.commits[1]["message"]
        assert tree_bytes(release) != before


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_last_promoted_continues_from_the_promoted_weights_and_the_release_is_kept_whole(config, artifacts):
    from tasks.core.root import open_root
    from tasks.ml.modeling import model_digest
    from tasks.line.promotions import read_promotions

    states, stages, _ = run(config, artifacts)
    first = stages["train"]["counts"]
    promoted_dir = Path(stages["train"]["output"]) / "model"
    release = artifacts / "models" / "promoted-test"
    assert model_digest(release) == model_digest(promoted_dir)
    record = read_promotions(open_root(artifacts), "name-promoted-test").last
    assert record.model_digest == model_digest(promoted_dir) and record.parent["kind"] == "base"

    # A deleted release folder is re-made by the next, fully cached, run; so is one whose files changed.
    import shutil

    shutil.rmtree(release)
    states, stages, cached = run(config, artifacts)
    assert set(states.values()) == {"Cached"} and stages["push"]["release_restored"] == "missing"
    # A Cached train says so, not "starting from the base model" as if it trained.
    from helpers import flow_run_logs

    assert wait_for_log(cached["flow_run"], "train: Cached (train-")
    assert not [m for m in flow_run_logs(cached["flow_run"]) if m.startswith("train: starting from")]
    assert model_digest(release) == model_digest(promoted_dir)
    (release / "model.safetensors").write_bytes(b"not the promoted weights")
    states, stages, _ = run(config, artifacts)
    assert set(states.values()) == {"Cached"} and stages["push"]["release_restored"] == "holding other model files"
    assert model_digest(release) == model_digest(promoted_dir)

    # Continue: the first step's loss is the promoted model's (far below the base model's first loss), and
    # the warmup-stable-decay schedule holds its peak, then decays.
    wsd = {"init": "last_promoted", "lr_scheduler_type": "warmup_stable_decay", "decay_ratio": 0.25,
           "learning_rate": 1e-3}
    states, stages, summary = run(config, artifacts, train=wsd)
    second = stages["train"]["counts"]
    assert states["train"] == "Completed" and summary["parent"]["kind"] == "promoted"
    # The reference evaluation (the last promoted model) logs as itself, not as evaluate-base.
    assert wait_for_log(summary["flow_run"], "evaluate-reference: validation perplexity")
    assert summary["parent"]["digest"] == record.model_digest and second["parent"].startswith("promoted ")
    assert second["first_loss"] < first["first_loss"] - 0.3, (first, second)
    assert abs(second["first_loss"] - first["last_loss"]) < abs(second["first_loss"] - first["first_loss"])
    history = json.loads((Path(stages["train"]["output"]) / "log_history.json").read_text())
    lrs = [h["learning_rate"] for h in history if "learning_rate" in h]
    assert lrs[:9] == [pytest.approx(1e-3)] * 9 and lrs[-1] < 0.5e-3  # 12 steps, the last 3 decay

    # The same data and settings again: the promoted model came from this training, so it is not stacked on
    # itself — everything is Cached.
    if stages["gate"]["counts"]["promoted"]:
        states, _, _ = run(config, artifacts, train=wsd)
        assert set(states.values()) == {"Cached"}, states


def shuffled_words(texts: list[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for t in texts:
        words = t.split()
        rng.shuffle(words)
        out.append(" ".join(words))
    return out


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_replay_mixes_its_share_of_trained_tokens_and_the_card_holds_the_lineage(config, artifacts, tmp_path):

    from flows.retrain import retrain
    from tasks.data.arrow import read_arrow
    from tasks.data.layout import INDEX_FILE

    general_texts = shuffled_words(sample_texts(), 7)
    write_jsonl(tmp_path / "replay" / "general.jsonl", [{"content": t} for t in general_texts[:150]])
    # The general evaluation corpus shares 3 documents with the replay text: contaminated, and said so.
    write_jsonl(tmp_path / "general" / "eval.jsonl", [{"content": t} for t in general_texts[147:170]])
    # New documents of the domain: two of its texts joined (no near-duplicate of either: Jaccard about a half).
    texts = sample_texts()
    drop = write_jsonl(tmp_path / "drops" / "d1" / "more.jsonl",
                       [{"content": texts[i] + "\n" + texts[i + 40]} for i in range(40)])
    config = {**config, "replay": {"paths": [str(tmp_path / "replay")], "fraction": 0.25},
              "evaluate": {"max_eval_rows": 32, "general_corpus": [str(tmp_path / "general")]},
              "gate": {"max_general_increase": 10.0}}
    result = retrain(config=validate_config(config), drop=str(drop.parent), line="night", settle_seconds=0,
                     artifacts=str(artifacts))
    summary = result["pipeline"]
    stages = {s["name"]: s for s in summary["stages"]}
    assert [s for s in stages if s.startswith("replay-")] == ["replay-load", "replay-shuffle", "replay-tokenize",
                                                              "replay-chunk"]
    assert any("3 of the 23 documents of evaluate.general_corpus are also in replay.paths" in w
               for w in summary["warnings"])

    # The share, counted independently from the mixed training set the trainer read.
    t = stages["train"]["counts"]
    from tasks.chunk import Chunks
    from tasks.core.manifest import read_manifest
    from tasks.core.root import open_root

    entry = Chunks.model_validate(read_manifest(Path(stages["mix"]["output"])).model_dump())
    mixed = {split: [r for b in entry.row_batches(open_root(artifacts), split) for r in b.to_pylist()]
             for split in ("train", "validation")}
    replay_ids = set(read_arrow(Path(stages["replay-load"]["output"]) / INDEX_FILE).column("doc_id").to_pylist())
    counted = {"replay": 0, "domain": 0}
    for row in mixed["train"]:
        trained = len(row["input_ids"]) - row["trained_from"]
        counted["replay" if row["doc_id"] in replay_ids else "domain"] += trained
    share = counted["replay"] / (counted["replay"] + counted["domain"])
    assert abs(share - 0.25) <= 0.01 and t["replay_share"] == pytest.approx(share)
    assert t["replay_trained_tokens"] == counted["replay"] and t["domain_trained_tokens"] == counted["domain"]
    assert len(mixed["validation"]) == stages["chunk"]["counts"]["validation_chunks"]  # validation: domain only
    assert not {r["doc_id"] for r in mixed["validation"]} & replay_ids
    assert not touched_entries(artifacts)  # the trainer read the mix entry without writing into it

    # The card: base, parent, corpus and drop fingerprints, replay, evaluation table, gate decision.
    assert result["promoted"] is True
    card = (artifacts / "models" / "promoted-test" / "README.md").read_text()
    from tasks.line.lines import read_line

    d = read_line(open_root(artifacts), "night").drops[0]
    assert f"| base model | `{config['model']['id']}` (digest `" in card
    assert "| parent model | the base model |" in card
    assert f"| corpus fingerprint | `{result['fingerprint']}` |" in card
    assert f"| drop | `{d.path}` (fingerprint `{d.fingerprint[:32]}`) |" in card
    assert "| replay fraction | 0.25 of training tokens from" in card
    assert "| perplexity | base model | gate reference | this model |" in card and "| general |" in card
    assert "| gate decision | promoted against the base model: validation perplexity" in card
