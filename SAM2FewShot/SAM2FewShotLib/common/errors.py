"""Errors the user can act on: the CLI, the worker and the Slicer panel show them as one line."""


class SAM2FewShotError(Exception):
    """Base class: anything raised as this is reported as its message alone, no traceback."""


class InputError(SAM2FewShotError, ValueError):
    """Bad user input: a missing or unreadable file, a wrong shape, mismatched grids."""


class ModelError(SAM2FewShotError):
    """A model that cannot be built or loaded: unknown name, bad or missing checkpoint."""


class Cancelled(SAM2FewShotError):
    """The user cancelled the job."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line, for InputError texts."""
    return " ".join(str(exc).split()) or type(exc).__name__
