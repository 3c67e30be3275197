"""One exception type per failure kind; the CLI and server turn each into one clear line."""


class MoeflowError(Exception):
    """Base class: every error a user can cause derives from this."""


class CheckpointError(MoeflowError):
    """The checkpoint folder or one of its files is missing, unreadable or inconsistent."""


class UnsupportedModelError(MoeflowError):
    """config.json names an architecture or option moeflow does not implement."""


class ConfigError(MoeflowError):
    """A configuration value (model, engine or sampling) is out of range."""


class PromptError(MoeflowError):
    """A prompt cannot be served: empty, too long for the context, or not tokenizable."""
