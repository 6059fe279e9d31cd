"""`dppa store`: list the models store (hub models kept outside DVC, one folder per commit) and clean what the
projects no longer use."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from dppa.cli import add_command
from dppa.errors import DppaError
from dppa.io.manifest import read_manifest
from dppa.pipeline.hub import COMMIT_SHA, RECORD
from dppa.pipeline.models_store import STORE_HASHES, STORE_LOCK, models_store, shared_store, store_folder, store_lock

ORDER = 9
HELP = "list the models store (hub models, one folder per commit) and clean the commits no project uses"

# Where a project's fetch stages write their records (dvc.yaml: `--out data/models/fetched/NAME`).
FETCHED = "data/models/fetched"
# Folders a download left beside a commit's folder: fetch_hub's staging (`.COMMIT.download-SHORT`) and
# atomic_dir's temporary and set-aside folders (`.COMMIT.tmp-*`, `.COMMIT.old-*`).
LEFTOVER = re.compile(r"^\.(?P<commit>[0-9a-f]{40})\.(download|tmp|old)-")

DESCRIPTION = """\
The models store holds the hub models of every dppa project on this machine, outside DVC: $DPPA_MODELS_DIR, else
~/.cache/dppa/models, one folder per commit (STORE/org--name/COMMIT/, with .COMMIT.lock and .COMMIT.sha256.json
beside it). A project's fetch records (data/models/fetched/NAME/dppa_fetch.json) name the commits it uses; a
commit that no record names any more (the branch moved, the model was replaced in params.yaml) stays in the store
until it is cleaned. Removing a commit loses nothing that cannot be had again: a stage that needs it downloads the
recorded commit from the hub anew.

  dppa store list [-C PROJECT ...]     one row per commit: repository, commit, size, last use, and (with -C)
                                       whether one of the projects uses it; then leftover download folders
  dppa store clean -C PROJECT ...      remove the commits (and leftover downloads) that none of the projects uses

Run `dppa store ACTION --help` for the options of each.
"""

LIST_DESCRIPTION = """\
List the models store: one row per commit folder with its repository, commit (12 characters), size on disk (the
sum of its files' sizes), last use, and, when projects are given with -C, whether one of them uses it (a fetch
record data/models/fetched/NAME/dppa_fetch.json of kind hub names that repository and commit). Then the leftover
folders of interrupted downloads (.COMMIT.download-*), which the next download of that commit resumes.

Last use is the newest modification time of the commit's files, its hash cache and its lock file, which every
stage that uses the commit touches.

examples:
  dppa store list                                  # the store at $DPPA_MODELS_DIR, else ~/.cache/dppa/models
  dppa store list -C ~/merges/llama -C ~/merges/qwen   # which commits these two projects use
"""

CLEAN_DESCRIPTION = """\
Remove from the models store every commit folder (with its .COMMIT.lock and .COMMIT.sha256.json) and every
leftover download folder that none of the projects given with -C uses. Only the records in each project's
workspace count (data/models/fetched/NAME/dppa_fetch.json): a commit that another git branch or an older dvc.lock
names is removed too, and downloaded again from the hub by the stage that needs it.

Without -C nothing is removed (dppa cannot know which commits are in use): pass every project that uses the
store, or --all to remove everything. --older-than DAYS keeps what was used in the last DAYS days (last use: see
`dppa store list`), so a project you did not name keeps what it used recently.

Each commit is removed under its lock, the one a stage holds while it downloads or checks that commit: a commit
whose lock is held is skipped ("in use, skipped"), never removed half-way. The folder is first renamed aside, so
a stage never sees it half-removed. --dry-run prints what would be removed and the space freed, and removes
nothing.

examples:
  dppa store clean -C . --dry-run                  # what this project does not use, and the space it would free
  dppa store clean -C ~/merges/llama -C ~/merges/qwen --older-than 30
  dppa store clean --all                           # empty the store: every model is downloaded again when needed
