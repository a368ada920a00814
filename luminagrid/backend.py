"""The result backend: Celery's Redis backend without pub/sub subscriptions.

Celery's Redis backend subscribes the sending process to every task's result channel (so that
`AsyncResult.get()` wakes on publish). luminagrid's client never waits that way: `Job.wait`
polls result keys, which also rides through Redis restarts. Subscriptions would only cost a
round trip per task and, worse, make every dropped `AsyncResult` unsubscribe in its destructor,
with retries, from a Redis that may be restarting or gone (seen in the crash tests).

Consequence: `AsyncResult.get()` on luminagrid's tasks is not supported; use `Job.wait()`.
"""

from __future__ import annotations

from celery.backends.redis import RedisBackend, ResultConsumer


class _NoSubscriptions(ResultConsumer):
    def consume_from(self, task_id: str) -> None:
        pass

    def cancel_for(self, task_id: str) -> None:
        pass


class PollingRedisBackend(RedisBackend):
    ResultConsumer = _NoSubscriptions


def backend_url(redis_url: str) -> str:
    """The `result_backend` setting that selects this backend for a Redis URL.

    Celery reads `<class path>+<url>`; its Redis backend spells unix sockets `socket://`.
    """
    for scheme in ("redis+socket://", "unix://"):
        if redis_url.startswith(scheme):
            redis_url = "socket://" + redis_url[len(scheme):]
    return f"luminagrid.backend:PollingRedisBackend+{redis_url}"
