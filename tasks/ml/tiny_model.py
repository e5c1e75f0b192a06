"""A tiny causal LM built locally — a byte-level BPE tokenizer trained on a corpus plus a small Llama-style
model from config — saved with `save_pretrained`, so demos and tests load it through the same
`AutoTokenizer` / `AutoModelForCausalLM` path as a hub id, with no download.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, add_bos: bool = True, byte_level: bool = True):
    """A PreTrainedTokenizerFast that, like Llama/Gemma, puts BOS first when asked for special tokens.

    `byte_level`: merges start from the 256 bytes (any text is encoded; a small vocabulary leaves a Korean syllable
    as byte pieces, which a model can emit out of order: U+FFFD in its text). Otherwise from the characters of
    `texts` (every syllable of the corpus is a token of its own; a character the corpus never had is <unk>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    if byte_level:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # words with their leading space marked (as sentencepiece does), characters as the first tokens
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
        tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
        alphabet = sorted({c for t in texts for c in t if not c.isspace()} | {"\u2581"})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=alphabet, limit_alphabet=len(alphabet))
    tk.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        bos = tk.token_to_id("<bos>")
        tk.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                          special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=2048)


def read_texts(corpus: Path, field: str = "content") -> list[str]:
    return [json.loads(line)[field] for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]


def build_tiny_model(out_dir: str | Path, texts: list[str], vocab_size: int = 1024, hidden_size: int = 64,
                     layers: int = 2, seed: int = 0, add_bos: bool = True, byte_level: bool = True) -> Path:
    """Write tokenizer + randomly initialised LlamaForCausalLM to `out_dir` (atomically)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    tok = train_tokenizer(texts, vocab_size, add_bos, byte_level)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
        max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".tmp-{out_dir.name}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
