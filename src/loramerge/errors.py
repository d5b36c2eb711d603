"""Errors a user can act on: each renders as one line naming the file and the problem."""

from __future__ import annotations

import os
import re

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text: str) -> str:
    """``text`` on one line, literally: control characters (newlines included) as escapes, and
    lone surrogates (from undecodable names) as ``\\udXXX`` so that any stream can print it."""
    flat = _CONTROL.sub(lambda m: repr(m.group())[1:-1] if m.group() not in "\u2028\u2029"
                        else f"\\u{ord(m.group()):04x}", str(text))
    return flat.encode("utf-8", "backslashreplace").decode("utf-8")


class LoraMergeError(Exception):
    """Base class. ``str(err)`` is the one-line message the CLI prints (exit code 2)."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.message = message
        self.path = os.fspath(path) if path is not None else None
        super().__init__(self.__str__())

    def __str__(self) -> str:
        text = one_line(" ".join(str(self.message).split()))  # always one line
        return f"{one_line(self.path)}: {text}" if self.path else text


class FileFormatError(LoraMergeError):
    """The file is not a readable safetensors file (truncated, bad header, …)."""


class NotALoraError(LoraMergeError):
    """The file is readable but holds no LoRA, or keys that cannot be placed."""


class UnsupportedModuleError(LoraMergeError):
    """A module type that cannot be turned into an exact delta (e.g. DoRA without a base)."""


class ArchitectureMismatchError(LoraMergeError):
    """Inputs that belong to different model architectures."""


class ShapeMismatchError(LoraMergeError):
    """The same module has different shapes in two inputs."""


class NonFiniteError(LoraMergeError):
    """NaN or Inf values in a tensor."""


class OutputPathError(LoraMergeError):
    """The output location is unusable (equals an input, not writable, …)."""


class UsageError(LoraMergeError):
    """Bad arguments (unknown method, rank and energy both given, …)."""


class AmbiguousArchitectureError(NotALoraError):
    """Keys and shapes fit several architectures and nothing in the file decides."""

    def __init__(self, message: str, path=None, candidates: tuple[str, ...] = ()):
        self.candidates = tuple(candidates)
        super().__init__(message, path)


class LoraMergeWarning(UserWarning):
    """Something a user should know that does not stop the command (printed as one line)."""


class ClientWarning(LoraMergeWarning):
    """A file that loads, but not exactly, in some client (one line: the client, what differs,
    and the format that avoids it). The command line prints these as ``warning:`` lines."""
