"""The error hierarchy. Every message names the bad value and says how to fix it.

Only `cli.py` turns these into exit codes; library code raises and never exits.
"""

from __future__ import annotations


class LuminagridError(Exception):
    """Base class of every error luminagrid raises on purpose."""


class ConfigError(LuminagridError):
    """A setting (environment variable or option) has a value that cannot work."""


class InputError(LuminagridError):
    """The image or a job parameter given by the user is unusable."""


class OutputError(LuminagridError):
    """The output file cannot be written."""


class OutputExists(OutputError):
    """The output file exists already, and overwriting it was not asked for (`result --force`)."""


class BrokerUnreachable(LuminagridError):
    """No Redis answers at the configured URL."""


class EmbeddedError(LuminagridError):
    """The private Redis or the local workers of embedded mode could not be started."""


class MessageError(LuminagridError):
    """A task message that is malformed or forged: rejected before decoding anything."""


class OperationUnavailable(LuminagridError):
    """The operation a job names is not usable here: its package is not installed on this node,
    is another version than the submitter's, or failed to load."""


class CheckFailed(LuminagridError):
    """An operation's strips differ from its whole-image result (`cli.py check-op`)."""


class ClaimGone(MessageError):
    """A claim check's key is gone from Redis: expired, deleted, or lost in a crash of Redis.

    For a job whose record is still in Redis this is a loss the cluster recovers from (the strip
    runs again); otherwise the message's job is over, or never existed.
    """

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


class JobFailed(LuminagridError):
    """A job ran and failed on the workers."""


class JobCancelled(JobFailed):
    """A job was cancelled (`cli.py cancel`, or Ctrl-C of the submitter that waited for it)."""


class JobTimeout(LuminagridError):
    """A job did not finish within its timeout."""


class JobNotFound(LuminagridError):
    """No job with that id is known to Redis (never submitted, collected, or expired)."""
