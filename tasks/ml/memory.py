"""How much GPU memory one training process needs: the estimate `cpt validate` warns with and the shipped recipes'
comments show (configs/llama3.1-8b-*.yaml), from one function, `estimate`.

Pure Python (no torch): `cpt validate` answers at once. The parameter count comes from the model's own
config.json (a local model folder, or the Hub cache offline), else from a few public configs shipped below, else
from `train.model_params_b` (then only weights, gradients and optimizer states are estimated: the activations need
the model's shape). What each term counts follows what the training child does (tasks/ml/train_worker.py):

- weights: full with sharding none: every parameter in model.dtype on every GPU (DDP). full with fsdp: float32
  master weights (accelerate's FSDP2 upcasts trainable parameters when compute is in bf16/fp16), 1/N of them per
  GPU, plus the gathered units in flight (two decoder layers in model.dtype: the one computing and the one
  prefetched). lora: the frozen base in model.dtype plus the adapter in float32 (peft upcasts adapters). qlora:
  the base's linear layers in NF4 (4 bits + one 8-bit absmax per 64 weights + one float32 per 256 absmax blocks:
  4.127 bits), the rest (embeddings, norms) in float32 (peft's prepare_model_for_kbit_training upcasts them), the
  adapter in float32. With lora.train_embeddings, embed_tokens and lm_head get a trainable float32 copy (peft's
  modules_to_save keeps the original beside it; one copy when they are tied).
- gradients: one per trainable parameter, in the trainable parameter's dtype (1/N of them with fsdp).
- optimizer states: AdamW's two moments per trainable parameter: 4 bytes each with float32 parameters (fsdp's
  master weights, adapters), model.dtype's size for a full DDP training in bf16 (torch's AdamW keeps them in the
  parameter's dtype), 1 byte each for the 8-bit optimizers (adamw_8bit, paged_adamw_8bit), 1/N with fsdp.
- activations, per micro-batch of T = per_device_train_batch_size x chunk.max_seq_length tokens, in model.dtype:
  a Llama-style decoder layer keeps 9h + 3kv + 4i values per token (h hidden, kv the key/value width, i the MLP's
  width: the attention block's RMSNorm input in float32 (2h), its output (h), q, k, v (h + 2kv), q and k after
  RoPE (h + kv), the attention output (h); the MLP block's RMSNorm input in float32 (2h) and output (h), gate, up,
  silu(gate) and their product (4i)), plus a dropout copy of each adapted layer's input with lora dropout. With
  gradient_checkpointing each layer keeps its input (h per token) and one layer's values are rebuilt at a time.
  The logits: float32 logits and their gradient, 8 bytes per token per vocabulary entry, an upper bound (TRL's
  tiled LM head keeps less).
- overhead: 2 GiB for the CUDA context, NCCL buffers and the allocator's slack.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GIB = 2**30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "auto": 2}  # auto: bf16 on a GPU
NF4_BYTES = (4 + 8 / 64 + 32 / (64 * 256)) / 8  # NF4 with double quantization: 4.127 bits a weight
OVERHEAD = 2 * GIB

# Public config.json values of models the shipped recipes name, for an estimate before anything is downloaded.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    # meta-llama/Llama-3.1-8B's config.json (the shape it shares with Llama-3.1-8B-Instruct).
    "meta-llama/Llama-3.1-8B": dict(model_type="llama", vocab_size=128_256, hidden_size=4096,
                                    intermediate_size=14_336, num_hidden_layers=32, num_attention_heads=32,
                                    num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    # google/gemma-3-1b-pt's (unsloth/gemma-3-1b-pt mirrors it): the seed notebook's model.
    "google/gemma-3-1b-pt": dict(model_type="gemma3_text", vocab_size=262_144, hidden_size=1152,
                                 intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
                                 num_key_value_heads=1, head_dim=256, tie_word_embeddings=True),
}
KNOWN_CONFIGS["meta-llama/Llama-3.1-8B-Instruct"] = KNOWN_CONFIGS["meta-llama/Llama-3.1-8B"]
KNOWN_CONFIGS["unsloth/gemma-3-1b-pt"] = KNOWN_CONFIGS["google/gemma-3-1b-pt"]


@dataclass
class Shape:
    """What the estimate needs of a decoder-only model (Llama, Mistral, Qwen 2/3, Gemma 1-3)."""

    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    bias: bool = False  # Qwen 2's q, k, v biases
    qk_norm: bool = False  # Gemma 3's and Qwen 3's RMSNorm of q and k (head_dim each)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Shape:
        cfg = cfg.get("text_config") or cfg  # Gemma 3's multimodal config nests the decoder's
        heads = cfg["num_attention_heads"]
        return cls(vocab=cfg["vocab_size"], hidden=cfg["hidden_size"], intermediate=cfg["intermediate_size"],
                   layers=cfg["num_hidden_layers"], heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                   tied=bool(cfg.get("tie_word_embeddings", False)),
                   bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
                   qk_norm=cfg.get("model_type") in ("gemma3", "gemma3_text", "qwen3"),
                   norms_per_layer=4 if cfg.get("model_type") in ("gemma2", "gemma3", "gemma3_text") else 2)

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """A decoder layer's linear layers as (in, out) features, by peft's module names."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q_width), "k_proj": (h, self.kv_width), "v_proj": (h, self.kv_width),
                "o_proj": (self.q_width, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        """Weights of every decoder layer's linear layers (what QLoRA quantizes)."""
        per_layer = sum(a * b for a, b in self.linear_shapes().values())
        if self.bias:
            per_layer += self.q_width + 2 * self.kv_width
        return self.layers * per_layer

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def norm_params(self) -> int:
        # Two RMSNorms per layer and the final one (Gemma 2/3 four per layer: before and after each block), plus
        # Gemma 3's and Qwen 3's q/k norms.
        return self.layers * (self.norms_per_layer * self.hidden + (2 * self.head_dim if self.qk_norm else 0)) \
            + self.hidden

    norms_per_layer: int = 2

    @property
    def params(self) -> int:
        return self.linear_params + self.embedding_params + self.head_params + self.norm_params

    def lora_params(self, r: int, targets: list[str]) -> int:
        shapes = self.linear_shapes()
        return self.layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets if t in shapes)


