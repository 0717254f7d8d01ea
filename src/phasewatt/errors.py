"""User-facing errors: one line, naming the field and what is allowed, never a traceback."""


class PhasewattError(Exception):
    """An error the user can fix; its message is printed alone on one line."""


class ConfigError(PhasewattError):
    """The config (or a grid entry) is invalid."""


class DvfsPermissionError(PhasewattError):
    """A DVFS change was refused by the driver (needs root / CAP_SYS_ADMIN)."""
