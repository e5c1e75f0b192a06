"""The GPU fast path, proved on CPU with a tiny Gemma 3: static packed batches, regional compilation and TRL's
fused LM head give the plain path's loss and gradients, and padding added for static shapes is never trained on.

Tolerance: float32 on CPU, relative 1e-4 / absolute 1e-5 on the loss and every parameter's gradient (the paths
sum the same terms in another order: fused tiles, one packed row vs one row per document).
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

RTOL, ATOL = 1e-4, 1e-5


def tiny_gemma3(seed: int = 0, attn: str = "sdpa"):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8,
                           max_position_embeddings=512, query_pre_attn_scalar=16, pad_token_id=0,
                           tie_word_embeddings=True, attn_implementation=attn)
    torch.manual_seed(seed)
    return Gemma3ForCausalLM(cfg).float()


def documents(seed: int = 0):
    """Packed rows as TRL's best-fit packing writes them (input_ids, labels with some -100, seq_lengths), and
    the documents they hold."""
    g = torch.Generator().manual_seed(seed)
    lengths = [[7, 12], [20], [5, 9, 4]]
    rows, docs = [], []
    for row in lengths:
        ids, labels = [], []
        for n in row:
            d = torch.randint(1, 96, (n,), generator=g).tolist()
            lab = list(d)
            lab[1] = -100  # an overlap token the chunker masked
            docs.append((d, lab))
            ids += d
            labels += lab
        rows.append({"input_ids": ids, "labels": labels, "seq_lengths": row})
    return rows, docs


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def plain_loss_and_grads(model, docs):
    """Each document alone, the model's own forward and loss (full logits), token-weighted across documents."""
    model.zero_grad()
    total = sum(sum(1 for x in lab[1:] if x != -100) for _, lab in docs)
    loss = 0
    for ids, lab in docs:
        n = sum(1 for x in lab[1:] if x != -100)
        out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([lab]))
        loss = loss + out.loss * n / total
    loss.backward()
    return loss.detach(), grads(model)


def batch_loss_and_grads(model, batch, fused: bool):
    from tasks.ml.static_batches import NUM_PADDING

    model.zero_grad()
    # use_cache=False as SFTTrainer.compute_loss sets it: with a cache, transformers ignores the packed position ids
    kwargs = {**{k: v for k, v in batch.items() if k != NUM_PADDING}, "use_cache": False}
    out = model(**kwargs, fused_lm_head=True) if fused else model(**kwargs)
    out.loss.backward()
    return out.loss.detach(), grads(model)


def assert_close(a, b):
    la, ga = a
    lb, gb = b
    torch.testing.assert_close(la, lb, rtol=RTOL, atol=ATOL)
    assert ga.keys() == gb.keys()
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=RTOL, atol=ATOL, msg=name)


