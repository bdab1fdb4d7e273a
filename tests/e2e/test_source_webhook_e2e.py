"""End-to-end: a private fleet repo on a real git server, a webhook, the controller, a device.

One test per transport: the controller (a real `reup run` process) fetches over ssh:// from
OpenSSH + git-shell with a deploy key and a pinned host key, or over https:// from git http-backend
with a token and a CA file, both configured the way the chart mounts its git-credentials Secret
(`[source] credentials_dir`, one file per key). A new commit is announced by `POST /webhook` (the
poll interval is 10 minutes, so only the webhook can explain the prompt update).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

from reup_lab.simdevice import generate_key
from support.gitservers import HttpsGitServer, SshGitServer, run_git
from support.sshd import Lab, api_status, controller_session, post, states, wait_for

TOKEN = "github_pat_e2e_0123456789"


def credentials_dir(base: str, files: dict[str, str]) -> str:
    """The chart's Secret volume: one read-only file per key."""
    path = os.path.join(base, "git-credentials")
    os.makedirs(path, exist_ok=True)
    for name, src in files.items():
        dst = os.path.join(path, name)
        if os.path.exists(src):
            shutil.copyfile(src, dst)
        else:
            with open(dst, "w", encoding="utf-8") as f:
                f.write(src)
        os.chmod(dst, 0o440)
    return path


def point_source_at(lab: Lab, url: str, creds: str) -> None:
    with open(lab.config_path, encoding="utf-8") as f:
        text = f.read()
    old = f'url = "{lab.repo}"\n'
    assert old in text
    with open(lab.config_path, "w", encoding="utf-8") as f:
        f.write(text.replace(old, f'url = "{url}"\ncredentials_dir = "{creds}"\n'))


def rollout_through_webhook(lab: Lab, publish: Callable[[], object]) -> None:
    c1 = lab.commit("first", {"d1": "1"})
    publish()
    with controller_session(lab, start=True, stop_lab=False):
        wait_for(lambda: api_status(lab)["revision"] == c1 and states(api_status(lab)) == {"d1": "in_sync"},
                 120, "first commit on d1")
        c2 = lab.commit("second", {"d1": "2"})
        publish()
        assert post(lab, "/webhook") == 202
        wait_for(lambda: api_status(lab)["revision"] == c2 and states(api_status(lab)) == {"d1": "in_sync"},
                 60, "webhook-triggered update of d1")
        assert [line.split()[-1] for line in lab.activations("d1")][-1] == "2"


def test_ssh_deploy_key_webhook_to_device(tmp_path: os.PathLike[str]) -> None:
    lab = Lab(str(tmp_path), ["d1"], poll_interval=600)
    server = SshGitServer()
    try:
        lab.start()
        key = os.path.join(lab.base, "deploy_key")
        server.authorize(generate_key(key))
        bare = server.repo()
        server.start()
        creds = credentials_dir(lab.base, {"ssh_key": key, "known_hosts": server.known_hosts()})
        point_source_at(lab, server.url(), creds)

        def publish() -> None:
            run_git("push", "-q", bare, "main", cwd=lab.repo)
            server.publish()

        rollout_through_webhook(lab, publish)
    finally:
        server.stop()
        lab.stop()


def test_https_token_webhook_to_device(tmp_path: os.PathLike[str]) -> None:
    lab = Lab(str(tmp_path), ["d1"], poll_interval=600)
    server = HttpsGitServer(os.path.join(str(tmp_path), "https"), user="deploy", token=TOKEN)
    try:
        lab.start()
        bare = server.repo()
        server.start()
        creds = credentials_dir(lab.base, {"username": "deploy", "token": TOKEN, "ca_file": server.ca_file})
        point_source_at(lab, server.url(), creds)
        rollout_through_webhook(lab, lambda: run_git("push", "-q", bare, "main", cwd=lab.repo) and None)
    finally:
        server.stop()
        lab.stop()
