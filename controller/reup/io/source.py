"""The fleet repo: fetch the watched branch with pygit2, read files at a commit, watch for changes.

Called by the reconcile loop (controller.py) and `reup plan`. The controller keeps
a bare mirror in `<state>/repo.git`; Nix evaluates `git+file://` of that mirror at
an exact revision, so what is evaluated is exactly the commit that was fetched.
For a local repository, `watch` uses watchdog to call back as soon as a ref
changes (the loop then fetches at once); remote repositories are polled and may
be triggered by `POST /webhook` (loop/http.py).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import pygit2

from reup.core.errors import TemporaryError

log = logging.getLogger(__name__)


class GitSource:
    def __init__(self, url: str, branch: str, mirror_dir: str) -> None:
        self.url = url
        self.branch = branch
        self.mirror_dir = mirror_dir
        self._repo: pygit2.Repository | None = None
        self._lock = threading.Lock()

    @property
    def is_local(self) -> bool:
        return "://" not in self.url or self.url.startswith("file://")

    def _callbacks(self) -> pygit2.RemoteCallbacks | None:
        if self.url.startswith("ssh://") or "@" in self.url.split("/", 1)[0]:
            return pygit2.RemoteCallbacks(credentials=pygit2.KeypairFromAgent("git"))
        return None

    def _open(self) -> pygit2.Repository:
        if self._repo is None:
            if os.path.isdir(os.path.join(self.mirror_dir, "objects")):
                self._repo = pygit2.Repository(self.mirror_dir)
                if self._repo.remotes["origin"].url != self.url:
                    self._repo.remotes.set_url("origin", self.url)
            else:
                self._repo = pygit2.init_repository(self.mirror_dir, bare=True)
                self._repo.remotes.create("origin", self.url)
        return self._repo

    def fetch(self) -> str:
        """Fetch the branch; return its head commit id. Network trouble is a TemporaryError."""
        with self._lock:
            try:
                repo = self._open()
                ref = f"refs/heads/{self.branch}"
                repo.remotes["origin"].fetch([f"+{ref}:{ref}"], callbacks=self._callbacks())
                return str(repo.references[ref].target)
            except (pygit2.GitError, KeyError, OSError) as exc:
                raise TemporaryError(f"git fetch {self.url} {self.branch}: {exc}") from exc

    def read_file(self, commit: str, path: str) -> str | None:
        """The text of `path` at `commit`, or None if it is absent."""
        with self._lock:
            repo = self._open()
            obj = repo.get(commit)
            if obj is None:
                raise KeyError(f"commit {commit} not in {self.mirror_dir}")
            tree = obj.peel(pygit2.Tree)
            try:
                entry = tree[path]
            except KeyError:
                return None
            blob = repo.get(entry.id)
            assert isinstance(blob, pygit2.Blob)
            return blob.data.decode("utf-8")

    def commit_time(self, commit: str) -> float:
        with self._lock:
            c = self._open().get(commit)
            return float(c.commit_time) if isinstance(c, pygit2.Commit) else 0.0

    def flake_ref(self, commit: str) -> str:
        return f"git+file://{os.path.abspath(self.mirror_dir)}?ref=refs/heads/{self.branch}&rev={commit}"

    def watch(self, on_change: Callable[[], None]) -> Callable[[], None]:
        """Call `on_change` when a local repository's refs change; returns a stop function."""
        if not self.is_local:
            return lambda: None
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        path = self.url.removeprefix("file://")
        gitdir = os.path.join(path, ".git") if os.path.isdir(os.path.join(path, ".git")) else path

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                names = [str(event.src_path), str(getattr(event, "dest_path", "") or "")]
                if any(("refs" in n or n.endswith(("HEAD", "packed-refs"))) and not n.endswith(".lock") for n in names):
                    on_change()

        observer: Any = Observer()
        observer.schedule(Handler(), gitdir, recursive=True)
        observer.daemon = True
        observer.start()
        log.info("watching %s for ref changes", gitdir)

        def stop() -> None:
            observer.stop()
            observer.join(timeout=2)

        return stop
