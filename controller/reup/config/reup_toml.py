"""reup.toml: the controller's own configuration, parsed and validated.

Called by controller_cli.py (`reup run/status/plan --config`) and the demo.
Every key has a default except `[source] url`; unknown keys are a `ConfigError`.
Relative paths (a local `source.url`, `state.dir`, `ssh.key`) are resolved
against the directory of the configuration file. Documented in docs/controller.md.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from reup.config.tomlschema import Table
from reup.core.errors import ConfigError


@dataclass(frozen=True)
class SourceConfig:
    url: str
    branch: str = "main"
    poll_interval: float = 60.0
    fleet_file: str = "fleet.toml"
    require_signed: bool = False  # deploy only heads signed by an allowed key
    allowed_signers: str | None = None  # SSH allowed-signers file (git gpg.ssh.allowedSignersFile)
    gpg_home: str | None = None  # GnuPG home holding the allowed OpenPGP keys
    # Reaching a private remote (each also from REUP_SOURCE_<KEY> or a file in credentials_dir):
    ssh_key: str | None = None  # deploy key file; None: the ssh-agent, if any
    known_hosts: str | None = None  # known_hosts lines or a file; required for ssh:// unless insecure
    insecure_skip_host_key_check: bool = False
    username: str | None = None  # when the URL names none
    password_file: str | None = None
    token_file: str | None = None
    ca_file: str | None = None  # CA bundle for https://


@dataclass(frozen=True)
class StateConfig:
    dir: str


@dataclass(frozen=True)
class BuildConfig:
    max_parallel: int = 2
    nix_options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SshConfig:
    key: str | None = None
    connect_timeout: float = 10.0
    attempts: int = 3  # tries per push (tenacity, jittered exponential backoff)
    retry_max: float = 300.0  # cap of the backoff between reconcile passes for a device


@dataclass(frozen=True)
class HttpConfig:
    listen: str | None = "127.0.0.1:9120"
    device_info: bool = False  # opt-in reup_device_info{device,state,generation}

    @property
    def host_port(self) -> tuple[str, int]:
        if not self.listen:
            raise ConfigError("http.listen is disabled")
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True)
class Config:
    source: SourceConfig
    state: StateConfig
    build: BuildConfig = field(default_factory=BuildConfig)
    ssh: SshConfig = field(default_factory=SshConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    path: str | None = None


def _is_local(url: str) -> bool:
    return "://" not in url and not (":" in url.split("/", 1)[0] and "@" in url)


def _path(base_dir: str, value: str | None) -> str | None:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value))) if value else None


def parse_config(text: str, *, base_dir: str = ".", path: str | None = None,
                 env: Mapping[str, str] | None = None) -> Config:
    where = path or "reup.toml"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    root = Table(data, "")

    src = root.table("source", required=True)
    url = src.text("url")
    if _is_local(url):
        url = os.path.normpath(os.path.join(base_dir, os.path.expanduser(url)))
    elif not url.startswith(("file://", "ssh://", "https://", "http://")) and "@" not in url.split(":", 1)[0]:
        raise ConfigError(f"source.url: unsupported URL {url!r} (local path, file://, ssh:// or https://)")
    source = SourceConfig(
        url=url,
        branch=src.text("branch", "main"),
        poll_interval=src.number("poll_interval", 60.0, minimum=0.1),
        fleet_file=src.text("fleet_file", "fleet.toml"),
        require_signed=src.flag("require_signed", False),
        allowed_signers=_path(base_dir, src.text("allowed_signers", None)),
        gpg_home=_path(base_dir, src.text("gpg_home", None)),
    )
    source = _source_credentials(source, src, base_dir, os.environ if env is None else env)
    src.reject_unknown()
    if source.require_signed and not (source.allowed_signers or source.gpg_home):
        raise ConfigError("source.require_signed needs source.allowed_signers or source.gpg_home")

    st = root.table("state")
    state = StateConfig(dir=os.path.normpath(os.path.join(base_dir, os.path.expanduser(st.text("dir", "state")))))
    st.reject_unknown()

    b = root.table("build")
    build = BuildConfig(max_parallel=b.integer("max_parallel", 2, minimum=1), nix_options=b.str_map("nix_options"))
    b.reject_unknown()

    s = root.table("ssh")
    key = s.text("key", None)
    ssh = SshConfig(
        key=os.path.normpath(os.path.join(base_dir, os.path.expanduser(key))) if key else None,
        connect_timeout=s.number("connect_timeout", 10.0, minimum=0.1),
        attempts=s.integer("attempts", 3, minimum=1),
        retry_max=s.number("retry_max", 300.0, minimum=0.0),
    )
    s.reject_unknown()

    h = root.table("http")
    listen = h.text("listen", "127.0.0.1:9120")
    if listen and not listen.rpartition(":")[2].isdigit():
        raise ConfigError(f"http.listen: expected host:port, got {listen!r}")
    http = HttpConfig(listen=listen or None, device_info=h.flag("device_info", False))
    h.reject_unknown()

    root.reject_unknown()
    return Config(source=source, state=state, build=build, ssh=ssh, http=http, path=path)


# [source] keys for private remotes, in order; the ones holding paths are resolved like other paths.
_CREDENTIAL_KEYS = ("ssh_key", "known_hosts", "insecure_skip_host_key_check", "username", "password_file",
                    "token_file", "ca_file")
_CREDENTIAL_PATHS = ("ssh_key", "password_file", "token_file", "ca_file")
# The file names in credentials_dir (the chart's git Secret keys, the NixOS module's gitCredentials).
CREDENTIAL_FILES = ("ssh_key", "known_hosts", "username", "password", "token", "ca_file")


def _source_credentials(source: SourceConfig, src: Table, base_dir: str, env: Mapping[str, str]) -> SourceConfig:
    """Each key from reup.toml, else REUP_SOURCE_<KEY>, else the file <credentials_dir>/<key>
    (a Kubernetes Secret volume, systemd's $CREDENTIALS_DIRECTORY); `${VAR}` is expanded in paths."""
    def expand(value: str) -> str:
        expanded = os.path.expandvars(value)
        if "$" in expanded:
            raise ConfigError(f"source: undefined environment variable in {value!r}")
        return expanded

    cred_dir = src.text("credentials_dir", None) or env.get("REUP_SOURCE_CREDENTIALS_DIR")
    cred_dir = _path(base_dir, expand(cred_dir)) if cred_dir else None
    values: dict[str, object] = {}
    for key in _CREDENTIAL_KEYS:
        from_env = env.get("REUP_SOURCE_" + key.upper())
        if key == "insecure_skip_host_key_check":
            values[key] = src.flag(key, (from_env or "").lower() in ("1", "true", "yes"))
            continue
        value = src.text(key, None) or from_env
        file_key = key.removesuffix("_file") if key in ("password_file", "token_file") else key
        in_dir = os.path.join(cred_dir, file_key) if cred_dir else None
        if value:
            value = expand(value)
            if key in _CREDENTIAL_PATHS or (key == "known_hosts" and " " not in value.strip()):
                value = _path(base_dir, value)
                if not os.path.isfile(str(value)):
                    raise ConfigError(f"source.{key}: no such file {value}")
        elif in_dir and os.path.isfile(in_dir):
            value = _read(in_dir).strip() if key == "username" else in_dir
        values[key] = value or None
    source = replace(source, **values)  # type: ignore[arg-type]
    if source.password_file and source.token_file:
        raise ConfigError("source: set password_file or token_file, not both")
    if source.url.startswith("http://") and (source.password_file or source.token_file):
        raise ConfigError("source: a password or token would cross the network in clear over http://; use https://")
    remote_ssh = source.url.startswith("ssh://") or (
        "://" not in source.url and "@" in source.url.split("/", 1)[0] and ":" in source.url.split("/", 1)[0])
    # With a credentials_dir the file may appear later (a Secret, systemd credentials that only the
    # service can read): the fetch refuses then (gitfetch.py), commands like `reup status` still work.
    if remote_ssh and not source.known_hosts and not source.insecure_skip_host_key_check and not cred_dir:
        raise ConfigError(f"source.known_hosts is required for {source.url}: pin the git server's host key "
                          "(`ssh-keyscan -t ed25519 HOST`, checked against the server's own fingerprint), "
                          "or set insecure_skip_host_key_check = true")
    return source


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc


def load_config(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    return parse_config(text, base_dir=os.path.dirname(os.path.abspath(path)), path=path)
