"""What reading an export folder raises: :class:`ModelFormatError`, and the helpers that word it.

Every reader of an export folder (``mind.serve.load``, the native model reader in
:mod:`mind.export.native`, the aoti / onnx tower loader in :mod:`mind.export.load`) reports a
missing, damaged or foreign file as a ``ModelFormatError`` whose message names the file and the
problem (the CLI prints it as one ``error:`` line).  ``mind.serve`` re-exports these names.
"""

from __future__ import annotations

import json
import pathlib

EXPORT_HINT = "create one with `python -m mind export --checkpoint RUN/best.pt --out FOLDER`"


class ModelFormatError(ValueError):
    """A model folder that is missing, is not a MIND export, or holds a damaged file; the message
    names the folder or file and the problem."""


def first_line(exc: BaseException, limit: int) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type's name:
    a runtime's multi-line error quoted in one ``error:`` line."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def read_json(path: pathlib.Path, what: str):
    """The JSON content of ``path`` (``what``: the file's role, for the message); ModelFormatError
    when it is missing, not UTF-8 or not valid JSON."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ModelFormatError(f"{path} is missing: the export is incomplete ({EXPORT_HINT})")
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError:
        raise ModelFormatError(f"{path} is corrupt: not UTF-8 text ({what})") from None
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{path} is corrupt: not valid JSON ({e.msg} at line {e.lineno}, "
                               f"column {e.colno}); re-export the model") from None
