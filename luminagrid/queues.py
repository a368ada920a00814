"""What is in the broker: kombu's Redis structures, read in bounded pieces, and messages restored.

kombu's Redis transport keeps a queue as a list (published with LPUSH, taken with BRPOP from
the other end), and each message a worker took but has not acknowledged in the `unacked` hash
(delivery tag -> [message, exchange, routing key]) with its time in `unacked_index`. A message
is JSON whose body comes first; its headers and properties (`"correlation_id": "<task id>"`)
come last, so the task id is found in the tail without reading the pixels.

Nothing here walks a whole queue in one command: `find_queued` reads a page at a time.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import redis
from kombu import Connection

#: kombu's keys (Channel.unacked_key / unacked_index_key defaults).
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
#: Messages per page when looking through a queue, and the pause between pages, in seconds.
PAGE = 1000
PAGE_PAUSE_S = 0.002

# Per value: the task id and the routing key (the queue), "" where none is found. Both sit in the
# message's properties, within its last ~500 bytes; plain `find`, no patterns: ~1 us a message.
_IDS_LUA = """
local function field(tail, name)
  local a = string.find(tail, name, 1, true)
  if not a then return '' end
  local b = string.find(tail, '"', a + #name, true)
  return b and string.sub(tail, a + #name, b - 1) or ''
end
local out = {}
if ARGV[1] == 'list' then
  for i, v in ipairs(redis.call('LRANGE', KEYS[1], ARGV[2], ARGV[3])) do
    out[i] = field(string.sub(v, -1024), '"correlation_id": "')
  end
else
  for i = 2, #ARGV do
    local v = redis.call('HGET', KEYS[1], ARGV[i])
    local tail = v and string.sub(v, -1024) or ''
    out[2 * i - 3] = field(tail, '"correlation_id": "')
    out[2 * i - 2] = field(tail, '"routing_key": "')
  end
end
return out
"""


def _ids(client: redis.Redis, *args: Any) -> list[str]:
    return [b.decode() for b in client.eval(_IDS_LUA, 1, *args)]


def unacked_tags(client: redis.Redis) -> list[str]:
    """Delivery tags of every message taken by a worker and not yet acknowledged."""
    return [t.decode() for t in client.zrange(UNACKED_INDEX, 0, -1)]


def unacked_tasks(client: redis.Redis, tags: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Delivery tag -> (task id, queue) of unacknowledged messages (gone ones are left out)."""
    tags = list(tags)
    if not tags:
        return {}
    found = _ids(client, UNACKED, "hash", *tags)
    return {t: (found[2 * i], found[2 * i + 1]) for i, t in enumerate(tags) if found[2 * i]}


def queued_count(client: redis.Redis, queue: str) -> int:
    return int(client.llen(queue))


def find_queued(client: redis.Redis, queue: str, wanted: set[str]) -> set[str]:
    """Which of the task ids `wanted` have a message in `queue`, a page at a time.

    Reads from the newest end: publishing only moves messages further along and taking removes
    them at the far end, so a message that stays queued throughout is found; one taken meanwhile
    may be missed (the caller checks again for such).
    """
    found: set[str] = set()
    start = 0
    while wanted - found:
        page = _ids(client, queue, "list", start, start + PAGE - 1)
        found.update(wanted.intersection(page))
        if len(page) < PAGE:
            break
        start += PAGE
        time.sleep(PAGE_PAUSE_S)  # let other clients in between pages
    return found


def drop(client: redis.Redis, tag: str) -> None:
    """Forget an unacknowledged message whose task already finished (its ack was lost)."""
    with client.pipeline(transaction=True) as pipe:
        pipe.zrem(UNACKED_INDEX, tag)
        pipe.hdel(UNACKED, tag)
        pipe.execute()


def restore(connection: Connection, tag: str) -> None:
    """Put an unacknowledged message back at the head of its queue (next to be taken), as kombu's
    own visibility-timeout sweep does (`QoS.restore_by_tag`)."""
    connection.default_channel.qos.restore_by_tag(tag)
