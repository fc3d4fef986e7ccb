"""The one base of every error streamrt raises for something the user can fix.

A `StreamrtError` carries a message that says what to change; the CLI prints it as one
line and exits with code 2 (anything else is a bug: a short message and a hint to rerun
with `--debug`). Subsystems subclass it together with the builtin they always were
(`ValueError`, `RuntimeError`), so existing `except ValueError` code keeps working.
"""


class StreamrtError(Exception):
    """Base class: a problem with the input, the files or the machine that the message
    tells the user how to fix."""


class InputError(StreamrtError, ValueError):
    """A bad argument, request or input value (wrong shape, range, type or format)."""


class UnknownNameError(InputError, KeyError):
    """A name (consumer, agent, session) that was never registered or opened; still a
    `KeyError` for code that looks names up."""

    __str__ = Exception.__str__  # KeyError's would quote the message


class NonFiniteError(StreamrtError, ValueError):
    """Weights, latents or settings hold NaN or infinity (a broken checkpoint or config)."""


class UnsupportedError(StreamrtError, NotImplementedError):
    """A request this configuration does not serve (yet): the message says which does."""
