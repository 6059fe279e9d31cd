"""`dppa publish`: a merged model to the Hugging Face hub, behind a quality gate."""

from __future__ import annotations

import json
from pathlib import Path

from dppa.cli import add_command

ORDER = 45
HELP = "upload a merged model to the Hugging Face hub (gated by its score; one commit, nothing if unchanged)"

DESCRIPTION = """\
Upload the merged model folder FOLDER (written by `dppa merge` or the pipeline) to the hub repository REPO in one
commit, with huggingface_hub's upload API: the repository is created if missing (--private for a private one), a
missing --revision branch is created from main, and the weights go by LFS. The model card (FOLDER/README.md, or
--card) is uploaded as README.md with `dppa_score` and `dppa_content_hash` added to its front matter.

The gate: with --score S (the merged model's normalised score, e.g. from data/metrics/summary.json), the upload is
refused when S is below --min-score, or below the dppa_score of the card already at the revision (unless
--allow-worse). A refusal is one line and exit status 0 (--fail-if-refused: exit status 3), and nothing is sent.

Publishing the same model and card again makes no commit (files the revision already holds are not sent). A
failure mid-upload commits nothing; run the same command again to finish. The token comes from HF_TOKEN or `hf auth
login`, and is printed or written nowhere. Uploads through git LFS need HF_HUB_DISABLE_XET=1 where the hub (or a
mirror at HF_ENDPOINT) has no Xet storage.

examples:
  dppa publish data/merged/model --repo my-org/llama-dppa-merge --private
  dppa publish data/merged/model --repo my-org/llama-dppa-merge --revision nightly --card data/report/model_card.md \\
      --score 0.93 --min-score 0.8
"""


def register(subparsers) -> None:
    p = add_command(subparsers, "publish", HELP, DESCRIPTION, run)
    p.add_argument("folder", metavar="FOLDER", type=Path, help="merged model folder")
    p.add_argument("--repo", required=True, metavar="ORG/NAME", help="hub repository to publish to")
    p.add_argument("--revision", default="main", metavar="BRANCH", help="branch to commit to (default main)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--card", type=Path, metavar="FILE", help="model card to upload (default FOLDER/README.md)")
    p.add_argument("--score", type=float, metavar="S", help="the merged model's normalised score, for the gate")
    p.add_argument("--min-score", type=float, metavar="S", help="refuse a model that scores below S")
    p.add_argument("--allow-worse", action="store_true", help="publish even below the score already published")
    p.add_argument("--fail-if-refused", action="store_true", help="exit status 3 when the gate refuses")
    p.add_argument("--record", type=Path, metavar="JSON", help="write the result (commit sha, gate) to this file")


def run(args) -> int:
    from dppa.io.atomic import atomic_write_text
    from dppa.pipeline.publish import Gate, publish_model

    card = args.card.read_text() if args.card else None
    result = publish_model(
        args.folder,
        args.repo,
        revision=args.revision,
        private=args.private,
        card=card,
        score=args.score,
        gate=Gate(min_score=args.min_score, no_worse=not args.allow_worse),
    )
    if args.record:
        atomic_write_text(args.record, json.dumps(result.to_dict(), indent=2) + "\n")
    where = f"{result.repo}@{result.revision}"
    print(f"{where}: {result.reason}" + (f" (commit {result.commit})" if result.commit else ""))
    refused = not result.published and result.reason.startswith("refused")
    return 3 if refused and args.fail_if_refused else 0
