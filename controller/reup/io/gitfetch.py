"""Fetching a remote fleet repo safely with the system git: pinned SSH host keys, deploy keys, tokens, CA files.

Called by source.py (`GitSource.fetch` for `ssh://`, `user@host:path` and `http(s)://` URLs) and by
`reup source test`. Local repositories are still read with pygit2 (source.py).

Why the `git` command and not pygit2 here: pygit2's `certificate_check` callback receives no SSH host
key (the certificate is always None) and libgit2 consults only `~/.ssh/known_hosts`, so a pinned
known_hosts cannot be enforced through it. OpenSSH enforces one exactly: `StrictHostKeyChecking=yes`
against a `UserKnownHostsFile` holding only the configured keys, with `-F /dev/null` so no user ssh
config can loosen it. HTTPS goes through git's libcurl with `http.sslCAInfo` and a one-shot askpass
program reading the password or token file, so no secret is ever on a command line or in git config.

Failures are sorted by what stderr says: a host key that changed, an unknown host, refused
credentials and an untrusted TLS certificate are `SourceRefused` (permanent: retrying cannot help and
nothing was fetched); anything else (connection refused, DNS, timeouts) is a `TemporaryError`.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from reup.config.reup_toml import SourceConfig
from reup.core.errors import PermanentError, TemporaryError

# Result labels of reup_git_fetches_total besides "success" and "error" (temporary).
REFUSED_RESULTS = ("host_key_mismatch", "host_key_unknown", "auth_failed", "tls_untrusted")
TOKEN_USERNAME = "x-access-token"  # what GitHub expects with a token; GitLab accepts any non-empty name


@dataclass(frozen=True)
class GitCredentials:
    """What `[source]` says about reaching a remote repository (see docs/controller.md)."""

    ssh_key: str | None = None  # path of a private key (deploy key); None: the ssh-agent, if any
    known_hosts: str | None = None  # known_hosts lines, or the path of a known_hosts file
    insecure_skip_host_key_check: bool = False
    username: str | None = None  # when the URL names none
    password_file: str | None = None
    token_file: str | None = None
    ca_file: str | None = None  # PEM bundle trusted for https:// instead of the system's


def credentials_from(src: SourceConfig) -> GitCredentials:
    return GitCredentials(ssh_key=src.ssh_key, known_hosts=src.known_hosts,
                          insecure_skip_host_key_check=src.insecure_skip_host_key_check, username=src.username,
                          password_file=src.password_file, token_file=src.token_file, ca_file=src.ca_file)


class SourceRefused(PermanentError):
    """The remote could not be trusted or refused us: nothing was fetched. `result` is a metric label."""

    def __init__(self, message: str, result: str) -> None:
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class FetchReport:
    commit: str
    transport: str  # "ssh" or "https" (or "http")
    auth: str  # how we authenticated, e.g. 'publickey (agent)', 'basic (token_file)', 'none'
    host_key: str | None = None  # "ssh-ed25519 SHA256:..." as the server presented it (ssh only)


def is_ssh_url(url: str) -> bool:
    if url.startswith("ssh://"):
        return True
    head = url.split("/", 1)[0]
    return "://" not in url and ":" in head and "@" in head


def url_user(url: str) -> str | None:
    """The user name an URL carries (`ssh://user@host/...`, `user@host:path`, `https://user@host/...`)."""
    rest = url.split("://", 1)[1] if "://" in url else url
    authority = rest.split("/", 1)[0]
    if "@" not in authority:
        return None
    return authority.rsplit("@", 1)[0].split(":", 1)[0] or None


_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"REMOTE HOST IDENTIFICATION HAS CHANGED|host key for .* has changed", "host_key_mismatch"),
    (r"host key is known for|Host key verification failed|No matching host key", "host_key_unknown"),
    (r"Permission denied \(|Authentication failed for|could not read (Username|Password)|"
     r"The requested URL returned error: 40[13]|Too many authentication failures", "auth_failed"),
    (r"SSL certificate problem|server certificate verification failed|certificate verify failed|"
     r"self[- ]signed certificate|unable to get local issuer certificate", "tls_untrusted"),
)

_EXPLAIN = {
    "host_key_mismatch": "the git server's host key does not match the pinned known_hosts: refusing to fetch "
                         "(if the server's key really changed, update [source] known_hosts)",
    "host_key_unknown": "the git server's host key is not in the pinned known_hosts: refusing to fetch "
                        "(add it to [source] known_hosts, e.g. from `ssh-keyscan -t ed25519 HOST`, and check it)",
    "auth_failed": "the git server refused our credentials (deploy key, token or password)",
    "tls_untrusted": "the git server's TLS certificate is not trusted (set [source] ca_file to its CA)",
}


def classify(stderr: str) -> str:
    """The refusal class of a failed fetch's stderr, or "error" for a temporary failure."""
    for pattern, result in _PATTERNS:
        if re.search(pattern, stderr, re.IGNORECASE):
            return result
    return "error"


