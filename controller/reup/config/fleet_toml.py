"""fleet.toml: the devices of a fleet and the rollout policy, as committed in the fleet repo.

Parsed by the controller (controller.py, via source.py which reads the file at a
commit) and by `reup plan`. Pure: text in, `Fleet` out, `ConfigError` on any
malformed or unknown key. The `[rollout]` keys are those of the rollout issue;
this version of the controller enforces `max_parallel` and `activation`, and
validates the rest so that fleet repos written for it stay valid.
"""

from __future__ import annotations

import re
import tomllib

from reup.config.tomlschema import Table
from reup.core.errors import ConfigError
from reup.core.model import Device, Fleet, RolloutPolicy

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521")


def parse_rollout(t: Table) -> RolloutPolicy:
    d = RolloutPolicy()
    policy = RolloutPolicy(
        waves=t.strings("waves", d.waves),
        max_parallel=t.integer("max_parallel", d.max_parallel, minimum=0),
        success_ratio=t.number("success_ratio", d.success_ratio, minimum=0.0),
        bake_time=t.number("bake_time", d.bake_time, minimum=0.0),
        failure_threshold=t.number("failure_threshold", d.failure_threshold, minimum=0.0),
        min_executed=t.integer("min_executed", d.min_executed, minimum=1),
        unreachable_counts_as_failure=t.flag("unreachable_counts_as_failure", d.unreachable_counts_as_failure),
        unreachable_after=t.number("unreachable_after", d.unreachable_after, minimum=0.0),
        confirm_timeout=t.number("confirm_timeout", d.confirm_timeout, minimum=0.0),
        activation=t.choice("activation", ("switch", "boot"), d.activation),
        health_check=t.text("health_check", None),
    )
    t.reject_unknown()
    if policy.success_ratio > 1.0 or policy.failure_threshold > 1.0:
        raise ConfigError(f"{t.where}: success_ratio and failure_threshold are ratios in [0, 1]")
    if len(set(policy.waves)) != len(policy.waves) or not policy.waves:
        raise ConfigError(f"{t.where}.waves: wave names must be unique and non-empty")
    ct = policy.confirm_timeout  # the receiver's range (reup_receiver.protocol.check_confirm_timeout)
    if ct != 0 and not 1.0 <= ct <= 86400.0:  # also refuses nan and inf, which TOML allows
        raise ConfigError(f"{t.where}.confirm_timeout: 0 or 1 to 86400 seconds, got {ct}")
    return policy


def parse_device(name: str, t: Table) -> Device:
    if not _NAME.match(name):
        raise ConfigError(f"{t.where}: invalid device name {name!r}")
    host_key = t.text("host_key").strip()
    parts = host_key.split()
    if len(parts) < 2 or parts[0] not in _KEY_TYPES:
        raise ConfigError(f"{t.where}.host_key: expected an OpenSSH public key ('ssh-ed25519 AAAA...')")
    tags_value = t.data.get("tags", [])
    if isinstance(tags_value, dict):
        tags = tuple(f"{k}={v}" for k, v in sorted(tags_value.items()))
        t.seen.add("tags")
    else:
        tags = t.strings("tags", ())
    dev = Device(
        name=name,
        host=t.text("host"),
        host_key=" ".join(parts[:2]),
        port=t.integer("port", 22, minimum=1),
        user=t.text("user", "root"),
        config=t.text("config", name),
        wave=t.text("wave", "default"),
        tags=tags,
    )
    t.reject_unknown()
    if dev.port > 65535:
        raise ConfigError(f"{t.where}.port: out of range")
    return dev


def parse_fleet(text: str, *, where: str = "fleet.toml") -> Fleet:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    root = Table(data, where)
    rollout = parse_rollout(root.table("rollout"))
    devs = root.table("devices", required=True)
    devices = {name: parse_device(name, Table(value, f"{where}: devices.{name}")) for name, value in devs.data.items()}
    devs.seen.update(devices)
    root.reject_unknown()
    if not devices:
        raise ConfigError(f"{where}: no devices")
    for dev in devices.values():
        if dev.wave not in rollout.waves and rollout.waves != ("default",):
            raise ConfigError(f"{where}: devices.{dev.name}.wave {dev.wave!r} is not in rollout.waves")
    return Fleet(devices=devices, rollout=rollout)
