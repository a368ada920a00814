"""Celery configuration, mapped from luminagrid's settings (LUMINAGRID_* environment variables).

`celery -A luminagrid worker` loads this through `luminagrid.app`.
"""

from luminagrid.settings import QUEUE, Settings

_settings = Settings.from_env()

broker_url = _settings.broker_url
result_backend = _settings.result_backend

# Never pickle: a pickled message runs code on whoever loads it. msgpack carries bytes natively
# (json would base64 them); json is accepted for control/event traffic only.
task_serializer = "msgpack"
result_serializer = "msgpack"
accept_content = ["msgpack", "json"]
result_accept_content = ["msgpack", "json"]

task_default_queue = QUEUE
result_expires = _settings.result_ttl_s
# One message at a time per pool process: strips spread evenly and fewer are stranded on a crash.
worker_prefetch_multiplier = 1
broker_connection_retry_on_startup = True
task_publish_retry = True
