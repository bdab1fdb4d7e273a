"""Unit tests: reup.toml (config/reup_toml.py) and fleet.toml (config/fleet_toml.py) parsing and validation."""

from __future__ import annotations

import pytest
from reup.config.fleet_toml import parse_fleet
from reup.config.reup_toml import parse_config
from reup.core.errors import ConfigError

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH0d6u0xjBWm0m1u2q5Sg8jzxf9C2ri8Hc3tnrsY+q0a"


def test_config_defaults_and_relative_paths() -> None:
    cfg = parse_config('[source]\nurl = "fleet"\n', base_dir="/etc/reup")
    assert cfg.source.url == "/etc/reup/fleet"
    assert cfg.source.branch == "main"
    assert cfg.source.poll_interval == 60.0
    assert cfg.state.dir == "/etc/reup/state"
    assert cfg.build.max_parallel == 2 and cfg.build.nix_options == {}
    assert cfg.ssh.key is None and cfg.ssh.connect_timeout == 10.0
    assert cfg.http.host_port == ("127.0.0.1", 9120)
    assert cfg.http.device_info is False


def test_config_full() -> None:
    cfg = parse_config(
        """
[source]
url = "https://example.org/fleet.git"
branch = "prod"
poll_interval = 5
[state]
dir = "/var/lib/reup"
[build]
max_parallel = 4
nix_options = { builders = "ssh://b x86_64-linux", max-jobs = 0, keep-going = true }
[ssh]
key = "id_ed25519"
connect_timeout = 3.5
[http]
listen = "0.0.0.0:8080"
device_info = true
""",
        base_dir="/cfg",
    )
    assert cfg.source.url == "https://example.org/fleet.git"
    assert cfg.source.poll_interval == 5.0
    assert cfg.state.dir == "/var/lib/reup"
    assert cfg.build.nix_options == {"builders": "ssh://b x86_64-linux", "max-jobs": "0", "keep-going": "true"}
    assert cfg.ssh.key == "/cfg/id_ed25519" and cfg.ssh.connect_timeout == 3.5
    assert cfg.http.host_port == ("0.0.0.0", 8080) and cfg.http.device_info


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "missing required key 'source'"),
        ('[source]\nurl = "x"\nbranchh = "main"\n', "source: unknown key: branchh"),
        ('[source]\nurl = "x"\n[extra]\n', "unknown key: extra"),
        ('[source]\nurl = "x"\n[build]\nmax_parallel = 0\n', "build.max_parallel: must be >= 1"),
        ('[source]\nurl = "x"\n[ssh]\nconnect_timeout = "10"\n', "ssh.connect_timeout: expected a number"),
        ('[source]\nurl = "ftp://x"\n', "unsupported URL"),
        ('[source]\nurl = "x"\n[http]\nlisten = "nope"\n', "expected host:port"),
        ("[source\n", "reup.toml"),
    ],
)
def test_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(text)


def test_fleet_defaults() -> None:
    fleet = parse_fleet(f'[devices.dev-1]\nhost = "10.0.0.1"\nhost_key = "{KEY} root@dev"\n')
    dev = fleet.devices["dev-1"]
    assert (dev.host, dev.port, dev.user, dev.config, dev.wave, dev.tags) == ("10.0.0.1", 22, "root", "dev-1", "default", ())
    assert dev.host_key == KEY  # the comment is dropped
    assert fleet.rollout.max_parallel == 0 and fleet.rollout.activation == "switch"


def test_fleet_full() -> None:
    fleet = parse_fleet(
        f"""
[rollout]
waves = ["canary", "rest"]
max_parallel = 2
failure_threshold = 0.5
activation = "boot"
[devices.a]
host = "a.local"
port = 2222
user = "deploy"
host_key = "{KEY}"
config = "sensor"
wave = "canary"
tags = ["lab", "arm"]
[devices.b]
host = "b.local"
host_key = "{KEY}"
wave = "rest"
tags = {{ site = "hamburg" }}
"""
    )
    a, b = fleet.devices["a"], fleet.devices["b"]
    assert (a.port, a.user, a.config, a.wave, a.tags) == (2222, "deploy", "sensor", "canary", ("lab", "arm"))
    assert b.tags == ("site=hamburg",)
    assert fleet.rollout.waves == ("canary", "rest") and fleet.rollout.max_parallel == 2
    assert fleet.rollout.activation == "boot"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "missing required key 'devices'"),
        ("[devices]\n", "no devices"),
        (f'[devices.a]\nhost = "h"\nhost_key = "{KEY}"\nprot = 22\n', "unknown key: prot"),
        ('[devices.a]\nhost = "h"\n', "missing required key 'host_key'"),
        ('[devices.a]\nhost = "h"\nhost_key = "AAAA"\n', "expected an OpenSSH public key"),
        (f'[devices.a]\nhost_key = "{KEY}"\n', "missing required key 'host'"),
        (f'[devices.a]\nhost = "h"\nhost_key = "{KEY}"\nport = 70000\n', "devices.a.port: must be <= 65535, got 70000"),
        (f'[rollout]\nspeed = 3\n[devices.a]\nhost = "h"\nhost_key = "{KEY}"\n', "unknown key: speed"),
        (f'[rollout]\nactivation = "test"\n[devices.a]\nhost = "h"\nhost_key = "{KEY}"\n', "expected one of switch, boot"),
        (f'[rollout]\nwaves = ["x"]\n[devices.a]\nhost = "h"\nhost_key = "{KEY}"\nwave = "y"\n', "not in rollout.waves"),
        (f'[devices."a b"]\nhost = "h"\nhost_key = "{KEY}"\n', "invalid device name"),
        ("devices = 3\n", "expected a table"),
    ],
)
def test_fleet_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_fleet(text)


