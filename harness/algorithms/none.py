"""``none``: the unedited baseline. Touches nothing, so a sweep can carry the pre-edit model."""
from __future__ import annotations

from harness.algorithms.base import EditAlgorithm, register
from harness.types import EditReport


@register("none")
class NoEdit(EditAlgorithm):
    """Declares no targets and writes nothing."""

    def targets(self, model, requests) -> set[str]:
        return set()

    def apply(self, model, tok, requests) -> EditReport:
        return EditReport()
