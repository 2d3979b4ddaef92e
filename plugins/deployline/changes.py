"""Classify a change: infrastructure (bake a new image), application (build), both, or none."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import pathspec

INFRASTRUCTURE, APPLICATION, BOTH, NONE = "infrastructure", "application", "both", "none"
MAX_EARLIER_COMMITS = 200  # earlier commits looked at for infrastructure changes no usable image has


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


@dataclass(frozen=True)
class Change:
    """What a commit changes against what it would reuse: the classification, and since when."""

    classification: Classification
    paths: list[str]
    included: list  # commits no usable release had, newest first (sources.Commit)
    previous_version: str | None  # the build an infrastructure-only commit reuses
    image_version: str | None  # the version that baked the image an application-only commit reuses


def describe_change(source, registry, commit: dict, infrastructure_globs: list[str]) -> Change:
    """Classify ``commit`` against what it would otherwise reuse.

    The application is compared with the newest published build, and the infrastructure with the
    commit that baked the newest usable base image, each of them only if it is not rejected,
    failed or rolled back (``ReleaseRegistry.last_published`` / ``last_good_base_image``). So a
    rejected image is never paired with a later commit's build: the later commit bakes again, and
    the change that went into the image is part of what it releases.
    """
    sha, revision = commit["sha"], commit["revision"]

    def start(found_sha: str | None) -> str | None:
        # Not an ancestor (history rewritten): compare with the whole tree.
        return found_sha if found_sha and source.is_ancestor(found_sha, sha) else None

    previous = registry.last_published(before_revision=revision)
    image = registry.last_good_base_image(before_revision=revision)
    image_record = registry.get(image["version"]) if image and image.get("version") else None
    app_start = start(((previous or {}).get("commit") or {}).get("sha"))
    image_sha = (image or {}).get("commit") or ((image_record or {}).get("commit") or {}).get("sha")
    infra_start = start(image_sha) if image else None

    app_paths = source.changed_paths(app_start, sha)
    infra_paths = app_paths if infra_start == app_start else source.changed_paths(infra_start, sha)
    application = classify(app_paths, infrastructure_globs).application_paths
    infrastructure = classify(infra_paths, infrastructure_globs).infrastructure_paths
    bake = bool(infrastructure) or (image is None and bool(application))  # nothing to reuse: bake
    build = bool(application) or (previous is None and bool(infrastructure))  # nothing to reuse: build
    kind = BOTH if bake and build else INFRASTRUCTURE if bake else APPLICATION if build else NONE

    # What this version releases that no usable release had: the commits since the last usable
    # build, and, when it bakes, the earlier infrastructure commits no usable image has (those of a
    # rejected or failed image).
    included = source.commits_between(app_start, sha)
    if bake and app_start is not None and infra_start != app_start and (
            infra_start is None or source.is_ancestor(infra_start, app_start)):
        spec = pathspec.PathSpec.from_lines("gitignore", infrastructure_globs)
        earlier = source.commits_between(infra_start, app_start)[:MAX_EARLIER_COMMITS]
        included += [c for c in earlier if any(spec.match_file(p) for p in source.paths_of(c.sha))]
    paths = sorted(set(app_paths) | set(infrastructure))
    return Change(Classification(kind, infrastructure, application), paths, included,
                  (previous or {}).get("version"), (image or {}).get("version"))
