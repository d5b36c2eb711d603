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
    except (json.JSONDecodeError, RecursionError):
        raise RecipeError(f"header field {RECIPE_KEY} is not valid JSON", path) from None
    if not isinstance(data, dict) or not isinstance(data.get("sources"), list) or "method" not in data:
        raise RecipeError(f"header field {RECIPE_KEY} is not a loramerge recipe", path)
    return data


