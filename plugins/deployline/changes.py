"""Classify a change: infrastructure (bake a new image), application (build), both, or none."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pathspec

INFRASTRUCTURE, APPLICATION, BOTH, NONE = "infrastructure", "application", "both", "none"


@dataclass(frozen=True)
class Classification:
    kind: str
    infrastructure_paths: list[str]
    application_paths: list[str]

    @property
    def bake(self) -> bool:
        return self.kind in (INFRASTRUCTURE, BOTH)

    @property
    def build(self) -> bool:
        return self.kind in (APPLICATION, BOTH)

    def to_dict(self) -> dict:
        return asdict(self)


def classify(changed_paths: list[str], infrastructure_globs: list[str]) -> Classification:
    spec = pathspec.PathSpec.from_lines("gitignore", infrastructure_globs)
    infra = [p for p in changed_paths if spec.match_file(p)]
    app = [p for p in changed_paths if not spec.match_file(p)]
    kind = BOTH if infra and app else INFRASTRUCTURE if infra else APPLICATION if app else NONE
    return Classification(kind, infra, app)
