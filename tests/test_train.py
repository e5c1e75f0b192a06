"""Training building blocks without Prefect: packing isolation, optimizer fallback, padding accounting."""

import pytest
import torch

from tasks.ml.train_worker import choose_optimizer, padding_fraction


def test_packed_rows_do_not_attend_across_chunks(tiny_model):
    """With packing, position ids restart per chunk and the model must not attend across chunks: each packed
    chunk's logits equal the logits of that chunk alone."""
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa").eval()
    chunks = [[1, 40, 41, 42, 43, 44], [1, 50, 51, 52], [1, 60, 61, 62, 63]]
    examples = [{"input_ids": c, "labels": [-100] + c[1:]} for c in chunks]
    packed = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(examples)
    assert packed["input_ids"].shape == (1, sum(map(len, chunks)))
    inputs = {k: v for k, v in packed.items() if k != "labels"}
    with torch.no_grad():
        # use_cache=False as in training (TRL sets it): transformers derives the per-chunk mask from
        # position ids only without a KV cache.
        together = model(**inputs, use_cache=False).logits[0]
        alone = [model(input_ids=torch.tensor([c])).logits[0] for c in chunks]
        # The same tokens concatenated without restarting positions do see each other: the check can fail.
        leaky = model(input_ids=packed["input_ids"]).logits[0]
    start = 0
    for c, ref in zip(chunks, alone):
        torch.testing.assert_close(together[start : start + len(c)], ref, atol=1e-4, rtol=1e-4)
        start += len(c)
    assert not torch.allclose(leaky[len(chunks[0]):], together[len(chunks[0]):], atol=1e-3)
    # Labels keep the chunk's own masking and never predict across a boundary.
    assert packed["labels"][0, len(chunks[0])].item() == -100


def test_eight_bit_optimizer_falls_back_off_cuda():
    assert choose_optimizer("paged_adamw_8bit", "adamw_torch", "cpu")[0] == "adamw_torch"
    assert "CUDA" in choose_optimizer("paged_adamw_8bit", "adamw_torch", "cpu")[1]
    assert choose_optimizer("adamw_torch", "sgd", "cpu") == ("adamw_torch", None)


