"""Model aliases with fallbacks (docs/aliases.md): an admin names a list of models, and
a request for the alias runs on the first member a live node serves.

A job asked of an alias is stored as a job of that member (its `model`, and the `model`
of the request a node gets), with the alias kept in its metadata under ALIAS_KEY. When
the member fails it with a retryable error, or the job waits queued `wait_seconds` while
no live node serves the member, the job moves to the next member a live node serves
(Store.move_job): the same job, so the client still waits on one id, and its `model`
then names the member that answered, as OpenAI's responses do. Aliases do not nest
(settings.check_aliases), so a job tries each member at most once, in order.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from openbeepboop.server.models import JSON, Job

ALIAS_KEY = "openbeepboop.alias"  # in a job's metadata: the alias it was asked of
MOVE_LIMIT = 100  # stranded jobs moved per alias member and reaper pass


@dataclass(frozen=True, slots=True)
class Aliases:
    """The aliases of a server: name -> members, in the order they are tried."""

    members: Mapping[str, Sequence[str]] = field(default_factory=dict)
    wait_seconds: float = 30.0  # a queued job stranded on an unserved member moves after

    def __bool__(self) -> bool:
        return bool(self.members)

    def resolve(self, body: JSON, metadata: JSON | None, served: Collection[str]) -> Asked:
        """What a request for `body["model"]` runs as: for an alias, the body and
        metadata of its first member that is in `served` (else of its first member);
        otherwise the request unchanged (any ALIAS_KEY a client wrote in its metadata
        dropped: only the server sets it)."""
        clean = _without_alias(metadata)
        model = body.get("model")
        members = self.members.get(model) if isinstance(model, str) else None
        if not members:
            return Asked(body, clean, None)
        member = next((m for m in members if m in served), members[0])
        return Asked({**body, "model": member}, {**(clean or {}), ALIAS_KEY: model}, model)

    def alias_of(self, job: Job) -> str | None:
        """The alias `job` was asked of, if it is still configured."""
        alias = alias_of(job.metadata)
        return alias if alias in self.members else None

    def next_member(self, job: Job, served: Collection[str]) -> str | None:
        """The member after `job.model` (in its alias) that a live node serves, else
        None (the last member, or none later served)."""
        alias = self.alias_of(job)
        if alias is None:
            return None
        members = list(self.members[alias])
        later = members[members.index(job.model) + 1 :] if job.model in members else []
        return next((m for m in later if m in served), None)

    def stranded(self, served: Collection[str]) -> list[tuple[str, str]]:
        """(alias, member) pairs whose member no live node serves while a later member
        of the alias is served: where queued jobs may be stranded."""
        pairs = []
        for alias, members in self.members.items():
            for i, member in enumerate(members):
                if member not in served and any(m in served for m in members[i + 1 :]):
                    pairs.append((alias, member))
        return pairs


@dataclass(frozen=True, slots=True)
class Asked:
    """A request after alias resolution: the body and metadata to store, and the alias
    it was asked of (None: not an alias)."""

    body: JSON
    metadata: JSON | None
    alias: str | None


def moved_request(job: Job, member: str) -> JSON:
    """The request of `job` as the next member's node gets it."""
    return {**job.request, "model": member}


def alias_of(metadata: JSON | None) -> str | None:
    """The alias a job was asked of, from its metadata (None: not an alias's job)."""
    alias = (metadata or {}).get(ALIAS_KEY)
    return alias if isinstance(alias, str) else None


def public_metadata(metadata: JSON | None) -> JSON | None:
    """A job's metadata as its owner wrote it (the alias bookkeeping left out)."""
    return _without_alias(metadata)


def _without_alias(metadata: JSON | None) -> JSON | None:
    if not metadata or ALIAS_KEY not in metadata:
        return metadata
    return {k: v for k, v in metadata.items() if k != ALIAS_KEY} or None
