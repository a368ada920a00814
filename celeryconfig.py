"""Celery configuration, mapped from luminagrid's settings (LUMINAGRID_* environment variables).

`celery -A luminagrid worker` loads this through `luminagrid.app`. Every worker must run with the
same LUMINAGRID_VISIBILITY_TIMEOUT_S and LUMINAGRID_LIVENESS_TTL_S.
"""

from kombu import Exchange, Queue

from luminagrid.backend import backend_url, tcp_options
from luminagrid.broker import sentinel_options, tls_options
from luminagrid.queues import PRIORITY_SEP, PRIORITY_STEPS
from luminagrid.settings import QUEUE, STITCH_QUEUE, UNACKED_MUTEX_EXPIRE_S, Settings

_settings = Settings.from_env()

broker_url = _settings.broker_url
result_backend = backend_url(_settings.result_backend)
# rediss:// URLs: verify the server's certificate (LUMINAGRID_REDIS_CA_CERTS, else the system's CAs).
broker_use_ssl = tls_options(_settings.broker_url)
redis_backend_use_ssl = tls_options(_settings.result_backend)

# Never pickle: a pickled message runs code on whoever loads it. msgpack carries bytes natively
# (json would base64 them); json is accepted for control/event traffic only.
task_serializer = "msgpack"
result_serializer = "msgpack"
accept_content = ["msgpack", "json"]
result_accept_content = ["msgpack", "json"]

# Strips and stitches on queues of their own: a job's stitch never waits behind other jobs' strips.
# Workers consume both (kombu takes from them in turn).
task_default_queue = QUEUE
# Each queue its own direct exchange and key (queues declared by name alone share the default
# exchange and key, and would both receive every message).
task_queues = [Queue(name, Exchange(name, type="direct"), routing_key=name) for name in (QUEUE, STITCH_QUEUE)]
task_routes = {"luminagrid.stitch": {"queue": STITCH_QUEUE}}
# Each worker also consumes a queue of its own (`<hostname>.dq2`): the supervisor sends a strip's
# speculative copy to the node it picked, never to the slow or hung one (`luminagrid.speculation`).
worker_direct = True

# Monitoring (Flower): workers send task events, clients a task-sent event, tasks report STARTED.
worker_send_task_events = True
task_send_sent_event = True
result_expires = _settings.result_ttl_s

# At-least-once strips: a message is acknowledged only after its result is stored; a pool process
# killed mid-strip puts its message back at once; a whole worker lost leaves it "unacked" until the
# supervisor sees the worker's liveness lapse (seconds) and restores it (`luminagrid.supervisor`);
# kombu's own sweep, after the visibility timeout, is the last line of defence.
task_acks_late = True
task_reject_on_worker_lost = True
task_track_started = True
worker_prefetch_multiplier = 1
_transport = {
    "visibility_timeout": _settings.visibility_timeout_s,
    "unacked_restore_interval": 1,
    "unacked_restore_throttle": 1,
    # Strips carry their job's size class as priority (`queues.priority_for`): small jobs first.
    "priority_steps": list(PRIORITY_STEPS),
    "sep": PRIORITY_SEP,
    # The sweep takes a Redis lock that expires after 300 s by default: a worker SIGKILLed while
    # holding it would stop every other worker's sweep for 5 minutes. A sweep takes milliseconds,
    # and each restore is its own transaction, so two sweeps at once are harmless.
    "unacked_mutex_expire": UNACKED_MUTEX_EXPIRE_S,
    # A connection to a Redis that went silent (a network cut) fails within seconds: kombu drops
    # a BRPOP whose reply is overdue by brpop_timeout (1 s) + this, and TCP gives up on unacked data
    # after 5 s (TCP_USER_TIMEOUT), instead of sitting in retransmission backoff for minutes.
    "health_check_interval": 2,
    "socket_timeout": 10,
    "socket_connect_timeout": 3,
    **tcp_options(),
}
# sentinel:// URLs: kombu's Sentinel transport and luminagrid's PollingSentinelBackend ask the
# sentinels for the master named LUMINAGRID_SENTINEL_MASTER, and again after every lost connection.
broker_transport_options = _transport | sentinel_options(
    _settings.broker_url, _settings.sentinel_master, _settings.sentinel_password)
result_backend_transport_options = {"visibility_timeout": _settings.visibility_timeout_s} | sentinel_options(
    _settings.result_backend, _settings.sentinel_master, _settings.sentinel_password, "LUMINAGRID_RESULT_BACKEND")
visibility_timeout = _settings.visibility_timeout_s
task_soft_time_limit = _settings.soft_time_limit_s

# Ride through a Redis restart: reconnect forever (workers), retry publishing and result writes.
broker_connection_retry_on_startup = True
broker_connection_max_retries = None
task_publish_retry = True
task_publish_retry_policy = {"max_retries": 20, "interval_start": 0, "interval_step": 0.25, "interval_max": 1}
result_backend_always_retry = True
result_backend_max_retries = 60
result_backend_base_sleep_between_retries_ms = 50
result_backend_max_sleep_between_retries_ms = 1000
redis_socket_timeout = 10
redis_socket_connect_timeout = 3
redis_retry_on_timeout = True
broker_connection_timeout = 3
