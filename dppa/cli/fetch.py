"""`dppa fetch`: a model from the Hugging Face hub at a revision, with the commit it resolved to recorded."""

from __future__ import annotations

from pathlib import Path

from dppa.cli import add_command

ORDER = 8
HELP = "download a model from the Hugging Face hub at a revision (safetensors only; commit recorded)"

DESCRIPTION = """\
Download REPO_ID (org/name) at REVISION from the Hugging Face hub into the model folder OUT, with
huggingface_hub: the safetensors weights, configs and tokenizer files only.

REVISION is a branch, a tag or a commit sha. A branch or tag is resolved to the commit it points at now, and that
commit is what is downloaded and recorded in OUT/dppa_manifest.json (hub_id, revision, resolved_commit, and each
file's size and sha256, checked against the hub's hashes). A commit sha gets exactly that commit. The commands that
read OUT (extract, merge) copy this provenance into their own manifests.

Safety: a repository with only pickled weights (*.bin, *.pt) is refused, because loading a pickle runs code;
--allow-pickle downloads them (then pass --allow-pickle to extract/merge too). Where safetensors exist, pickles are
never downloaded.

Interruptions: files are downloaded into .OUT.download-COMMIT beside OUT, then moved into OUT in one rename, so OUT
is complete or absent. Run the same command again after a failure: finished files are kept, and a dropped
connection within a file resumes where it stopped.

Access: a private or gated repository needs a token: HF_TOKEN (or `hf auth login`). The token is sent to the hub
only, and written to no file or log. HF_ENDPOINT points at another hub (a mirror); HF_HUB_OFFLINE=1 forbids
downloads. Failures (unknown repository or revision, refused token, no network) are one line naming
REPO_ID@REVISION and what to do; exit status 2.

In the pipeline, a hub model is `{source: org/name, revision: REV}` in params.yaml, fetched by the same code into
the models store, outside DVC: $DPPA_MODELS_DIR, else ~/.cache/dppa/models, one folder per commit
(STORE/org--name/COMMIT). The fetch stage's DVC output is only the record (commit, files, sha256), so DVC never
caches or pushes the model; a stage that needs a model missing from the store (after `dvc pull` on another machine)
downloads the recorded commit first. With a branch or tag, `dppa run` and `dppa serve` ask the hub on every run
where it points and refetch when it moved, which reruns that model's branch of the pipeline and the merge (plain
`dvc repro` does not ask the hub).

examples:
  dppa fetch meta-llama/Llama-3.1-8B --revision main -o models/llama-3.1-8b
  dppa fetch org/model --revision 0123456789abcdef0123456789abcdef01234567 -o models/model   # a pinned commit
  HF_TOKEN=hf_... dppa fetch org/private-model --revision v1.0 -o models/private
"""


def register(subparsers) -> None:
    p = add_command(subparsers, "fetch", HELP, DESCRIPTION, run)
    p.add_argument("repo_id", metavar="REPO_ID", help="hub repository, org/name")
    p.add_argument("--revision", required=True, metavar="REV", help="branch, tag or commit sha")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="model folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (refused otherwise)")
    p.add_argument(
        "--allow-pickle", action="store_true", help="accept a repository with only pickled weights (can run code!)"
    )


def run(args) -> int:
    from dppa.pipeline.hub import fetch_hub

    manifest = fetch_hub(
        args.repo_id, args.revision, Path(args.output), allow_pickle=args.allow_pickle, overwrite=args.overwrite
    )
    size = sum(f["size"] for f in manifest["files"])
    print(
        f"{args.repo_id}@{args.revision} = commit {manifest['resolved_commit']}: {len(manifest['files'])} files, "
        f"{size / 1e6:.1f} MB in {args.output}"
    )
    return 0