def test_static_batch_has_one_shape_its_padding_untrained_and_sequence_starts_masked():
    from tasks.ml.static_batches import NUM_PADDING, static_packed_batch

    rows, _ = documents()
    b = static_packed_batch(rows[:2], rows=4, length=128, pad_id=0)  # a short batch: filled up to 4 rows
    assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape == (4, 128)
    flat = static_packed_batch(rows[:2], rows=4, length=128, pad_id=0, flat=True)  # for flash attention
    assert flat["input_ids"].shape == (1, 4 * 128)
    for k in ("input_ids", "labels", "position_ids"):
        assert flat[k].view(4, 128).equal(b[k])
    assert b[NUM_PADDING] == 4 * 128 - (19 + 20)
    pos, labels = flat["position_ids"][0], flat["labels"][0]
    assert (labels[pos == 0] == -100).all()  # no target predicted from the previous sequence
    # Row 0: documents of 7 and 12 tokens, then padding positions restarting at 0 (a sequence of its own).
    assert pos[:19].tolist() == list(range(7)) + list(range(12))
    assert pos[19:128].tolist() == list(range(109))
    assert (labels[19:128] == -100).all() and (labels[128 + 20:] == -100).all()
    trained = int((labels != -100).sum())
    assert trained == (7 - 2) + (12 - 2) + (20 - 2)  # each document: its first token and one masked overlap
    with pytest.raises(ValueError, match="longer than train.packed_length"):
        static_packed_batch(rows, rows=4, length=16, pad_id=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_static_packed_batch_and_fused_head_equal_the_plain_path(attn):
    """The training child's path (TRL's fused LM head on a static packed batch) against each document alone
    through the model's own full-logits loss; and TRL's padding-free batch (today's packing) in between."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from trl.trainer.utils import add_fused_lm_head

    from tasks.ml.static_batches import static_packed_batch

    model = tiny_gemma3(attn=attn)
    rows, docs = documents()
    plain = plain_loss_and_grads(model, docs)
    padding_free = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)(rows)
    padding_free = {k: padding_free[k] for k in ("input_ids", "labels", "position_ids")}
    assert_close(batch_loss_and_grads(model, padding_free, fused=False), plain)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # what SFTTrainer does to the model
    for flat in (False, True):
        static = static_packed_batch(rows, rows=4, length=128, pad_id=0, flat=flat)
        assert_close(batch_loss_and_grads(model, static, fused=True), plain)
        assert_close(batch_loss_and_grads(model, static, fused=False), plain)


@pytest.mark.parametrize("flat", [False, True])
def test_padding_of_a_static_batch_gets_no_gradient_and_does_not_change_the_loss(flat):
    from tasks.ml.static_batches import static_packed_batch

    model = tiny_gemma3()
    rows, _ = documents()
    b = static_packed_batch(rows, rows=4, length=128, pad_id=0, flat=flat)
    real = torch.zeros(4 * 128, dtype=torch.bool)
    for r, row in enumerate(rows):
        real[r * 128:r * 128 + len(row["input_ids"])] = True
    real = real.view(b["input_ids"].shape)
    embeds = model.get_input_embeddings()(b["input_ids"]).detach().requires_grad_(True)
    loss = model(inputs_embeds=embeds, labels=b["labels"], position_ids=b["position_ids"], use_cache=False).loss
    loss.backward()
    assert embeds.grad[real].abs().sum() > 0
    assert embeds.grad[~real].abs().max() == 0  # nothing flows from or through the padding
    other = b["input_ids"].clone()
    other[~real] = torch.randint(1, 96, (int((~real).sum()),))
    again = model(input_ids=other, labels=b["labels"], position_ids=b["position_ids"], use_cache=False).loss
    torch.testing.assert_close(again, loss.detach(), rtol=0, atol=1e-6)


class CountingBackend:
    """A torch.compile backend that counts the graphs it is handed and runs them as traced (aot_eager would
    also check the traced backward; eager keeps this test to seconds on a shared CPU)."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


def test_compiled_layers_match_eager_and_compile_once_for_static_batches():
    """Regional compilation (train.compile) gives eager's loss and gradients, and batches of one static shape
    with different documents (a different mask each) reuse the graphs compiled for the first; a batch of
    another length (padding-free packing) compiles anew, which is why packed_length exists."""
    import torch._dynamo

    from tasks.ml.static_batches import static_packed_batch
    from tasks.ml.train_worker import compile_layers

    torch._dynamo.reset()
    model = tiny_gemma3()
    rows, _ = documents()
    eager = batch_loss_and_grads(model, static_packed_batch(rows, 4, 128, 0), fused=False)
    backend = CountingBackend()
    assert compile_layers(model, "default", backend=backend) == 2
    assert_close(batch_loss_and_grads(model, static_packed_batch(rows, 4, 128, 0), fused=False), eager)
    first = backend.graphs
    assert first > 0
    for seed in (1, 2):
        other, _ = documents(seed)
        other[0]["seq_lengths"] = [3, 16]  # other document boundaries: another mask, the same shape
        batch_loss_and_grads(model, static_packed_batch(other, 4, 128, 0), fused=False)
    assert backend.graphs == first
    batch_loss_and_grads(model, static_packed_batch(rows, 4, 256, 0), fused=False)
    assert backend.graphs > first
    torch._dynamo.reset()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the inductor-compiled check runs on a GPU (bench.gpu_check "
                    "measures it); on CPU the counting backend above proves the tracing")
def test_inductor_compiled_layers_match_eager_on_gpu():
    from tasks.ml.static_batches import static_packed_batch
    from tasks.ml.train_worker import compile_layers

    model = tiny_gemma3().cuda()
    rows, _ = documents()
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in static_packed_batch(rows, 4, 128, 0).items()}
    eager = batch_loss_and_grads(model, batch, fused=False)
    compile_layers(model, "default")
    assert_close(batch_loss_and_grads(model, batch, fused=False), eager)


def test_static_padding_fraction_counts_row_padding_and_the_filled_last_batch():
    from datasets import Dataset

    from tasks.ml.static_batches import static_padding_fraction

    packed = Dataset.from_dict({"input_ids": [[1] * 100, [1] * 128, [1] * 28]})
    p = static_padding_fraction(packed, rows=2, length=128)
    assert (p["positions"], p["tokens"]) == (4 * 128, 256)
    assert p["padding_fraction"] == pytest.approx(0.5)


