"""Publishing a merged model to the Hugging Face hub, behind a quality gate.

`publish_model` creates the repository if needed (private when asked), reads the card of the model last published
to the revision, and lets the gate decide: the merged model's score (the pipeline's normalised score of the merged
model) must be at least `min_score` and not below the score recorded in that card. Then one commit uploads every
file of the model folder with the card as README.md, through huggingface_hub's upload API (weights by LFS). The
card's front matter records `dppa_score` and `dppa_content_hash` (the merged tensors' hash), which the next publish
reads. huggingface_hub skips files whose content the revision already has, so publishing the same model again
makes no commit. The token comes from huggingface_hub (HF_TOKEN or `hf auth login`) and is printed or written
nowhere.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from dppa.errors import DppaError
from dppa.io.manifest import read_manifest
from dppa.pipeline.hub import token_refusal

CARD = "README.md"
SKIPPED_FILES = {CARD}  # the card is given separately (it carries the score)


@dataclass(frozen=True)
class Gate:
    min_score: float | None = None  # least normalised score of the merged model
    no_worse: bool = True  # refuse a model that scores below the one last published to the revision


@dataclass
class PublishResult:
    repo: str
    revision: str
    published: bool
    commit: str | None
    reason: str
    score: float | None
    previous_score: float | None
    content_hash: str

    def to_dict(self) -> dict:
        return asdict(self)


def _card_with_score(card_text: str, score: float | None, content_hash: str) -> str:
    from huggingface_hub import ModelCard

    card = ModelCard(card_text)
    card.data.dppa_content_hash = content_hash
    if score is not None:
        card.data.dppa_score = round(float(score), 6)
    return str(ModelCard(f"---\n{card.data.to_yaml()}\n---\n{card.text}"))


def _published_card(api, repo: str, revision: str) -> dict:
    """The front matter of the card at `revision` ({} when the repository, revision or card is not there yet)."""
    from huggingface_hub import ModelCard
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    try:
        path = api.hf_hub_download(repo, CARD, revision=revision)
    except (EntryNotFoundError, RevisionNotFoundError):
        return {}
    return ModelCard.load(path).data.to_dict()


def publish_model(
    folder: str | os.PathLike,
    repo: str,
    *,
    revision: str = "main",
    private: bool = False,
    card: str | None = None,
    score: float | None = None,
    gate: Gate = Gate(),
) -> PublishResult:
    """Upload the merged model at `folder` to `repo`@`revision` unless the gate refuses it; `card`: the model card's
    text (default: the folder's README.md)."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import RevisionNotFoundError

    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest.get("kind") != "model" or not manifest.get("content_hash"):
        raise DppaError(f"{folder}: not a model folder written by `dppa merge` (no model manifest); nothing to publish")
    content_hash = manifest["content_hash"]
    if card is None:
        card = (folder / CARD).read_text() if (folder / CARD).exists() else "---\n---\n"
    where = f"{repo}@{revision}"

    def result(published: bool, commit, reason: str, previous=None) -> PublishResult:
        return PublishResult(repo, revision, published, commit, reason, score, previous, content_hash)

    if gate.min_score is not None and (score is None or score < gate.min_score):
        return result(False, None, f"refused by the gate: score {_fmt(score)} is below gate.min_score {gate.min_score}")
    api = HfApi()
    with upload_errors(where):
        api.create_repo(repo, private=private, exist_ok=True)
        try:
            head = api.repo_info(repo, revision=revision).sha
        except RevisionNotFoundError:  # a new branch, from main
            api.create_branch(repo, branch=revision, exist_ok=True)
            head = api.repo_info(repo, revision=revision).sha
        previous = _published_card(api, repo, revision)
        last = previous.get("dppa_score")
        if gate.no_worse and last is not None and (score is None or score < float(last)):
            return result(False, None, f"refused by the gate: score {_fmt(score)} is below the published {last}", last)
        operations = [
            CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p))
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() not in SKIPPED_FILES
        ]
        operations.append(CommitOperationAdd(CARD, _card_with_score(card, score, content_hash).encode()))
        info = api.create_commit(
            repo,
            operations,
            revision=revision,
            commit_message=f"dppa: merged model {content_hash[:12]}" + (f" (score {_fmt(score)})" if score else ""),
        )
    if info.oid == head:
        return result(False, head, "unchanged: the revision already holds this model and card", last)
    return result(True, info.oid, "published", last)


def _fmt(score: float | None) -> str:
    return "none" if score is None else f"{score:.4f}"


@contextlib.contextmanager
def upload_errors(where: str):
    """The hub's and the network's failures during a publish as one line naming repo@revision and what to do."""
    import httpx2
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    token = "set HF_TOKEN to a token with write access" if not os.environ.get("HF_TOKEN") else "check HF_TOKEN"
    try:
        yield
    except OfflineModeIsEnabled:
        raise DppaError(
            f"{where}: the hub is switched off (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE to publish"
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        refusal = token_refusal(where, status, token, "write to")
        if refusal:
            raise DppaError(refusal) from None
        raise DppaError(f"{where}: the hub answered {status} during the upload; run again later") from None
    except (httpx2.HTTPError, ConnectionError, TimeoutError, RuntimeError) as exc:
        network = (httpx2.HTTPError, ConnectionError, TimeoutError)
        cause = exc
        while cause is not None and not isinstance(cause, network):  # huggingface_hub wraps a failed LFS upload
            cause = cause.__cause__
        if cause is None:
            raise
        exc = cause
        raise DppaError(
            f"{where}: the connection to {constants.ENDPOINT} failed during the upload ({type(exc).__name__}); "
            "run again: nothing was committed, and the files already uploaded are not sent twice"
        ) from None
