"""Tiny random encoders built offline: an embedding model and a cross-encoder reranker.

Like the demo Llama (``lmi_core.demo_model``): no hub, a WordPiece tokenizer trained on the same
generated corpus, random (seeded) BERT weights. The embedding model is also a sentence-transformers
directory (``modules.json``, mean pooling, normalized), so ``sentence-transformers`` loads the same
files as a reference; the reranker is a ``BertForSequenceClassification`` with one label, which
``sentence-transformers``' ``CrossEncoder`` loads. Shapes and the whole stack, in seconds; the
vectors mean nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from lmi_core.demo_model import corpus

Kind = Literal["embedding", "reranker"]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_demo_encoder(
    path: str | Path,
    kind: Kind = "embedding",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,  # head size 32: vLLM's CPU attention has no kernel for 16
    vocab_size: int = 512,
    max_position_embeddings: int = 128,
    seed: int = 0,
) -> Path:
    """Write a random BERT of ``kind``, its tokenizer and a ``serving.properties`` into ``path``."""
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizer

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tokenizer.train_from_iterator(corpus(2000, seed), trainer=trainer)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    fast = BertTokenizer(tokenizer_object=tokenizer, model_max_length=max_position_embeddings)
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=fast.pad_token_id,
    )
    config.num_labels = 1  # a reranker's one relevance logit
    if kind == "embedding":
        config.architectures = ["BertModel"]
        BertModel(config, add_pooling_layer=False).save_pretrained(out, safe_serialization=True)
        _sentence_transformers_files(out, hidden_size, max_position_embeddings)
        task = "text-embedding"
    else:
        config.architectures = ["BertForSequenceClassification"]
        model = BertForSequenceClassification(config)
        with torch.no_grad():  # random init scores every pair near 0.5; a wider spread orders them
            model.classifier.weight.mul_(50.0)
        model.save_pretrained(out, safe_serialization=True)
        task = "rerank"
    (out / "serving.properties").write_text(
        f"# lmi-core demo {kind}: a tiny random BERT built offline by `lmi demo-model --kind {kind}`.\n"
        "engine=Python\n"
        f"option.task={task}\n"
        "option.max_rolling_batch_size=32\n"
    )
    return out


def _sentence_transformers_files(out: Path, hidden_size: int, max_length: int) -> None:
    """sentence-transformers' description of the model: transformer, mean pooling, normalize."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]
    (out / "modules.json").write_text(json.dumps(modules, indent=2))
    (out / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": max_length}))
    (out / "1_Pooling").mkdir(exist_ok=True)
    pooling = {"word_embedding_dimension": hidden_size, "pooling_mode_mean_tokens": True}
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
    (out / "2_Normalize").mkdir(exist_ok=True)
