"""Real git servers on 127.0.0.1 for the source tests: OpenSSH + git-shell, and git http-backend over TLS.

`SshGitServer` runs its own sshd serving bare repositories through `git-shell` for a dedicated
user (created with useradd when the tests run as root, else the current user), with a host key of
its own and a deploy key in `authorized_keys`. `HttpsGitServer` serves bare repositories with
`git http-backend` (smart HTTP) behind a small threaded HTTPS server requiring basic auth, with a
certificate from a CA made here by openssl. Used by tests/integration/test_source_remote.py.
"""

from __future__ import annotations

import base64
import getpass
import os
import pwd
import shutil
import ssl
import subprocess
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from reup_lab.simdevice import SSHD, free_port, generate_key

GIT_SHELL = shutil.which("git-shell") or "/usr/bin/git-shell"
HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"
FLEET_USER = "reupfleet"


def fleet_user() -> str:
    """A dedicated account whose login shell is git-shell (as root), else whoever runs the tests."""
    if os.geteuid() != 0:
        return getpass.getuser()
    try:
        pwd.getpwnam(FLEET_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", GIT_SHELL, FLEET_USER],
                       check=True, capture_output=True)
        # "*": no password, but not "!" (locked), which sshd refuses even for public keys.
        subprocess.run(["usermod", "-p", "*", FLEET_USER], check=True, capture_output=True)
    return FLEET_USER


def run_git(*args: str, cwd: str | None = None) -> str:
    # A global config of our own: safe.directory (the served repos belong to the fleet user) is
    # honoured only there, and the tester's own settings stay out.
    global_config = os.path.join(tempfile.gettempdir(), "reup-test-gitconfig")
    with open(global_config, "w", encoding="ascii") as f:
        f.write("[safe]\n\tdirectory = *\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org", "GIT_CONFIG_GLOBAL": global_config}
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env).stdout.strip()


def commit_to(bare: str, work: str, message: str, files: dict[str, str]) -> str:
    """Commit `files` on main in the working clone `work` of `bare` and push; return the commit id."""
    if not os.path.isdir(os.path.join(work, ".git")):
        run_git("init", "-q", "-b", "main", work)
    for name, text in files.items():
        with open(os.path.join(work, name), "w", encoding="utf-8") as f:
            f.write(text)
    run_git("add", "-A", cwd=work)
    run_git("commit", "-q", "-m", message, cwd=work)
    run_git("push", "-q", bare, "HEAD:refs/heads/main", cwd=work)
    return run_git("rev-parse", "HEAD", cwd=work)


class SshGitServer:
    """sshd on 127.0.0.1 serving `<dir>/*.git` through git-shell to one user, keys in `authorized_keys`."""

    def __init__(self) -> None:
        self.user = fleet_user()
        # Outside pytest's 0700 tmp tree: the dedicated user must read the repo and authorized_keys.
        self.dir = tempfile.mkdtemp(prefix="reup-gitssh-")
        self.port = free_port()
        self.host_key_path = os.path.join(self.dir, "ssh_host_ed25519_key")
        self.proc: subprocess.Popen[bytes] | None = None
        self.authorized: list[str] = []

    def host_public_key(self) -> str:
        return generate_key(self.host_key_path)

    def known_hosts(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_public_key()}\n"

    def fingerprint(self) -> str:
        out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", self.host_key_path + ".pub"],
                             check=True, capture_output=True, text=True).stdout.split()
        return out[1]

    def repo(self, name: str = "fleet.git") -> str:
        path = os.path.join(self.dir, name)
        if not os.path.isdir(path):
            run_git("init", "-q", "--bare", "-b", "main", path)
        return path

    def url(self, name: str = "fleet.git") -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{os.path.join(self.dir, name)}"

    def authorize(self, pubkey: str) -> None:
        self.authorized.append(pubkey)
        self._write_authorized()

    def _write_authorized(self) -> None:
        # As root the user's login shell is git-shell; otherwise force it per key.
        force = "" if self.user == FLEET_USER else f'command="{GIT_SHELL} -c \\"$SSH_ORIGINAL_COMMAND\\"",'
        with open(os.path.join(self.dir, "authorized_keys"), "w", encoding="ascii") as f:
            f.writelines(f"{force}restrict {k}\n" for k in self.authorized)

    def publish(self) -> None:
        """Hand the tree to the serving user (repositories written by the tests as root)."""
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", f"{self.user}:", self.dir], check=True)
            os.chown(self.host_key_path, 0, 0)

    def start(self) -> None:
        self.host_public_key()
        self._write_authorized()
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)
        config = os.path.join(self.dir, "sshd_config")
        with open(config, "w", encoding="ascii") as f:
            f.write("\n".join([
                f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key_path}",
                f"PidFile {os.path.join(self.dir, 'sshd.pid')}",
                f"AuthorizedKeysFile {os.path.join(self.dir, 'authorized_keys')}",
                "StrictModes no", "UsePAM no", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes", f"AllowUsers {self.user}", "LogLevel VERBOSE",
            ]) + "\n")
        self.publish()
        log = open(os.path.join(self.dir, "sshd.log"), "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", config], stdout=log, stderr=log)
        log.close()
        import socket
        import time
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"git sshd exited: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("git sshd did not listen")

    def log(self) -> str:
        with open(os.path.join(self.dir, "sshd.log"), encoding="utf-8", errors="replace") as f:
            return f.read()[-3000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=5)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)


