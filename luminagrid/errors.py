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


class BrokerUnreachable(LuminagridError):
    """No Redis answers at the configured URL."""


class EmbeddedError(LuminagridError):
    """The private Redis or the local workers of embedded mode could not be started."""


class MessageError(LuminagridError):
    """A task message that is malformed or forged: rejected before decoding anything."""


class JobFailed(LuminagridError):
    """A job ran and failed on the workers."""


class JobTimeout(LuminagridError):
    """A job did not finish within its timeout."""


class JobNotFound(LuminagridError):
    """No job with that id is known to Redis (never submitted, collected, or expired)."""
