"""Which prompt prefixes each worker of a pool was sent: chained block hashes in a per-worker LRU.

The server never tokenizes (the worker does, after applying the chat template), so a prompt is cut
into blocks of ``block_chars`` characters of what the server has: the prompt text, or for chat a
canonical rendering of the messages (role and content, in order), which is prefix-preserving like
the template it stands in for (a conversation extended by a turn renders to an extension of its
previous rendering). Token-id prompts are cut into blocks of ``block_chars // CHARS_PER_TOKEN`` ids.
Only whole blocks count: an engine caches whole KV blocks only, too.

Invariant: block ``i``'s hash covers blocks ``0..i`` (each hash chains the previous one), so a hash in
a worker's LRU means that whole prefix was sent to that worker; a worker's LRU holds at most its
budget of hashes, and a prompt's blocks are touched from last to first so that eviction drops the
tails of prefixes before their heads (as vLLM's own block eviction does), keeping matches contiguous.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from lmi_core.engine import CHARS_PER_TOKEN  # compares a block budget in characters with KV tokens

RoutingKey = str | Sequence[int]


def render_messages(messages: Sequence[dict[str, Any]]) -> str:
    """A canonical, prefix-preserving rendering of chat messages (the chat template's stand-in)."""
    parts = []
    for message in messages:
        content = message.get("content", "")
        text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
        # Control characters as separators: they do not occur in ordinary text, so distinct
        # conversations cannot render alike.
        parts.append(f"{message.get('role', '')}\x1f{text}\x1e")
    return "".join(parts)


def block_hashes(key: RoutingKey, block_chars: int) -> list[int]:
    """The chained hash of every whole block of ``key`` (text: ``block_chars`` characters a block;
    token ids: ``block_chars // CHARS_PER_TOKEN`` ids a block)."""
    size = block_chars if isinstance(key, str) else max(1, block_chars // CHARS_PER_TOKEN)
    hashes: list[int] = []
    previous = 0
    for start in range(0, len(key) - size + 1, size):
        block = key[start : start + size]
        # Python's hash is salted per process, which is fine: the index lives in one process.
        previous = hash((previous, block if isinstance(block, str) else tuple(block)))
        hashes.append(previous)
    return hashes


class PrefixIndex:
    """Per worker, an LRU of the block hashes it was sent (at most ``budget`` each)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._blocks: dict[int, OrderedDict[int, None]] = {}

    def matched(self, worker_id: int, hashes: Sequence[int]) -> int:
        """How many leading blocks of ``hashes`` the worker was sent (and has not evicted)."""
        blocks = self._blocks.get(worker_id)
        if not blocks:
            return 0
        count = 0
        for block in hashes:
            if block not in blocks:
                break
            count += 1
        return count

    def cached(self, worker_id: int) -> int:
        """How many blocks the worker holds."""
        return len(self._blocks.get(worker_id, ()))

    def record(self, worker_id: int, hashes: Sequence[int], budget: int | None = None) -> None:
        """The worker was sent ``hashes``; ``budget`` (its KV capacity in blocks, where its engine
        reports one) overrides the default budget."""
        blocks = self._blocks.setdefault(worker_id, OrderedDict())
        for block in reversed(hashes):  # the head of the prefix ends up most recent: evicted last
            blocks[block] = None
            blocks.move_to_end(block)
        limit = max(1, budget if budget is not None else self.budget)
        while len(blocks) > limit:
            blocks.popitem(last=False)

    def forget(self, worker_id: int) -> None:
        """The worker restarted or left: its engine's cache is gone."""
        self._blocks.pop(worker_id, None)