def _messages(stderr: str) -> str:
    """stderr without ssh's debug lines, condensed to one line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("debug")]
    return " | ".join(ln for ln in lines if set(ln) != {"@"})[-1500:]


def _private_copy(src: str, tmp: str, name: str) -> str:
    """Copy a secret into our own 0600 file (ssh refuses keys others can read; Secrets are often 0440)."""
    dst = os.path.join(tmp, name)
    with open(src, "rb") as f, open(os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
        out.write(f.read())
    return dst


def _known_hosts_file(value: str, tmp: str) -> str:
    if "\n" in value.strip() or " " in value.strip():  # contents, not a path
        path = os.path.join(tmp, "known_hosts")
        with open(path, "w", encoding="utf-8") as f:
            f.write(value.strip() + "\n")
        return path
    if not os.path.isfile(value):
        raise SourceRefused(f"known_hosts file {value} not found: refusing to fetch without a pinned host key",
                            "host_key_unknown")
    return value


def ssh_command(creds: GitCredentials, tmp: str, *, user: str | None) -> str:
    opts = ["ssh", "-F", "/dev/null", "-v", "-o", "BatchMode=yes", "-o", "ConnectTimeout=20",
            "-o", "UpdateHostKeys=no", "-o", "HashKnownHosts=no"]
    if creds.insecure_skip_host_key_check:
        opts += ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    else:
        if not creds.known_hosts:
            raise SourceRefused("no known_hosts configured for an ssh:// source: refusing to fetch "
                                "(set [source] known_hosts, or insecure_skip_host_key_check = true)",
                                "host_key_unknown")
        opts += ["-o", "StrictHostKeyChecking=yes", "-o", "UserKnownHostsFile=" + _known_hosts_file(creds.known_hosts, tmp),
                 "-o", "GlobalKnownHostsFile=/dev/null", "-o", "CheckHostIP=no"]
    if creds.ssh_key:
        opts += ["-i", _private_copy(creds.ssh_key, tmp, "ssh_key"), "-o", "IdentitiesOnly=yes",
                 "-o", "IdentityAgent=none"]
    if user:
        opts += ["-o", "User=" + user]
    return " ".join(shlex.quote(o) for o in opts)


_ASKPASS = """#!{python}
import sys
prompt = sys.argv[1] if len(sys.argv) > 1 else ""
path = {user!r} if prompt.startswith("Username") else {secret!r}
sys.stdout.write(open(path, encoding="utf-8").read().strip() + "\\n")
"""


def _askpass(creds: GitCredentials, tmp: str, url: str) -> tuple[str, str]:
    """(askpass program, auth description) for an https:// URL."""
    secret = creds.token_file or creds.password_file
    if secret is None:
        return "", "none"
    user = url_user(url) or creds.username or (TOKEN_USERNAME if creds.token_file else None)
    if user is None:
        raise SourceRefused("password_file needs a user name: in the URL (https://USER@host/...) or [source] "
                            "username", "auth_failed")
    user_file = os.path.join(tmp, "username")
    with open(user_file, "w", encoding="utf-8") as f:
        f.write(user + "\n")
    program = os.path.join(tmp, "askpass")
    with open(program, "w", encoding="utf-8") as f:
        f.write(_ASKPASS.format(python=sys.executable, user=user_file, secret=secret))
    os.chmod(program, stat.S_IRWXU)
    return program, f"basic ({'token_file' if creds.token_file else 'password_file'}, user {user})"


def fetch(url: str, branch: str, git_dir: str, creds: GitCredentials, *, timeout: float = 600) -> FetchReport:
    """Fetch `branch` of `url` into `refs/heads/<branch>` of the bare repo `git_dir`."""
    ref = f"refs/heads/{branch}"
    ssh = is_ssh_url(url)
    tmp = tempfile.mkdtemp(prefix="reup-git-")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "SSH_ASKPASS"))}
        env.update(GIT_TERMINAL_PROMPT="0", GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL="/dev/null")
        config = ["-c", "credential.helper=", "-c", "core.askPass="]
        auth = "none"
        if ssh:
            env["GIT_SSH_COMMAND"] = ssh_command(creds, tmp, user=None if url_user(url) else creds.username)
            env["GIT_SSH_VARIANT"] = "ssh"
        else:
            program, auth = _askpass(creds, tmp, url)
            if program:
                env["GIT_ASKPASS"] = program
            if creds.ca_file:
                config += ["-c", "http.sslCAInfo=" + creds.ca_file]
        cmd = ["git", *config, "--git-dir", git_dir, "fetch", "--no-tags", "--no-write-fetch-head",
               url, f"+{ref}:{ref}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise TemporaryError(f"git fetch {url} {branch}: timed out after {timeout:.0f}s") from exc
        if proc.returncode != 0:
            # ssh's own debug lines (-v, for the fingerprint) are left out of the classification
            result = classify("\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith("debug")))
            detail = _messages(proc.stderr)
            if result == "error":
                raise TemporaryError(f"git fetch {url} {branch}: {detail}")
            raise SourceRefused(f"git fetch {url}: {_EXPLAIN[result]}: {detail}", result)
        head = subprocess.run(["git", "--git-dir", git_dir, "rev-parse", "--verify", ref + "^{commit}"],
                              capture_output=True, text=True, check=False, env=env)
        if head.returncode != 0:
            raise TemporaryError(f"git fetch {url} {branch}: {ref} missing after fetch")
        host_key = None
        if ssh:
            m = re.search(r"Server host key: (\S+ \S+)", proc.stderr)
            host_key = m.group(1) if m else None
            auth = _ssh_auth(proc.stderr)
        return FetchReport(head.stdout.strip(), "ssh" if ssh else url.split("://", 1)[0], auth, host_key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _ssh_auth(stderr: str) -> str:
    m = re.search(r'Authenticated to .* using "([^"]+)"', stderr)
    method = m.group(1) if m else "unknown"
    key = re.search(r"Server accepts key: (.*)", stderr)
    if method == "publickey" and key:
        return f"publickey ({'agent' if 'agent' in key.group(1) else 'deploy key'}: {key.group(1).strip()})"
    return method