def test_padding_fraction_counts_positions_without_tokens():
    batches = [{"input_ids": torch.ones(2, 4), "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])},
               {"input_ids": torch.ones(1, 6)}]  # a padding-free batch
    got = padding_fraction(batches)
    assert got == {"padding_fraction": pytest.approx(2 / 14), "positions": 14, "tokens": 12}


def test_attention_choice():
    from types import SimpleNamespace

    from tasks.ml.modeling import choose_attention

    assert choose_attention("auto", SimpleNamespace(model_type="gemma3_text", attn_logit_softcapping=None)) == "sdpa"
    assert choose_attention("auto", SimpleNamespace(model_type="gemma2", attn_logit_softcapping=50.0)) == "eager"
    assert choose_attention("eager", SimpleNamespace()) == "eager"


def test_launch_command_per_device_and_distributed_setup(tmp_path):
    from tasks.train import launch_command

    spec = tmp_path / "spec.json"
    cpu = launch_command(spec, 1, "cpu")
    assert "--cpu" in cpu and cpu[-3:] == ["-m", "tasks.ml.train_worker", str(spec)]
    ddp = launch_command(spec, 4, "cuda")
    assert "--multi_gpu" in ddp and ddp[ddp.index("--num_processes") + 1] == "4"
    fsdp = launch_command(spec, 8, "cuda", "fsdp.yaml")
    assert fsdp[fsdp.index("--config_file") + 1] == "fsdp.yaml" and "--multi_gpu" not in fsdp


def test_resume_skips_and_removes_checkpoints_cut_short(tmp_path):
    """A checkpoint is complete when its seal (the manifest written once every rank finished it) is there and its
    files match: one without a seal was cut short and is removed, as is a newer one whose files changed."""
    from tasks.ml.checkpoints import last_complete_checkpoint, seal_checkpoint

    assert last_complete_checkpoint(tmp_path / "none") is None
    for step, sealed in ((4, True), (6, False), (8, True)):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"x")
        (d / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
        if sealed:
            seal_checkpoint(d)
    (tmp_path / "checkpoint-8" / "model.safetensors").write_bytes(b"y")  # same size, other bytes
    warned = []
    assert last_complete_checkpoint(tmp_path, warn=warned.append) == tmp_path / "checkpoint-4"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["checkpoint-4"]
    assert len(warned) == 1 and "checkpoint-8" in warned[0] and "model.safetensors" in warned[0]


def test_gradient_checkpointing_is_kept_on_a_gpu_and_turned_off_on_cpu():
    from tasks.ml.train_worker import activation_checkpointing

    assert activation_checkpointing(True, "cuda") == (True, None)
    assert activation_checkpointing(False, "cpu") == (False, None)
    on, why = activation_checkpointing(True, "cpu")
    assert on is False and "off on CPU" in why


def test_packed_padding_is_the_unfilled_room_of_the_packed_rows():
    from datasets import Dataset

    from tasks.ml.train_worker import packed_padding_fraction

    packed = Dataset.from_dict({"input_ids": [[1] * 48, [1] * 30, [1] * 20]})
    assert packed_padding_fraction(packed, 48) == {"padding_fraction": pytest.approx(46 / 144), "positions": 144,
                                                   "tokens": 98}


def test_the_trainer_loss_on_a_packed_batch_is_the_token_weighted_mean_of_each_chunk_alone(tiny_model, tmp_path):
    """Real chunk rows (overlap labelled -100) through SFTTrainer's own packing and dataloader: the loss it
    computes on a packed batch equals the per-chunk losses computed alone with each chunk's labels, weighted by
    their labelled tokens. Fails if packing dropped the overlap mask, or if chunks saw each other."""
    import pyarrow as pa
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from helpers import sample_texts
    from tasks.data.arrow import with_labels
    from tasks.data.windows import chunk_batch, window_plan
    from tasks.core.config.data import ChunkConfig

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in sample_texts(6)]
    table = chunk_batch(pa.array([str(i) for i in range(len(ids))]), pa.array(ids, pa.list_(pa.int32())),
                        window_plan(ChunkConfig(max_seq_length=48, overlap=16), tok.bos_token_id is not None),
                        tok.bos_token_id)
    rows = with_labels(table).to_pylist()
    masked = [r for r in rows if r["labels"][1] == -100]  # windows after a document's first: overlap masked
    assert masked and len(masked) < len(rows)

    model = AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="sdpa")
    args = SFTConfig(output_dir=str(tmp_path), max_length=48, packing=True, packing_strategy="bfd", padding_free=True,
                     per_device_train_batch_size=4, use_cpu=True, report_to=[], bf16=False, seed=0,
                     activation_checkpointing=False, gradient_checkpointing=None)
    trainer = SFTTrainer(model=model, args=args, processing_class=tok, train_dataset=Dataset.from_list(rows))
    batch = next(iter(trainer.get_train_dataloader()))
    model.eval()
    with torch.no_grad():
        packed_loss = float(trainer.compute_loss(model, batch))
        flat, positions = batch["input_ids"][0].tolist(), batch["position_ids"][0].tolist()
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        assert len(starts) > 2  # several chunks in the batch
        weighted, labelled, saw_masked = 0.0, 0, False
        for a, b in zip(starts[:-1], starts[1:]):
            own = next(r for r in rows if r["input_ids"] == flat[a:b])
            saw_masked |= own in masked
            n = sum(label != -100 for label in own["labels"][1:])
            loss = model(input_ids=torch.tensor([own["input_ids"]]), labels=torch.tensor([own["labels"]])).loss
            weighted += float(loss) * n
            labelled += n
    assert saw_masked
    assert packed_loss == pytest.approx(weighted / labelled, rel=1e-5)