PLACEHOLDER = "ssh-ed25519 AAAA\u2026PLACEHOLDER\u2026"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('hots = "h"\n', "devices.pi-01: unknown key: hots (did you mean `host`?)"),
        ('host = "h"\nport = "22"\n', "devices.pi-01.port: expected an integer, got '22'"),
        ('host = "h"\nport = true\n', "devices.pi-01.port: expected an integer, got True"),
        ('host = "h"\nwaev = "x"\n', "unknown key: waev (did you mean `wave`?)"),
        ('host = "h"\nzzz = 1\n', "unknown key: zzz$"),
    ],
)
def test_device_mistakes_name_the_key_and_the_closest_known_one(body: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        parse_fleet(f'[devices.pi-01]\nhost_key = "{KEY}"\n' + body)


@pytest.mark.parametrize(
    ("rollout", "message"),
    [
        ("success_ratio = 2", "rollout.success_ratio: must be <= 1.0, got 2"),
        ('activation = "swich"', "rollout.activation: expected one of switch, boot, reboot, got 'swich'"),
        ("confirm_timeout = nan", "rollout.confirm_timeout: expected a finite number"),
        ("bake_time = -1", "rollout.bake_time: must be >= 0.0, got -1"),
        ("waves = []", "rollout.waves: must not be empty"),
        ('waves = ["a", "a"]', "rollout.waves: wave names must be unique"),
        ("max_paralel = 3", "unknown key: max_paralel (did you mean `max_parallel`?)"),
    ],
)
def test_rollout_range_and_choice_errors(rollout: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        parse_fleet(f'[rollout]\n{rollout}\n[devices.a]\nhost = "h"\nhost_key = "{KEY}"\n')


@pytest.mark.parametrize("key", [PLACEHOLDER, "ssh-ed25519 AAAAPLACEHOLDER", "ssh-ed25519 " + KEY.split()[1][:-4],
                                 "ssh-rsa " + KEY.split()[1]])
def test_placeholder_or_malformed_host_key_is_refused_with_the_way_to_the_real_one(key: str) -> None:
    with pytest.raises(ConfigError, match=r"devices\.pi-01\.host_key: .*ssh-keyscan -t ed25519 HOST"):
        parse_fleet(f'[devices.pi-01]\nhost = "h"\nhost_key = "{key}"\n')


def test_every_problem_is_one_line() -> None:
    with pytest.raises(ConfigError) as err:
        parse_fleet(f'[rollout]\nsuccess_ratio = 2\n[devices.a]\nhots = "h"\nhost_key = "{KEY}"\n'
                    f'[devices.b]\nhost = "h"\nhost_key = "{KEY}"\nport = "22"\n')
    lines = str(err.value).splitlines()
    assert len(lines) == 4, lines  # a: unknown hots + missing host; b: port; rollout: ratio
    assert all(line.startswith("fleet.toml: ") for line in lines)


def test_config_names_keep_any_text() -> None:
    fleet = parse_fleet(f'[devices.a]\nhost = "h"\nhost_key = "{KEY}"\nconfig = "x${{y}}\\"z\u00e4"\n')
    assert fleet.devices["a"].config == 'x${y}"z\u00e4'
@pytest.mark.parametrize("value", ["nan", "inf", "-1.0", "0.5", "90000"])
def test_confirm_timeout_within_the_receivers_range(value: str) -> None:
    """Refused when read, not when a push builds the receiver's command line."""
    text = f'[rollout]\nconfirm_timeout = {value}\n[devices.dev-1]\nhost = "10.0.0.1"\nhost_key = "{KEY} root@dev"\n'
    with pytest.raises(ConfigError, match="confirm_timeout"):
        parse_fleet(text)


def test_webhook_secret_and_its_file_are_exclusive(tmp_path: object) -> None:
    with pytest.raises(ConfigError, match="http: webhook_secret and webhook_secret_file are exclusive"):
        parse_config('[source]\nurl = "x"\n[http]\nwebhook_secret = "s"\nwebhook_secret_file = "f"\n')
