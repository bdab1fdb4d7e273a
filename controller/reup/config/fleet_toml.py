"""fleet.toml: the devices of a fleet and the rollout policy, as committed in the fleet repo.

Parsed by the reconcile loop (at each new commit) and by `reup plan`/`reup check`. Pure: text in,
`core.model.Fleet` out, `ConfigError` on any malformed or unknown key, one line per problem. The
defaults are those of the core dataclasses (`RolloutPolicy`, `Device`), stated there once.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
import struct
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from reup.config.schema import Section, load_toml, validate
from reup.core.errors import ConfigError
from reup.core.model import Device, Fleet, LinkLimits, RolloutPolicy, TransferPolicy
from reup.core.windows import check_tz, parse_window

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_KEY_TYPES = ("ssh-ed25519", "ssh-rsa", "ecdsa-sha2-nistp256", "ecdsa-sha2-nistp384", "ecdsa-sha2-nistp521")
Seconds = Annotated[float, Field(allow_inf_nan=False)]
Ratio = Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]


def _default(cls: type[Any], name: str) -> Any:
    return {f.name: f for f in dataclasses.fields(cls)}[name].default


_R = RolloutPolicy()
Rate = Annotated[float, Field(ge=1.0, allow_inf_nan=False)]


def _window(text: str) -> str:
    parse_window(text, "window")  # ConfigError is a ValueError: reported with the key's path
    return text


def _tz(tz: str) -> str:
    return check_tz(tz, "time zone")


class RolloutSpec(Section):
    waves: list[str] = Field(default_factory=lambda: list(_R.waves), min_length=1)
    max_parallel: int = Field(_R.max_parallel, ge=0)
    success_ratio: Ratio = _R.success_ratio
    bake_time: Seconds = Field(_R.bake_time, ge=0.0)
    failure_threshold: Ratio = _R.failure_threshold
    min_executed: int = Field(_R.min_executed, ge=1)
    unreachable_counts_as_failure: bool = _R.unreachable_counts_as_failure
    unreachable_after: Seconds = Field(_R.unreachable_after, ge=0.0)
    confirm_timeout: Seconds = Field(_R.confirm_timeout, ge=0.0, le=86400.0)
    activation: Literal["switch", "boot", "reboot"] = "switch"
    health_check: str | None = _R.health_check

    @field_validator("confirm_timeout")
    @classmethod
    def _receivers_range(cls, value: float) -> float:
        # The receiver's range (reup_receiver.protocol.check_confirm_timeout): refused when read,
        # not when a push builds the command line.
        if value != 0 and value < 1.0:
            raise ValueError(f"0 (no confirmation) or 1 to 86400 seconds, got {value}")
        return value

    @field_validator("waves")
    @classmethod
    def _unique(cls, waves: list[str]) -> list[str]:
        if len(set(waves)) != len(waves) or not all(waves):
            raise ValueError("wave names must be unique and non-empty")
        return waves

    def policy(self) -> RolloutPolicy:
        return RolloutPolicy(**{**self.model_dump(), "waves": tuple(self.waves)})


class DeviceSpec(Section):
    host: str = Field(min_length=1)
    host_key: str
    port: int = Field(_default(Device, "port"), ge=1, le=65535)
    user: str = Field(_default(Device, "user"), min_length=1)
    config: str | None = None  # default: the device's name
    wave: str = _default(Device, "wave")
    tags: list[str] | dict[str, str | int | float | bool] = Field(default_factory=list)
    max_rate: Rate | None = None  # bytes/s to this device
    windows: list[Annotated[str, AfterValidator(_window)]] = Field(default_factory=list)
    tz: Annotated[str, AfterValidator(_tz)] = _default(Device, "tz")

    @field_validator("host_key")
    @classmethod
    def _openssh_key(cls, value: str) -> str:
        return check_host_key(value)

    def device(self, name: str) -> Device:
        tags = (tuple(f"{k}={v}" for k, v in sorted(self.tags.items())) if isinstance(self.tags, dict)
                else tuple(self.tags))
        return Device(name=name, host=self.host, host_key=self.host_key, port=self.port, user=self.user,
                      config=self.config if self.config is not None else name, wave=self.wave, tags=tags,
                      max_rate=self.max_rate, windows=tuple(self.windows), tz=self.tz)


class TagLimits(Section):
    """`[transfer.tags.<tag>]`: shared by the tag's devices."""

    max_rate: Rate | None = None
    windows: list[Annotated[str, AfterValidator(_window)]] = Field(default_factory=list)


class WaveLimits(Section):
    """`[transfer.waves.<wave>]` (windows belong to devices and tags, in the device's time zone)."""

    max_rate: Rate | None = None


class TransferSpec(Section):
    tags: dict[str, TagLimits] = Field(default_factory=dict)
    waves: dict[str, WaveLimits] = Field(default_factory=dict)

    def policy(self) -> TransferPolicy:
        return TransferPolicy(
            tags={k: LinkLimits(max_rate=v.max_rate, windows=tuple(v.windows)) for k, v in self.tags.items()},
            waves={k: LinkLimits(max_rate=v.max_rate) for k, v in self.waves.items()})


class FleetToml(Section):
    devices: dict[str, DeviceSpec]
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    transfer: TransferSpec = Field(default_factory=TransferSpec)

    @field_validator("devices", mode="before")
    @classmethod
    def _names(cls, devices: object) -> object:
        if isinstance(devices, dict):
            for name in devices:
                if not _NAME.match(name):
                    raise ValueError(f"invalid device name {name!r} (letters, digits, '.', '_', '-'; "
                                     "at most 63; starting with a letter or digit)")
            if not devices:
                raise ValueError("no devices")
        return devices

    @model_validator(mode="after")
    def _waves(self) -> FleetToml:
        waves = self.rollout.waves
        for name, dev in self.devices.items():
            if dev.wave not in waves and waves != ["default"]:
                raise ValueError(f"devices.{name}.wave {dev.wave!r} is not in rollout.waves")
        return self


def check_host_key(value: str) -> str:
    """An OpenSSH public key line -> "TYPE BASE64" (the comment dropped); ValueError if it is not one,
    e.g. the template's placeholder."""
    parts = value.strip().split()
    hint = "get the device's real key with `ssh-keyscan -t ed25519 HOST`"
    if len(parts) < 2 or parts[0] not in _KEY_TYPES:
        raise ValueError(f"expected an OpenSSH public key ('ssh-ed25519 AAAA...'); {hint}")
    try:
        blob = base64.b64decode(parts[1].encode("ascii"), validate=True)
        (n,) = struct.unpack(">I", blob[:4])
        inner = blob[4:4 + n].decode("ascii")
    except (UnicodeError, binascii.Error, struct.error) as exc:
        raise ValueError(f"{parts[0]} key is not valid base64 (a placeholder?); {hint}") from exc
    if inner != parts[0] or (inner == "ssh-ed25519" and len(blob) != 51):
        raise ValueError(f"not a well-formed {parts[0]} key (a placeholder?); {hint}")
    return " ".join(parts[:2])


def parse_fleet(text: str, *, where: str = "fleet.toml") -> Fleet:
    raw = validate(FleetToml, load_toml(text, where), where)
    if not raw.devices:  # pragma: no cover - refused by the schema
        raise ConfigError(f"{where}: no devices")
    return Fleet(devices={name: spec.device(name) for name, spec in raw.devices.items()},
                 rollout=raw.rollout.policy(), transfer=raw.transfer.policy())