def make_ca(base: str, name: str = "ca") -> tuple[str, str]:
    """A self-signed CA: (certificate path, key path)."""
    key, cert = os.path.join(base, f"{name}.key"), os.path.join(base, f"{name}.crt")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN=reup test {name}",
                    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"],
                   check=True, capture_output=True)
    return cert, key


def make_server_cert(base: str, ca: tuple[str, str]) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and localhost signed by `ca`: (certificate path, key path)."""
    key, csr, cert = (os.path.join(base, n) for n in ("server.key", "server.csr", "server.crt"))
    ext = os.path.join(base, "server.ext")
    with open(ext, "w", encoding="ascii") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    subprocess.run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"], check=True, capture_output=True)
    subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-CAcreateserial",
                    "-out", cert, "-days", "2", "-extfile", ext], check=True, capture_output=True)
    return cert, key


class HttpsGitServer:
    """`git http-backend` for the bare repos under `root`, over TLS, behind basic auth (user, token)."""

    def __init__(self, base: str, *, user: str, token: str) -> None:
        self.base = base
        self.root = os.path.join(base, "repos")
        os.makedirs(self.root, exist_ok=True)
        self.ca = make_ca(base)
        self.cert = make_server_cert(base, self.ca)
        self.user, self.token = user, token
        self.requests: list[tuple[str, int]] = []  # (path, status) seen, for the tests
        self.httpd: ThreadingHTTPServer | None = None

    @property
    def ca_file(self) -> str:
        return self.ca[0]

    def repo(self, name: str = "fleet.git") -> str:
        path = os.path.join(self.root, name)
        if not os.path.isdir(path):
            run_git("init", "-q", "--bare", "-b", "main", path)
        return path

    def url(self, name: str = "fleet.git") -> str:
        assert self.httpd is not None
        return f"https://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def start(self) -> None:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
                pass

            def _authorized(self) -> bool:
                want = base64.b64encode(f"{server.user}:{server.token}".encode()).decode()
                return self.headers.get("Authorization", "") == f"Basic {want}"

            def _handle(self) -> None:
                if not self._authorized():
                    server.requests.append((self.path, 401))
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="reup test"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = self._body()
                path, _, query = self.path.partition("?")
                env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_PROJECT_ROOT": server.root,
                       "GIT_HTTP_EXPORT_ALL": "1", "REQUEST_METHOD": self.command, "PATH_INFO": path,
                       "QUERY_STRING": query, "REMOTE_USER": server.user, "REMOTE_ADDR": "127.0.0.1",
                       "CONTENT_TYPE": self.headers.get("Content-Type", ""), "CONTENT_LENGTH": str(len(body)),
                       "GIT_CONFIG_GLOBAL": "/dev/null"}
                for header, var in (("Content-Encoding", "HTTP_CONTENT_ENCODING"), ("Git-Protocol", "GIT_PROTOCOL")):
                    if self.headers.get(header):
                        env[var] = self.headers[header]
                out = subprocess.run([HTTP_BACKEND], input=body, env=env, capture_output=True, check=False).stdout
                head, _, payload = out.partition(b"\r\n\r\n")
                status, headers = 200, []
                for line in head.decode("latin-1").split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.lower() == "status":
                        status = int(value.split()[0])
                    elif name:
                        headers.append((name, value.strip()))
                server.requests.append((self.path, status))
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks: list[bytes] = []
                    while True:
                        size = int(self.rfile.readline().strip().split(b";")[0], 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            do_GET = do_POST = _handle  # noqa: N815 - the stdlib's names

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(*self.cert)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