def model_config(model_id: str, revision: str | None = None) -> dict[str, Any] | None:
    """config.json of a local model folder, of the Hub cache (never downloaded here), or of KNOWN_CONFIGS."""
    local = Path(model_id).expanduser()
    if (local / "config.json").is_file():
        return json.loads((local / "config.json").read_text(encoding="utf-8"))
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_id, "config.json", revision=revision)
        if isinstance(cached, str):
            return json.loads(Path(cached).read_text(encoding="utf-8"))
    except Exception:  # noqa: BLE001  (not a repo id, an unreadable cache: fall through)
        pass
    return KNOWN_CONFIGS.get(model_id)


@dataclass
class Estimate:
    """Bytes per GPU, by what holds them, and how they were reached."""

    gpus: int
    parameters: int
    trainable: int
    terms: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    def gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 2) for k, v in {**self.terms, "total": self.total}.items()}

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in self.gib().items() if k != "total")
        return (f"{self.total / GIB:.1f} GiB per GPU on {self.gpus} GPU(s) ({parts} GiB; {self.parameters / 1e9:.2f} B "
                f"parameters, {self.trainable / 1e6:,.1f} M trainable)")


def _adam_bytes(optim: str, param_bytes: int) -> float:
    """Two moments per trainable parameter."""
    if "8bit" in optim:
        return 2.0
    return 2.0 * param_bytes


