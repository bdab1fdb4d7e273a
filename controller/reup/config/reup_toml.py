"""reup.toml: the controller's own configuration, parsed and validated.

Called by controller_cli.py (`reup run/status/plan --config`) and the demo.
Every key has a default except `[source] url`; unknown keys are a `ConfigError`.
Relative paths (a local `source.url`, `state.dir`, `ssh.key`) are resolved
against the directory of the configuration file. Documented in docs/controller.md.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field

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


@dataclass(frozen=True)
class StateConfig:
    dir: str
    keep_days: float = 30.0  # events and push history older than this are pruned
    keep_revisions: int = 100  # targets of older revisions are pruned (the current one always stays)
    prune_interval: float = 3600.0  # seconds between retention steps


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
    max_connections: int = 64  # concurrent transfers (and, separately, confirmations); not rollout.max_parallel


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


def parse_config(text: str, *, base_dir: str = ".", path: str | None = None) -> Config:
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
    elif not url.startswith(("file://", "ssh://", "https://", "http://", "git@")):
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
    src.reject_unknown()
    if source.require_signed and not (source.allowed_signers or source.gpg_home):
        raise ConfigError("source.require_signed needs source.allowed_signers or source.gpg_home")

    st = root.table("state")
    state = StateConfig(dir=os.path.normpath(os.path.join(base_dir, os.path.expanduser(st.text("dir", "state")))),
                        keep_days=st.number("keep_days", 30.0, minimum=0.0),
                        keep_revisions=st.integer("keep_revisions", 100, minimum=1),
                        prune_interval=st.number("prune_interval", 3600.0, minimum=1.0))
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
        max_connections=s.integer("max_connections", 64, minimum=1),
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


def load_config(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    return parse_config(text, base_dir=os.path.dirname(os.path.abspath(path)), path=path)
