"""Any commit of the fleet repo by name, for `reup plan --rev/--base` and `reup check`.

Called by cli/plan.py and cli/check.py. The controller's own mirror (source.py)
follows one branch; a plan looks at any revision (a pull request's head, `HEAD~1`,
`origin/main`), so this keeps a separate bare mirror holding every ref of the
source (and its HEAD, for a CI checkout on a detached commit). Nix evaluates
`git+file://` of that mirror at the exact commit, through a ref pinned to it
(Nix 2.8 wants the commit reachable from the ref it is given). No device is
contacted and nothing is pushed anywhere.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import pygit2

from reup.core.errors import ConfigError, TemporaryError

_PIN = "refs/heads/reup-plan/"


@dataclass(frozen=True)
class CommitInfo:
    commit: str
    author: str
    message: str  # the first line
    time: float


class Revisions:
    def __init__(self, url: str, mirror_dir: str) -> None:
        self.url = url
        self.mirror_dir = mirror_dir
        self._lock = threading.Lock()
        self._fetched = False
        if os.path.isdir(os.path.join(mirror_dir, "objects")):
            self.repo = pygit2.Repository(mirror_dir)
        else:
            self.repo = pygit2.init_repository(mirror_dir, bare=True)
        if "origin" not in [r.name for r in self.repo.remotes]:
            self.repo.remotes.create("origin", url)
        elif self.repo.remotes["origin"].url != url:
            self.repo.remotes.set_url("origin", url)

    @property
    def _local_path(self) -> str | None:
        if "://" not in self.url or self.url.startswith("file://"):
            return self.url.removeprefix("file://")
        return None

    def _fetch(self) -> None:
        if self._fetched:
            return
        specs = ["+refs/heads/*:refs/source/heads/*", "+refs/tags/*:refs/source/tags/*",
                 "+refs/remotes/*:refs/source/remotes/*", "+refs/pull/*:refs/source/pull/*",
                 "+refs/merge-requests/*:refs/source/merge-requests/*",
                 "+refs/pipelines/*:refs/source/pipelines/*"]
        callbacks = None
        if self.url.startswith("ssh://") or "@" in self.url.split("/", 1)[0]:  # as source.py: keys from the agent
            callbacks = pygit2.RemoteCallbacks(credentials=pygit2.KeypairFromAgent("git"))
        try:
            self.repo.remotes["origin"].fetch(specs, callbacks=callbacks)
        except pygit2.GitError as exc:
            raise TemporaryError(f"git fetch {self.url}: {exc}") from exc
        self._fetched = True

    def resolve(self, rev: str) -> str:
        """The commit id `rev` names (a branch, tag, remote branch, `HEAD~1`, an id), fetched into the mirror."""
        with self._lock:
            self._fetch()
            local = self._local_path
            commit: str | None = None
            if local is not None:  # full git rev syntax, against the source itself
                try:
                    src = pygit2.Repository(local)
                    commit = str(src.revparse_single(rev).peel(pygit2.Commit).id)
                except (KeyError, ValueError, pygit2.GitError) as exc:
                    raise ConfigError(f"revision {rev!r}: not found in {self.url}") from exc
                if self.repo.get(commit) is None:  # e.g. a detached HEAD no ref points at: copy its objects
                    self._copy_objects(src, commit)
            else:
                for name in (rev, f"refs/source/heads/{rev}", f"refs/source/tags/{rev}", f"refs/source/remotes/{rev}"):
                    try:
                        commit = str(self.repo.revparse_single(name).peel(pygit2.Commit).id)
                        break
                    except (KeyError, ValueError, pygit2.GitError):
                        continue
                if commit is None:
                    raise ConfigError(f"revision {rev!r}: not found in {self.url}")
            self.repo.references.create(_PIN + commit, pygit2.Oid(hex=commit), force=True)
            return commit

    def _copy_objects(self, src: pygit2.Repository, commit: str) -> None:
        """Copy the objects reachable from `commit` that the mirror lacks (a detached CI checkout)."""
        todo = [pygit2.Oid(hex=commit)]
        while todo:
            oid = todo.pop()
            if self.repo.get(oid) is not None:
                continue
            obj = src.get(oid)
            if obj is None:
                raise ConfigError(f"object {oid} missing in {self.url}")
            self.repo.odb.write(obj.type, obj.read_raw())
            if isinstance(obj, pygit2.Commit):
                todo.append(obj.tree_id)
                todo.extend(obj.parent_ids)
            elif isinstance(obj, pygit2.Tree):
                todo.extend(e.id for e in obj if e.type_str != "commit")

    def _object(self, commit: str) -> pygit2.Object:
        obj = self.repo.get(commit)
        if obj is None:
            raise ConfigError(f"commit {commit} not in {self.mirror_dir}")
        return obj

    def read_file(self, commit: str, path: str) -> str | None:
        with self._lock:
            tree = self._object(commit).peel(pygit2.Tree)
            try:
                entry = tree[path]
            except KeyError:
                return None
            blob = self.repo.get(entry.id)
            assert isinstance(blob, pygit2.Blob)
            return blob.data.decode("utf-8")

    def info(self, commit: str) -> CommitInfo:
        with self._lock:
            c = self._object(commit).peel(pygit2.Commit)
            return CommitInfo(commit, f"{c.author.name} <{c.author.email}>",
                              (c.message.strip().splitlines() or [""])[0], float(c.commit_time))

    def flake_ref(self, commit: str) -> str:
        return f"git+file://{os.path.abspath(self.mirror_dir)}?ref={_PIN}{commit}&rev={commit}"
