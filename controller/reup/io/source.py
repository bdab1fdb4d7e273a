"""The fleet repo: fetch the watched branch with pygit2, read files at a commit, watch for changes.

Called by the reconcile loop (controller.py) and `reup plan`. The controller keeps
a bare mirror in `<state>/repo.git`; Nix evaluates `git+file://` of that mirror at
an exact revision, so what is evaluated is exactly the commit that was fetched.
For a local repository, `watch` uses watchdog to call back as soon as a ref
changes (the loop then fetches at once); remote repositories are polled and may
be triggered by `POST /webhook` (loop/http.py). Remote URLs (`ssh://`, `user@host:path`,
`https://`) are fetched by gitfetch.py with the system git, which pins SSH host keys and
carries the configured credentials; local ones are read with pygit2 directly.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any

import pygit2

from reup.core.errors import TemporaryError
from reup.io.gitfetch import FetchReport, GitCredentials, is_ssh_url
from reup.io.gitfetch import fetch as git_fetch

log = logging.getLogger(__name__)


class GitSource:
    def __init__(self, url: str, branch: str, mirror_dir: str, credentials: GitCredentials | None = None) -> None:
        self.url = url
        self.credentials = credentials or GitCredentials()
        self.last_report: FetchReport | None = None
        self.branch = branch
        self.mirror_dir = mirror_dir
        self._repo: pygit2.Repository | None = None
        self._lock = threading.Lock()

    @property
    def is_local(self) -> bool:
        return not (is_ssh_url(self.url) or self.url.startswith(("http://", "https://", "git://")))

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
        """Fetch the branch; return its head commit id.

        Network trouble is a TemporaryError; an untrusted server or refused credentials a
        `gitfetch.SourceRefused` (permanent, nothing fetched).
        """
        if self.is_local:
            path = self.url.removeprefix("file://")
            if not os.path.isdir(path) or pygit2.discover_repository(path) is None:
                raise TemporaryError(f"not a git repository: {path}")
        with self._lock:
            if not self.is_local:
                self._open()
                self.last_report = git_fetch(self.url, self.branch, self.mirror_dir, self.credentials)
                return self.last_report.commit
            ref = f"refs/heads/{self.branch}"
            try:
                repo = self._open()
                repo.remotes["origin"].fetch([f"+{ref}:{ref}"])
            except (pygit2.GitError, KeyError, OSError) as exc:
                if "couldn't find remote ref" in str(exc):
                    raise TemporaryError(f"no branch {self.branch!r} in {self.url}") from exc
                raise TemporaryError(f"git fetch {self.url} {self.branch}: {exc}") from exc
            if ref not in repo.references:
                raise TemporaryError(f"no branch {self.branch!r} in {self.url}")
            return str(repo.references[ref].target)

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

    def commit_summary(self, commit: str) -> tuple[str, str]:
        """(author, first line of the message) of `commit`, for the fleet page."""
        with self._lock:
            c = self._open().get(commit)
            if not isinstance(c, pygit2.Commit):
                return "", ""
            return f"{c.author.name} <{c.author.email}>", (c.message.strip().splitlines() or [""])[0]

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
                # Reads are no change: our own fetch opens the refs, and reacting to that would fetch forever.
                if event.event_type in ("opened", "closed_no_write"):
                    return
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
