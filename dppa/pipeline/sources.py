"""Where a model of params.yaml comes from: the demo zoo, a hub repository at a revision, or a local folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import ValidationInfo, field_validator

from dppa.pipeline.strict import Strict

ZOO_PREFIX = "zoo:"
HUB_PREFIX = "hub:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class Source:
    """Where a model comes from: the demo zoo, a hub repository at a revision, or a local folder."""

    def __init__(self, kind: Literal["zoo", "hub", "local"], ref: str):
        self.kind, self.ref = kind, ref

    def __repr__(self) -> str:
        return f"Source({self.kind}, {self.ref})"


def parse_source(text: str, revision: str | None, root: Path) -> Source:
    """`zoo:<domain>` | `hub:<org>/<name>` or `<org>/<name>` (needs a revision) | a local folder (must exist)."""
    if text.startswith(ZOO_PREFIX):
        return Source("zoo", text[len(ZOO_PREFIX) :])
    local = Path(text).expanduser()
    local = local if local.is_absolute() else root / local
    explicit_hub = text.startswith(HUB_PREFIX)
    repo_id = text[len(HUB_PREFIX) :] if explicit_hub else text
    if explicit_hub or (HUB_ID.match(text) and not local.exists()):
        if not HUB_ID.match(repo_id):
            raise ValueError(f"{text!r} is not a hub id of the form org/name")
        if not revision:
            raise ValueError(
                f"hub model {repo_id!r} needs a `revision`: a commit sha (pinned), or a branch or tag "
                "(followed: `dppa run` refetches it when it moves)"
            )
        return Source("hub", repo_id)
    if not local.is_dir():
        raise ValueError(
            f"no model folder at {local}; give an existing local folder, zoo:<domain> "
            "or a hub id org/name with a revision"
        )
    return Source("local", str(local.resolve()))


def _root(info: ValidationInfo) -> Path:
    return Path((info.context or {}).get("root", "."))


class ModelEntry(Strict):
    revision: str | None = None  # declared first: checking `source` needs it
    source: str

    @field_validator("source")
    @classmethod
    def _source_resolves(cls, value: str, info: ValidationInfo) -> str:
        parse_source(value, info.data.get("revision"), _root(info))
        return value

    def resolve(self, root: Path) -> Source:
        return parse_source(self.source, self.revision, root)
