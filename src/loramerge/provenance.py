"""What a merged file says about how it was made: the recipe in its header (``loramerge.recipe``).

Kept apart from :mod:`.recipe` (which validates YAML and needs the method registry) so that
reading and writing files never depends on the merge machinery.
"""

from __future__ import annotations

import json

from .errors import LoraMergeError

RECIPE_KEY = "loramerge.recipe"  # the header field a merged file carries its recipe in


class RecipeError(LoraMergeError):
    """A recipe that cannot be run; the message names the line and the field."""


def embedded(metadata: dict[str, str], path=None) -> dict | None:
    """The recipe a file's header carries (None when it carries none)."""
    raw = metadata.get(RECIPE_KEY)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise RecipeError(f"header field {RECIPE_KEY} is not valid JSON", path) from None
    problem = _embedded_problem(data)
    if problem:
        raise RecipeError(f"header field {RECIPE_KEY} is not a loramerge recipe ({problem})", path)
    return data


def _embedded_problem(data) -> str | None:
    """What makes a header's recipe unusable (None: nothing)."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if not isinstance(data.get("method"), str):
        return "no method name"
    if not isinstance(data.get("params", {}) or {}, dict) or not isinstance(data.get("output", {}) or {}, dict):
        return "params and output must be objects"
    sources = data.get("sources")
    if not isinstance(sources, list) or not sources:
        return "no list of sources"
    for i, entry in enumerate(sources):
        if not isinstance(entry, dict):
            return f"sources[{i}] is not an object"
        if not isinstance(entry.get("path", ""), str) or not isinstance(entry.get("sha256", ""), str):
            return f"sources[{i}]: path and sha256 must be strings"
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            return f"sources[{i}]: weight must be a number"
    return None


def describe_embedded(metadata: dict[str, str], path=None) -> dict | None:
    """The recipe a file carries, or ``{"invalid": why}`` for a foreign or broken one (what
    ``inspect`` shows instead of failing)."""
    try:
        return embedded(metadata, path)
    except RecipeError as exc:
        return {"invalid": exc.message}