def estimate(train, model, max_seq_length: int, shape: Shape | None = None,
             params: int | None = None) -> Estimate:
    """Bytes per GPU for `train` (TrainConfig) on `model` (ModelConfig) with rows of `max_seq_length` tokens.
    `shape`: the model's (default: read through `model_config`); without one, `params` or train.model_params_b
    give the weights, gradients and optimizer states, and the activations are left out (said in the notes)."""
    if shape is None:
        cfg = model_config(model.id, model.revision)
        shape = Shape.from_config(cfg) if cfg else None
    notes: list[str] = []
    if shape is not None:
        params = shape.params
    elif params is None and train.model_params_b is not None:
        params = int(train.model_params_b * 1e9)
    if params is None:
        raise ValueError(f"no parameter count for {model.id!r}: its config.json is not at hand; set "
                         "train.model_params_b (billions)")
    if shape is None:
        notes.append("activations not estimated: the model's config.json is not at hand (train.model_params_b "
                     "gives only the parameter count)")
    n = train.num_processes
    shard = n if train.sharding == "fsdp" else 1
    w = DTYPE_BYTES[model.dtype]
    lora = train.lora
    terms: dict[str, float] = {}
    if train.method == "full":
        trainable = params
        if train.sharding == "fsdp":
            master = 4 if w < 4 else w  # fp32 master weights when compute is in bf16/fp16
            gathered = 2 * (shape.linear_params // shape.layers + 2 * shape.hidden) * w if shape else 0
            terms["weights"] = params * master / shard + gathered
            terms["gradients"] = params * master / shard
            terms["optimizer"] = params * _adam_bytes(train.optim, master) / shard
            notes.append(f"fsdp over {n} GPUs: float32 master weights, gradients and AdamW states 1/{n} each, two "
                         "decoder layers gathered in model.dtype")
        else:
            terms["weights"] = params * w
            terms["gradients"] = params * w
            terms["optimizer"] = params * _adam_bytes(train.optim, w)
    else:
        if shape is None:
            raise ValueError("a lora/qlora estimate needs the model's config.json (the adapter's size follows its "
                             "shape)")
        adapter = shape.lora_params(lora.r, lora.target_modules)
        trained_embeddings = (shape.embedding_params + shape.head_params) if lora.train_embeddings else 0
        trainable = adapter + trained_embeddings
        if train.method == "qlora":
            frozen = shape.linear_params * NF4_BYTES + (params - shape.linear_params) * 4
            notes.append("qlora: linear layers in NF4 with double quantization (4.127 bits), embeddings and norms "
                         "upcast to float32 by prepare_model_for_kbit_training")
        else:
            frozen = params * w
        terms["weights"] = frozen + trainable * 4
        terms["gradients"] = trainable * 4
        terms["optimizer"] = trainable * _adam_bytes(train.optim, 4)
        notes.append(f"{train.method}: r={lora.r} adapter on {', '.join(lora.target_modules)}: {adapter / 1e6:,.1f} "
                     "M float32 parameters" + (f"; embed_tokens and lm_head trained in full, a float32 copy: "
                                               f"{trained_embeddings / 1e6:,.1f} M" if lora.train_embeddings else ""))
    if shape is not None:
        tokens = train.per_device_train_batch_size * max_seq_length
        h, kv, i = shape.hidden, shape.kv_width, shape.intermediate
        per_layer = 9 * h + 3 * kv + 4 * i  # values per token, see the module's docstring
        if train.method != "full" and lora.dropout > 0:
            shapes = shape.linear_shapes()
            per_layer += sum(shapes[t][0] for t in lora.target_modules if t in shapes)
        if train.gradient_checkpointing:
            layer_values = shape.layers * h + per_layer
        else:
            layer_values = shape.layers * per_layer
        terms["activations"] = tokens * layer_values * w
        terms["logits"] = tokens * shape.vocab * 8
        notes.append(f"activations at {train.per_device_train_batch_size} x {max_seq_length} tokens per micro-batch"
                     + (", gradient checkpointing per layer" if train.gradient_checkpointing else ""))
    terms["overhead"] = OVERHEAD
    return Estimate(gpus=n, parameters=params, trainable=trainable, terms=terms, notes=notes)


def memory_warning(cfg) -> str | None:
    """The warning `cpt validate` prints: the estimate per GPU over train.gpu_memory_gb, else None."""
    train = cfg.train
    if train.gpu_memory_gb is None:
        return None
    try:
        est = estimate(train, cfg.model, cfg.chunk.max_seq_length)
    except ValueError as e:
        return f"train.gpu_memory_gb: cannot estimate the memory per GPU: {e}"
    budget = train.gpu_memory_gb * GIB  # GiB, as nvidia-smi's MiB / 1024 (an "80 GB" card: 80)
    if est.total <= budget:
        return None
    return (f"train.gpu_memory_gb: the estimate is {est.total / GIB:.1f} GiB per GPU, over the {train.gpu_memory_gb:g} "
            f"given: {est.describe()}. Lower per_device_train_batch_size or chunk.max_seq_length, turn on "
            "gradient_checkpointing, shard (train.sharding: fsdp) or train an adapter (train.method: lora/qlora)")