"""


@dataclass
class Commit:
    """One commit of the store: its folder (when present) and the leftover folders of its downloads."""

    repo_dir: Path
    commit: str
    folder: Path | None = None
    leftovers: list[Path] = field(default_factory=list)

    @property
    def lock(self) -> Path:
        return self.repo_dir / STORE_LOCK.format(commit=self.commit)

    @property
    def hashes(self) -> Path:
        return self.repo_dir / STORE_HASHES.format(commit=self.commit)

    @property
    def repo_id(self) -> str:
        if self.folder is not None and (hub_id := read_manifest(self.folder).get("hub_id")):
            return hub_id
        return self.repo_dir.name.replace("--", "/", 1)

    @property
    def name(self) -> str:
        return f"{self.repo_id}@{self.commit[:12]}"

    def last_use(self) -> float:
        times = [tree_usage(p)[1] for p in [*([self.folder] if self.folder else []), *self.leftovers]]
        times += [p.lstat().st_mtime for p in (self.lock, self.hashes) if p.exists()]
        return max(times, default=0.0)


def tree_usage(path: Path) -> tuple[int, float]:
    """The sum of the sizes of the files under `path` (links not followed) and the newest modification time."""
    size, newest = 0, path.lstat().st_mtime
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            newest = max(newest, st.st_mtime)
            if stat.S_ISREG(st.st_mode):
                size += st.st_size
    return size, newest


def scan(store: Path) -> list[Commit]:
    """Every commit of the store that has a folder, a leftover download folder, a lock or a hash cache."""
    if not store.is_dir():
        return []
    return [c for d in sorted(store.iterdir()) if d.is_dir() and not d.is_symlink() for c in scan_repo(d)]


def scan_repo(repo_dir: Path) -> list[Commit]:
    commits: dict[tuple[Path, str], Commit] = {}
    if repo_dir.is_dir():
        for entry in sorted(repo_dir.iterdir()):
            name, is_dir = entry.name, entry.is_dir() and not entry.is_symlink()
            if COMMIT_SHA.match(name) and is_dir:
                commits.setdefault((repo_dir, name), Commit(repo_dir, name)).folder = entry
            elif (m := LEFTOVER.match(name)) and is_dir:
                commits.setdefault((repo_dir, m["commit"]), Commit(repo_dir, m["commit"])).leftovers.append(entry)
            elif name in (STORE_LOCK.format(commit=name[1:41]), STORE_HASHES.format(commit=name[1:41])):
                if COMMIT_SHA.match(name[1:41]):  # a lock or hash cache whose folder was deleted by hand
                    commits.setdefault((repo_dir, name[1:41]), Commit(repo_dir, name[1:41]))
    return list(commits.values())


def used_folders(projects: list[str], store: Path) -> set[Path]:
    """The store folders of the hub commits that the projects' fetch records name."""
    used = set()
    for project in map(Path, projects):
        if not project.is_dir():
            raise DppaError(f"{project}: no such project folder; pass with -C the root of a project using the store")
        if not (project / "dvc.yaml").exists() and not (project / FETCHED).is_dir():
            raise DppaError(
                f"{project}: not a dppa project (no dvc.yaml, no data/models/fetched); pass with -C the root of a "
                "project using the store"
            )
        for path in sorted((project / FETCHED).glob(f"*/{RECORD}")):
            try:
                record = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise DppaError(
                    f"{path}: invalid JSON ({exc}); rerun its fetch stage (dvc repro --force --single-item "
                    f"fetch@{path.parent.name}) so that its commit is known"
                ) from None
            if record.get("kind") == "hub":
                used.add(store_folder(record["source"], record["commit"], store))
    return used


