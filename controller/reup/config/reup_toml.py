"""reup.toml: the controller's own configuration, one typed schema with its defaults stated once.

Called by the `reup` commands (cli/) and the lab. Every key has a default except `[source] url`;
unknown keys and out-of-range values are a `ConfigError` naming the key (config/schema.py).
Relative paths (a local `source.url`, `state.dir`, `ssh.key`, the signing trust roots) are resolved
against the directory of the configuration file. The key reference is docs/controller.md, which
tests/unit/test_config_schema.py holds against these models, as it does the chart's values schema.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from reup.config.schema import Section, load_toml, validate
from reup.core.errors import ConfigError

Seconds = Annotated[float, Field(allow_inf_nan=False)]


class SourceConfig(Section):
    url: str
    branch: str = Field("main", min_length=1)
    poll_interval: Seconds = Field(60.0, ge=0.1)
    fleet_file: str = Field("fleet.toml", min_length=1)
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
    credentials_dir: str | None = None  # a directory of files named as CREDENTIAL_FILES (a Secret, systemd)

    @field_validator("url")
    @classmethod
    def _supported(cls, url: str) -> str:
        if not is_local(url) and not url.startswith(("file://", "ssh://", "https://", "http://")) \
                and "@" not in url.split(":", 1)[0]:
            raise ValueError(f"unsupported URL {url!r} (local path, file://, ssh:// or https://)")
        return url

    @model_validator(mode="after")
    def _trust_root(self) -> SourceConfig:
        if self.require_signed and not (self.allowed_signers or self.gpg_home):
            raise ValueError("require_signed needs source.allowed_signers or source.gpg_home")
        return self


class StateConfig(Section):
    dir: str = "state"
    keep_days: Seconds = Field(30.0, ge=0.0)  # events and push history older than this (days) are pruned
    keep_revisions: int = Field(100, ge=1)  # targets of older revisions are pruned (the current one stays)
    prune_interval: Seconds = Field(3600.0, ge=1.0)  # seconds between retention steps


class BuildConfig(Section):
    max_parallel: int = Field(2, ge=1)
    nix_options: dict[str, str] = Field(default_factory=dict)

    @field_validator("nix_options", mode="before")
    @classmethod
    def _as_strings(cls, value: object) -> object:
        # Nix options are strings on the command line; TOML gives numbers and booleans too.
        if isinstance(value, dict):
            return {k: ("true" if v else "false") if isinstance(v, bool) else
                    str(v) if isinstance(v, int | float) else v for k, v in value.items()}
        return value


class SshConfig(Section):
    key: str | None = None
    connect_timeout: Seconds = Field(10.0, ge=0.1)
    attempts: int = Field(3, ge=1)  # tries per push (tenacity, jittered exponential backoff)
    retry_max: Seconds = Field(300.0, ge=0.0)  # cap of the backoff between reconcile passes for a device
    max_connections: int = Field(64, ge=1)  # concurrent transfers (and, separately, confirmations)


class HttpConfig(Section):
    listen: str | None = "127.0.0.1:9120"
    device_info: bool = False  # opt-in reup_device_info{device,state,generation}
    token: str | None = None  # read access to /, /api/*: `Authorization: Bearer` or a basic-auth password
    metrics_token: str | None = None  # the same for /metrics (open without)
    grafana_url: str | None = None  # linked from the fleet page

    @field_validator("token", "metrics_token", "grafana_url")
    @classmethod
    def _unset_if_empty(cls, value: str | None) -> str | None:
        return value or None

    @field_validator("listen")
    @classmethod
    def _host_port(cls, listen: str | None) -> str | None:
        if listen and not listen.rpartition(":")[2].isdigit():
            raise ValueError(f"expected host:port, got {listen!r}")
        return listen or None
    webhook_secret: str | None = None  # POST /webhook's shared secret (or webhook_secret_file)
    webhook_secret_file: str | None = None

    @model_validator(mode="after")
    def _one_secret(self) -> HttpConfig:
        if self.webhook_secret and self.webhook_secret_file:
            raise ValueError("webhook_secret and webhook_secret_file are exclusive")
        return self

    @property
    def host_port(self) -> tuple[str, int]:
        if not self.listen:
            raise ConfigError("http.listen is disabled")
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "0.0.0.0", int(port)


class TransferConfig(Section):
    max_rate: float | None = Field(None, ge=1.0, allow_inf_nan=False)  # bytes/s, the controller's total egress to devices (None: no limit)


class ReupToml(Section):
    """The file as written."""

    source: SourceConfig
    state: StateConfig = Field(default_factory=StateConfig)
    build: BuildConfig = Field(default_factory=BuildConfig)
    ssh: SshConfig = Field(default_factory=SshConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    transfer: TransferConfig = Field(default_factory=lambda: TransferConfig())


@dataclass(frozen=True)
class Config:
    """reup.toml with its paths resolved, and where it was read from."""

    source: SourceConfig
    state: StateConfig = field(default_factory=StateConfig)
    build: BuildConfig = field(default_factory=BuildConfig)
    ssh: SshConfig = field(default_factory=SshConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    path: str | None = None
    transfer: TransferConfig = field(default_factory=TransferConfig)


def is_local(url: str) -> bool:
    return "://" not in url and not (":" in url.split("/", 1)[0] and "@" in url)


def _path(base_dir: str, value: str | None) -> str | None:
    return os.path.normpath(os.path.join(base_dir, os.path.expanduser(value))) if value else None


def parse_config(text: str, *, base_dir: str = ".", path: str | None = None,
                 env: Mapping[str, str] | None = None) -> Config:
    where = path or "reup.toml"
    data = load_toml(text, where)
    raw = validate(ReupToml, data, where)
    src = raw.source
    source = src.model_copy(update={
        "url": _path(base_dir, src.url) if is_local(src.url) else src.url,
        "allowed_signers": _path(base_dir, src.allowed_signers),
        "gpg_home": _path(base_dir, src.gpg_home),
    })
    written = data.get("source", {})
    source = _source_credentials(source, written if isinstance(written, dict) else {}, base_dir,
                                 os.environ if env is None else env)
    state = raw.state.model_copy(update={"dir": _path(base_dir, raw.state.dir)})
    ssh = raw.ssh.model_copy(update={"key": _path(base_dir, raw.ssh.key)})
    secret_file = _path(base_dir, raw.http.webhook_secret_file)
    http = raw.http.model_copy(update={"webhook_secret": _secret(raw.http.webhook_secret, secret_file),
                                       "webhook_secret_file": secret_file})
    return Config(source=source, state=state, build=raw.build, ssh=ssh, http=http, path=path,
                  transfer=raw.transfer)


# [source] keys for private remotes, in order; the ones holding paths are resolved like other paths.
_CREDENTIAL_KEYS = ("ssh_key", "known_hosts", "insecure_skip_host_key_check", "username", "password_file",
                    "token_file", "ca_file")
_CREDENTIAL_PATHS = ("ssh_key", "password_file", "token_file", "ca_file")
# The file names in credentials_dir (the chart's git Secret keys, the NixOS module's gitCredentials).
CREDENTIAL_FILES = ("ssh_key", "known_hosts", "username", "password", "token", "ca_file")


def _source_credentials(source: SourceConfig, written: Mapping[str, Any], base_dir: str,
                        env: Mapping[str, str]) -> SourceConfig:
    """Each key from reup.toml, else REUP_SOURCE_<KEY>, else the file <credentials_dir>/<key>
    (a Kubernetes Secret volume, systemd's $CREDENTIALS_DIRECTORY); `${VAR}` is expanded in paths."""
    def expand(value: str) -> str:
        expanded = os.path.expandvars(value)
        if "$" in expanded:
            raise ConfigError(f"source: undefined environment variable in {value!r}")
        return expanded

    cred_dir = source.credentials_dir or env.get("REUP_SOURCE_CREDENTIALS_DIR")
    cred_dir = _path(base_dir, expand(cred_dir)) if cred_dir else None
    values: dict[str, object] = {}
    for key in _CREDENTIAL_KEYS:
        from_env = env.get("REUP_SOURCE_" + key.upper())
        if key == "insecure_skip_host_key_check":
            values[key] = (source.insecure_skip_host_key_check if key in written
                           else (from_env or "").lower() in ("1", "true", "yes"))
            continue
        value = getattr(source, key) or from_env
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
    source = source.model_copy(update={**values, "credentials_dir": cred_dir})
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


def _secret(value: str | None, path: str | None) -> str | None:
    """The webhook secret from reup.toml or its file (HttpConfig refuses both at once)."""
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                value = fh.read().strip()
        except OSError as exc:
            raise ConfigError(f"http.webhook_secret_file: {exc}") from exc
    return value or None


def load_config(path: str) -> Config:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from exc
    return parse_config(text, base_dir=os.path.dirname(os.path.abspath(path)), path=path)