def test_step_clock_does_not_count_static_padding_as_tokens_and_hides_the_count_from_the_model():
    from tasks.ml.static_batches import NUM_PADDING
    from tasks.ml.clock import StepClock

    clock = StepClock(warmup=0)
    module = torch.nn.Linear(1, 1)
    kwargs = {"input_ids": torch.ones(1, 256, dtype=torch.long), "labels": torch.ones(1, 256, dtype=torch.long),
              NUM_PADDING: 56}
    _, seen = clock.hook(module, (), dict(kwargs))
    assert NUM_PADDING not in seen
    module.eval()
    _, seen = clock.hook(module, (), dict(kwargs))
    assert NUM_PADDING not in seen
    assert clock.pending[:2] == [256, 200]


def test_packed_length_settings_validate():
    from tasks.core.config.base import ConfigError
    from tasks.core.config.model import TrainConfig
    from tasks.core.config.tree import validate_config

    base = {"corpus": {"paths": ["x.jsonl"]}, "model": {"id": "m"}, "chunk": {"max_seq_length": 1000, "overlap": 500}}
    cfg = validate_config({**base, "train": {"packing": True, "packed_length": "auto", "optim": "adamw_torch_fused",
                                             "compile": True}})
    from tasks.ml.static_batches import static_length

    def decided(t: TrainConfig) -> int | None:
        return static_length(t.packing, t.packed_length, 1000)

    assert decided(cfg.train) == 1024
    assert decided(TrainConfig(packing=True, packed_length=2048)) == 2048
    assert decided(TrainConfig(packing=True)) is None
    with pytest.raises(ConfigError, match="at least chunk.max_seq_length"):
        validate_config({**base, "train": {"packing": True, "packed_length": 896}})
    with pytest.raises(ConfigError, match="multiple of 128"):
        validate_config({**base, "train": {"packing": True, "packed_length": 1000}})
    with pytest.raises(ConfigError, match="need packing"):
        validate_config({**base, "train": {"packed_length": "auto"}})


def test_the_shipped_medical_config_runs_the_fast_path():
    from pathlib import Path

    from tasks.core.config.tree import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "gemma3-1b-medical.yaml")
    t = cfg.train
    from tasks.ml.static_batches import static_length

    assert t.packing and static_length(t.packing, t.packed_length, cfg.chunk.max_seq_length) == 1024
    assert cfg.model.attn_implementation == "flex_attention" and cfg.model.dtype == "bfloat16"
    assert t.optim == "adamw_torch_fused" and t.compile and not t.gradient_checkpointing
    assert t.per_device_train_batch_size * t.gradient_accumulation_steps >= 8


@pytest.mark.slow  # training children
def test_training_child_with_static_shapes_and_compile_trains_like_padding_free_packing(tiny_model, tmp_path):
    """The config reaches the child: train.packed_length and train.compile change the batches' shape and the
    model's execution, not what is learned. Same data order, so each step's loss matches the padding-free run;
    the static run reports its padding and its first step's compile time."""
    import json

    from tasks.core.config.model import ModelConfig, TrainConfig
    from tasks.train import train_model
    from test_train import _chunks_dir

    chunks = _chunks_dir(tiny_model, tmp_path / "chunks")
    runs = {}
    for name, extra in (("padding-free", {}), ("static", {"packed_length": "auto", "compile": True})):
        cfg = TrainConfig(max_steps=4, per_device_train_batch_size=4, gradient_accumulation_steps=1,
                          learning_rate=1e-3, warmup_ratio=0.0, logging_steps=1, eval_steps=1000, save_steps=1000,
                          early_stopping_patience=None, optim="adamw_torch_fused", packing=True, seed=7, **extra)
        out = tmp_path / name
        out.mkdir()
        spec = {"model_location": str(tiny_model), "model": ModelConfig(id=str(tiny_model)).model_dump(),
                "train": cfg.model_dump(), "max_seq_length": 48, "chunks_dir": str(chunks), "output_dir": str(out),
                "checkpoint_dir": str(out / "checkpoints"), "tensorboard_dir": str(out / "tensorboard")}
        metrics = train_model(spec, 1)
        losses = [h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h]
        runs[name] = metrics, losses
    (free, free_losses), (static, static_losses) = runs["padding-free"], runs["static"]
    assert static["packed_length"] == 128 and static["compile"] == "default" and free["packed_length"] is None
    assert static["optim"] == "adamw_torch_fused" and static["fused_lm_head"] and free["fused_lm_head"]
    assert static_losses == pytest.approx(free_losses, rel=1e-3)
    assert static["padding_fraction"] > free["padding_fraction"] and static["batch_padding_fraction"] > 0.5
    assert free["batch_padding_fraction"] == 0.0
    assert static["compile_seconds"] is not None and static["first_step_seconds"] >= static["compile_seconds"]
    assert static["timed_trained_tokens"] == free["timed_trained_tokens"]
