"""What is in the broker: kombu's Redis structures, read in bounded pieces (`lease.Fence` restores).

kombu's Redis transport keeps a queue as a list (published with LPUSH, taken with BRPOP from
the other end), and each message a worker took but has not acknowledged in the `unacked` hash
(delivery tag -> [message, exchange, routing key]) with its time in `unacked_index`. A message
is JSON whose body comes first; its headers and properties (`"correlation_id": "<task id>"`)
come last, so the task id is found in the tail without reading the pixels.

A queue is one list per priority step (kombu's `priority_steps`): a message goes to the list of
the largest step at or below its priority, and workers take from the lowest step first (the
step-0 list has the queue's own name, the others `<queue>\\x06\\x16<step>`). Strips carry their
job's size class as priority (`priority_for`), so a small job's strips are taken before a big
job's thousand queued ones.

Nothing here walks a whole queue in one command: `find_queued` reads a page at a time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import redis

#: kombu's Redis priority steps and the separator of their lists' names (its defaults, set
#: explicitly in celeryconfig.py). 0 is taken first.
PRIORITY_STEPS = (0, 3, 6, 9)
PRIORITY_SEP = "\x06\x16"
#: A job of at most this many pixels gets the step at the same place (bigger ones: the last).
PRIORITY_PIXELS = (4_000_000, 40_000_000, 400_000_000)
#: kombu's keys (Channel.unacked_key / unacked_index_key defaults).
UNACKED = "unacked"
UNACKED_INDEX = "unacked_index"
#: At most this many messages, or bytes, per page when looking through a queue, and the pause
#: between pages, in seconds.
PAGE = 500
PAGE_BYTES = 8 * 1024 * 1024
PAGE_PAUSE_S = 0.002

# Per value: the task id and the routing key (the queue), "" where none is found. Both sit in the
# message's properties, within its last ~500 bytes; plain `find`, no patterns: ~1 us a message.
# The list branch reads from ARGV[2] on, until ARGV[3] messages or ARGV[4] bytes (messages carry
# inline payloads of up to 256 KiB: a page is bounded by bytes too), 10 messages at a time, or 100
# while they are small, and returns {messages read, whether the list ended, ids...}.
_IDS_LUA = """
local function field(tail, name)
  local a = string.find(tail, name, 1, true)
  if not a then return '' end
  local b = string.find(tail, '"', a + #name, true)
  return b and string.sub(tail, a + #name, b - 1) or ''
end
if ARGV[1] == 'list' then
  local start, most, budget = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
  local out, read, bytes, ended, step = {}, 0, 0, 0, 10
  while read < most and bytes < budget do
    local chunk = redis.call('LRANGE', KEYS[1], start + read, start + read + step - 1)
    for _, v in ipairs(chunk) do
      read = read + 1
      bytes = bytes + #v
      out[read + 2] = field(string.sub(v, -1024), '"correlation_id": "')
    end
    if #chunk < step then ended = 1 break end
    -- Small messages: fewer, longer reads (each read seeks from the list's end again).
    if bytes < read * 16384 then step = 100 else step = 10 end
  end
  out[1], out[2] = read, ended
  return out
end
local out = {}
for i = 2, #ARGV do
  local v = redis.call('HGET', KEYS[1], ARGV[i])
  local tail = v and string.sub(v, -1024) or ''
  out[2 * i - 3] = field(tail, '"correlation_id": "')
  out[2 * i - 2] = field(tail, '"routing_key": "')
end
return out
"""


def _ids(client: redis.Redis, *args: Any) -> list[str]:
    return [b.decode() if isinstance(b, bytes) else str(b) for b in client.eval(_IDS_LUA, 1, *args)]


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


def priority_for(pixels: int) -> int:
    """The priority of a job's strips, by its size: up to 4 MP 0 (taken first), up to 40 MP 3,
    up to 400 MP 6, bigger 9. Jobs of one size class are first in, first out."""
    for step, most in zip(PRIORITY_STEPS, PRIORITY_PIXELS):
        if pixels <= most:
            return step
    return PRIORITY_STEPS[-1]


def lists_of(queue: str) -> list[str]:
    """The Redis lists of `queue`, one per priority step, in the order workers take from them."""
    return [queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}" for step in PRIORITY_STEPS]


def queued_count(client: redis.Redis, queue: str) -> int:
    """Messages waiting in `queue`, at every priority."""
    with client.pipeline(transaction=False) as pipe:
        for name in lists_of(queue):
            pipe.llen(name)
        return sum(int(n) for n in pipe.execute())


def find_queued(client: redis.Redis, queue: str, wanted: set[str],
                between_pages: Callable[[], None] | None = None) -> set[str]:
    """Which of the task ids `wanted` have a message in `queue` (any priority), a bounded page
    at a time (`between_pages` runs between them, e.g. to renew a lease).

    Reads from the newest end: publishing only moves messages further along and taking removes
    them at the far end, so a message that stays queued throughout is found; one taken meanwhile
    may be missed (the caller checks again for such).
    """
    found: set[str] = set()
    for name in lists_of(queue):
        start = 0
        while wanted - found:
            reply = _ids(client, name, "list", start, PAGE, PAGE_BYTES)
            read, ended = int(reply[0]), reply[1] == "1"
            found.update(wanted.intersection(reply[2:]))
            if ended or not read:
                break
            start += read
            time.sleep(PAGE_PAUSE_S)  # let other clients in between pages
            if between_pages is not None:
                between_pages()
    return found