def test_step_clock_times_only_clean_steps_and_counts_trained_tokens_after_the_shift():
    """The throughput window: warm-up steps and steps with a save or evaluation are left out; evaluation
    forwards are not counted; a trained token is a label != -100 after the causal shift."""
    from tasks.ml.clock import StepClock

    clock = StepClock(warmup=1)
    module = torch.nn.Linear(1, 1)
    ids = torch.ones(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = torch.tensor([[5, 5, -100, 5], [5, 5, -100, -100]])  # after the shift: 2 + 1 targets

    def step(n, dirty=False, eval_forward=False):
        if eval_forward:
            module.eval()
            clock.hook(module, (), {"input_ids": ids, "attention_mask": mask, "labels": labels})
            module.train()
        clock.hook(module, (), {"input_ids": ids, "attention_mask": mask, "labels": labels})
        clock.dirty = dirty
        clock.step_end(n, first_step=1)

    step(1)  # warm-up: not timed
    step(2)  # timed
    step(3, dirty=True)  # a checkpoint was saved in this interval: not timed
    step(4, eval_forward=True)  # timed; the evaluation forward is not a training token
    m = clock.metrics()
    assert m["timed_steps"] == 2
    assert (m["timed_positions"], m["timed_tokens"], m["timed_trained_tokens"]) == (16, 12, 6)
    assert m["batch_padding_fraction"] == pytest.approx(4 / 16)
    assert m["trained_tokens_per_second"] == pytest.approx(6 / m["timed_seconds"])


@pytest.mark.slow  # training children
def test_gpu_check_smoke_on_cpu(tmp_path):
    """`python -m bench.gpu_check`'s whole path on a tiny Gemma 3, run as a user runs it (from the repository
    root): the seed's chunker and settings against cpt's packing, each through the train stage's child. The seed
    pads its short rows and trains every label (overlap twice); cpt's packed rows carry no padding and leave BOS
    and the masked overlap untrained."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    steps = 5
    done = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--shape", "tiny", "--steps", str(steps),
                           "--settings", "seed,cpt-sdpa", "--out", str(tmp_path)],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads((tmp_path / "results.json").read_text())["settings"]
    seed, cpt = r["seed"], r["cpt-sdpa"]
    assert "error" not in seed and "error" not in cpt, (seed.get("log"), cpt.get("log"))
    for row in (seed, cpt):
        assert row["timed_steps"] == steps - 2  # two warm-up steps; no save or evaluation inside the run
        assert 0 < row["trained_tokens_per_second"] <= row["tokens_per_second"]
    assert seed["batch_padding"] > 0.1
    assert seed["trained_tokens_per_second"] / seed["tokens_per_second"] > 0.99
    assert cpt["batch_padding"] == 0.0 and cpt["row_padding"] < 0.05
    assert cpt["trained_tokens_per_second"] / cpt["tokens_per_second"] < 0.95
    assert cpt["vs_seed_trained"] == pytest.approx(cpt["trained_tokens_per_second"] / seed["trained_tokens_per_second"])


def _chunks_dir(tiny_model, out):
    """A chunk-stage DatasetDict of the sample corpus (train only), built with the stage's functions."""
    import numpy as np
    import pyarrow as pa

    from helpers import sample_texts
    from tasks.chunk import SHARD, chunk_rows, write_dataset_dict
    from tasks.data.windows import window_plan
    from tasks.core.config.data import ChunkConfig
    from tasks.tokenize import encode_batch, load_tokenizer, special_tokens

    tok = load_tokenizer(tiny_model)
    sp = special_tokens(tok)
    texts = sample_texts(60)
    tokens = pa.table({"doc_id": [str(i) for i in range(len(texts))], "input_ids": encode_batch(tok, texts, sp["eos_id"])})
    for split, rows in (("train", np.arange(len(texts))), ("validation", np.arange(0))):
        (out / split).mkdir(parents=True)
        chunk_rows(tokens, rows, window_plan(ChunkConfig(max_seq_length=48, overlap=8), sp["bos_id"] is not None),
                   sp["bos_id"], out / split / SHARD)
    write_dataset_dict(out, {"train": [SHARD], "validation": [SHARD]}, "ddp-test")
    return out


def _train(tiny_model, chunks, out, processes, per_device):
    import json

    from tasks.core.config.model import ModelConfig, TrainConfig
    from tasks.train import train_model

    cfg = TrainConfig(max_steps=6, per_device_train_batch_size=per_device, gradient_accumulation_steps=2,
                      learning_rate=1e-3, warmup_ratio=0.0, logging_steps=1, eval_steps=1000, save_steps=1000,
                      early_stopping_patience=None, optim="adamw_torch", num_processes=processes, seed=7)
    out.mkdir(parents=True)
    spec = {"model_location": str(tiny_model), "model": ModelConfig(id=str(tiny_model)).model_dump(),
            "train": cfg.model_dump(), "max_seq_length": 48, "chunks_dir": str(chunks), "output_dir": str(out),
            "checkpoint_dir": str(out / "checkpoints"), "tensorboard_dir": str(out / "tensorboard")}
    metrics = train_model(spec, processes)
    losses = [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
    return metrics, losses


@pytest.mark.slow  # training children
def test_two_training_processes_share_the_global_batch_and_match_one_process(tiny_model, tmp_path):
    """train.num_processes: 2 on CPU: DDP over gloo through `accelerate launch`. Both ranks train, each on
    half of every global batch (2 processes x 2 rows x 2 accumulation = the one process's 4 x 2), the per-step
    losses match the one-process run with the same global batch and seed (tolerance 1e-3 relative: only the
    order of floating-point reductions differs), and rank 0 alone writes the outputs."""
    chunks = _chunks_dir(tiny_model, tmp_path / "chunks")
    one, one_losses = _train(tiny_model, chunks, tmp_path / "one", processes=1, per_device=4)
    two, two_losses = _train(tiny_model, chunks, tmp_path / "two", processes=2, per_device=2)

    assert one["world_size"] == 1 and two["world_size"] == 2 and two["rank"] == 0
    assert two["global_batch_rows"] == one["global_batch_rows"] == 8
    ranks = two["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:  # each rank ran every step on its half of the global batch
        assert r["steps"] == 6 and r["micro_batches"] == 6 * 2 and r["rows"] == 6 * 2 * 2
    assert sum(r["rows"] for r in ranks) == one["ranks"][0]["rows"] == 6 * 8
    assert "model" in ranks[0]["wrote"] and "metrics.json" in ranks[0]["wrote"] and ranks[1]["wrote"] == []
    assert len(two_losses) == len(one_losses) == 6
    assert two_losses == pytest.approx(one_losses, rel=1e-3)
    assert two_losses[-1] < two_losses[0]  # it learned


def test_the_trainer_reads_chunks_with_labels_derived_from_trained_from(tmp_path):
    """The chunk stage stores input_ids (narrow type) and trained_from, not labels: the training child's
    `training_columns` turns the saved DatasetDict into int32 input_ids and labels, row for row."""
    import numpy as np
    import pyarrow as pa
    from datasets import load_from_disk

    from tasks.data.arrow import with_labels
    from tasks.chunk import SHARD, chunk_rows, write_dataset_dict
    from tasks.data.windows import window_plan
    from tasks.core.config.data import ChunkConfig
    from tasks.ml.train_worker import training_columns

    docs = [list(range(10, 10 + n)) for n in (40, 3, 17, 64)]
    tokens = pa.table({"doc_id": [f"d{i}" for i in range(4)], "input_ids": pa.array(docs, pa.list_(pa.uint16()))})
    for split, rows in (("train", [3, 0, 2]), ("validation", [1])):
        (tmp_path / split).mkdir()
        chunk_rows(tokens, np.array(rows), window_plan(ChunkConfig(max_seq_length=16, overlap=4), True), 1,
                   tmp_path / split / SHARD)
    write_dataset_dict(tmp_path, {"train": [SHARD], "validation": [SHARD]}, "f" * 16, pa.uint16())
    stored = load_from_disk(str(tmp_path))
    assert "labels" not in stored["train"].column_names
    data = training_columns(stored)
    assert data["train"].column_names == ["input_ids", "labels"]
    assert data["train"].features["input_ids"].feature.dtype == "int32"
    for split in ("train", "validation"):
        expected = with_labels(stored[split].with_format("arrow")[:]).to_pylist()
        assert data[split].to_list() == expected and expected
    assert any(r["labels"][:2] == [-100, -100] for r in data["train"].to_list())  # overlap masked
    # docs/stages.md's recipe for a user who trains elsewhere, without this package, gives the same labels.
    plain = [[-100] * r["trained_from"] + r["input_ids"][r["trained_from"]:] for r in stored["train"]]
    assert plain == data["train"]["labels"]
