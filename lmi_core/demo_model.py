"""The embedded demo model: a tiny random Llama with a byte-level BPE tokenizer, built offline.

No hub access: the tokenizer is trained on a generated corpus and the weights are random (seeded),
so the model is deterministic but talks nonsense. It exists to exercise the whole stack in seconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# The thinking variant (``thinking=True``), shaped like Qwen3's: an assistant turn sent back with its
# ``reasoning_content`` shows it in a ``<think>`` block, and ``enable_thinking=false`` closes an empty
# block in the prompt, so that the model answers at once.
THINKING_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['role'] == 'assistant' and message['reasoning_content'] %}"
    "<think>{{ message['reasoning_content'] }}</think>\n"
    "{% endif %}"
    "{{ message['content'] }}</s>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
THINK_TOKENS = ["<think>", "</think>"]  # whole tokens, as in Qwen3's and DeepSeek-R1's vocabularies
# The answer-only model's logit for the next token of its answer (the others are 0): after the final
# norm the hidden state is about sqrt(hidden_size) in that dimension, so the margin is in the hundreds.
ANSWER_MARGIN = 30.0
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = [
    "the",
    "a",
    "an",
    "model",
    "server",
    "worker",
    "token",
    "request",
    "stream",
    "batch",
    "engine",
    "tensor",
    "parallel",
    "rank",
    "socket",
    "python",
    "mpi",
    "gpu",
    "cpu",
    "memory",
    "queue",
    "latency",
    "throughput",
    "hello",
    "world",
    "deep",
    "learning",
    "language",
    "large",
    "inference",
    "serving",
    "fast",
    "slow",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "being",
    "have",
    "has",
    "had",
    "do",
    "does",
    "did",
    "will",
    "would",
    "can",
]


def corpus(lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    text = []
    for _ in range(lines):
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
        text.append(sentence.capitalize() + rng.choice([".", "?", "!", ","]))
    return text


def _answer_only(model: Any, answer: list[int], eos: int) -> None:
    """Make ``model`` a chain: after any token it predicts ``answer[0]``, after ``answer[i]`` the next
    one, after the last its end token. Every layer's output projections are zeroed, so the last
    hidden state is the last token's embedding: a one-hot of dimension 0 for any token, of dimension
    i + 1 for ``answer[i]``; the output layer maps dimension j to the token that follows, with a
    margin no sampling temperature undoes."""
    if len(set(answer)) != len(answer) or len(answer) + 1 >= model.config.hidden_size:
        raise ValueError("the answer needs distinct tokens, fewer than the hidden size")
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    embed.zero_()
    embed[:, 0] = 1.0
    head.zero_()
    for i, token in enumerate(answer):
        embed[token] = 0.0
        embed[token, i + 1] = 1.0
    for dim, token in enumerate([*answer, eos]):
        head[token, dim] = ANSWER_MARGIN


def build_demo_model(
    path: str | Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,  # a power of two: tensor parallel splits the output layer by vocabulary
    max_position_embeddings: int = 512,
    seed: int = 0,
    intermediate_size: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    thinking: bool = False,
    answer: str | None = None,
) -> Path:
    """Write a random Llama, its tokenizer and a ``serving.properties`` into ``path``.

    The defaults make the tiny demo model. ``scripts/gpu_check.py`` builds a ~1B-parameter one with
    the same tokenizer on ``device="cuda"`` in ``dtype="bfloat16"``: initialising 1B weights on the
    GPU takes about a second, on CPU in fp32 tens of seconds and 4 GB. ``thinking``: a reasoning
    model's tokenizer, with ``<think>`` and ``</think>`` as tokens (in place of the last two merges,
    so the vocabulary keeps its size) and ``THINKING_CHAT_TEMPLATE``.

    ``answer``: a model that answers every prompt with this text, then its end token (``_answer_only``),
    whatever the engine and the sampling: the agent clients' tests need a turn that ends by itself.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - (len(THINK_TOKENS) if thinking else 0),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus(2000, seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=max_position_embeddings,
    )
    fast.chat_template = CHAT_TEMPLATE
    if thinking:
        fast.add_tokens(THINK_TOKENS)  # not special: their text stays in the decoded output
        fast.chat_template = THINKING_CHAT_TEMPLATE
    fast.save_pretrained(out)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
    )
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    # Random init gives near-uniform logits; a wider spread makes greedy choices stable across
    # kernels (TP all-reduce order, vLLM vs HF) instead of decided by float rounding.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
        if answer is not None:
            _answer_only(model, fast(answer, add_special_tokens=False).input_ids, fast.eos_token_id)
    model.save_pretrained(out, safe_serialization=True)
    (out / "serving.properties").write_text(
        "# lmi-core demo model: a tiny random Llama built offline by `lmi demo-model`.\n"
        "engine=Python\n"
        "option.max_rolling_batch_size=32\n"
    )
    (out / "lmi_demo.json").write_text(json.dumps({"seed": seed, "vocab_size": len(fast)}))
    return out