def format_size(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e9 else f"{size / 1e6:.2f} MB"


def format_time(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(seconds))


def store_root(args) -> Path:
    return Path(args.store).expanduser().absolute() if args.store else models_store()


def run_list(args) -> int:
    store = store_root(args)
    used = used_folders(args.project, store) if args.project else None
    commits = sorted(scan(store), key=lambda c: (c.repo_id, -c.last_use()))
    rows = [c for c in commits if c.folder is not None]
    total = 0
    print(f"models store {store}: {len(rows)} commit folder(s)")
    if rows:
        width = max(len(c.repo_id) for c in rows)
        head = f"{'REPOSITORY':<{width}}  {'COMMIT':<12}  {'SIZE':>10}  {'LAST USE':<16}"
        print(head + ("  USED BY -C" if used is not None else ""))
        for c in rows:
            size = tree_usage(c.folder)[0]
            total += size
            line = f"{c.repo_id:<{width}}  {c.commit[:12]}  {format_size(size):>10}  {format_time(c.last_use())}"
            print(line + (f"  {'yes' if c.folder in used else 'no'}" if used is not None else ""))
    leftovers = [p for c in commits for p in c.leftovers]
    if leftovers:
        print("leftover download folders (resumed by the next download of that commit, or removed by clean):")
        for path in leftovers:
            size = tree_usage(path)[0]
            total += size
            print(f"  {path.relative_to(store)}  {format_size(size)}  {format_time(tree_usage(path)[1])}")
    print(f"total {format_size(total)}")
    return 0


def run_clean(args) -> int:
    from filelock import Timeout

    if not args.project and not args.all:
        raise DppaError(
            "which commits are in use is unknown: pass with -C every project that uses the store "
            "(dppa store clean -C PROJECT ...), or --all to remove everything"
        )
    if args.project and args.all:
        raise DppaError("-C and --all contradict each other: -C keeps what the projects use, --all keeps nothing")
    store = store_root(args)
    shared = shared_store(store)
    used = used_folders(args.project, store)
    cutoff = time.time() - args.older_than * 86400 if args.older_than is not None else None
    freed = kept = skipped = 0
    for c in sorted(scan(store), key=lambda c: (c.repo_id, c.commit)):
        if c.repo_dir / c.commit in used or (cutoff is not None and c.last_use() > cutoff):
            kept += c.folder is not None
            continue
        if args.dry_run:
            freed += report(c, "would remove")
            continue
        lock = store_lock(c.lock, shared)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"{c.name}: in use, skipped (a running stage holds {c.lock})")
            skipped += 1
            continue
        try:
            # what a stage did between the scan and the lock: downloaded the folder, or used the commit
            c = next(n for n in scan_repo(c.repo_dir) if n.commit == c.commit)
            if cutoff is not None and c.last_use() > cutoff:
                kept += c.folder is not None
                continue
            freed += report(c, "removed", remove=True)
        finally:
            lock.release()
        with contextlib.suppress(OSError):
            c.repo_dir.rmdir()  # its last commit is gone
    tail = f", {skipped} in use" if skipped else ""
    print(f"{'would free' if args.dry_run else 'freed'} {format_size(freed)}; kept {kept} commit(s){tail}")
    return 0


def report(c: Commit, verb: str, *, remove: bool = False) -> int:
    """Print the commit's line (none for a lock and hash cache left alone), remove it if asked; its size."""
    parts = [p for p in [c.folder, *c.leftovers] if p is not None]
    size = sum(tree_usage(p)[0] for p in parts)
    if parts:
        print(f"{verb} {c.name}{'' if c.folder else ' (leftover download)'}: {format_size(size)}")
    if remove:
        for path in parts:
            # renamed aside first: a stage sees the folder whole or absent, never half-removed
            aside = path.with_name(f".{c.commit}.old-clean-{os.getpid()}") if path == c.folder else path
            os.replace(path, aside)
            shutil.rmtree(aside)
        c.hashes.unlink(missing_ok=True)
        c.lock.unlink(missing_ok=True)  # while held: filelock retries a lock file unlinked under a waiter
    return size


def register(subparsers) -> None:
    p = add_command(subparsers, "store", HELP, DESCRIPTION, lambda args: p.print_help() or 2)
    actions = p.add_subparsers(dest="action", metavar="ACTION")

    def action(name: str, help: str, description: str, func) -> argparse.ArgumentParser:
        """A store action with the options every action takes (--store, -C)."""
        parser = add_command(actions, name, help, description, func)
        parser.add_argument(
            "--store", metavar="DIR", help="the models store (default: $DPPA_MODELS_DIR, else ~/.cache/dppa/models)"
        )
        parser.add_argument(
            "-C",
            dest="project",
            action="append",
            default=[],
            metavar="PROJECT",
            help="a project using the store (its root folder); repeat for each project",
        )
        return parser

    action("list", "commits with size, last use, and whether the projects use them", LIST_DESCRIPTION, run_list)
    clean = action("clean", "remove the commits no given project uses", CLEAN_DESCRIPTION, run_clean)
    clean.add_argument("--all", action="store_true", help="remove every commit (instead of -C)")
    clean.add_argument(
        "--older-than",
        type=float,
        metavar="DAYS",
        help="remove only what was not used in the last DAYS days",
    )
    clean.add_argument("--dry-run", action="store_true", help="print what would be removed and the space freed")
