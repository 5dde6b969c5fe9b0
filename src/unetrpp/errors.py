"""The error type of problems a user can fix: their files, their settings, their machine's limits.

Everything the package raises about its input is a :class:`UserError` (a ``ValueError``, so code
written against ``ValueError`` keeps working). The command line prints such an error, and an
``OSError``, as one line naming the file and the problem; anything else is a bug in this package or
a library and keeps its traceback (``unetrpp --debug`` shows the traceback of every error).
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with the user's input, files or settings, told in one line that names the file."""


def refuse_unknown_fields(d, cls, before: str, after: str = "") -> None:
    """A one-line error when the mapping ``d`` has keys that are not fields of the dataclass ``cls``
    (a config written by a newer version, or edited): ``before``, the unknown names, ``after``."""
    import dataclasses

    unknown = sorted(map(str, set(d) - {f.name for f in dataclasses.fields(cls)}))
    if unknown:
        raise UserError(before + ", ".join(unknown) + after)
