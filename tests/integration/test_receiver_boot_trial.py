"""Activation `reboot` through the real `reup-receive` command line, without a VM: which generations
go on trial, what confirm does before and after the reboot, and each way a trial ends. The boot
loader's part (systemd-boot renaming the entry at each boot) is done here by the test, as
systemd-boot does it; tests/vm/ shows systemd-boot doing it."""

from __future__ import annotations

import os
import time

from reup.config.fleet_toml import parse_fleet
from reup.io.answers import RolledBackError, classify_exit
from reup.loop.executors import judge_timed_out
from reup_receiver.device import Device
from reup_receiver.generations import switch_generation
from reup_receiver.protocol import ACTIONS, ExitCode, StatusAnswer, receive_command
from support import bootkit
from support.receiverkit import Run, receive

PARAMS = "console=ttyS0 panic=1"
CHECK = 'test "$(readlink "$REUP_ROOT/run/booted-system")" = "$REUP_TOPLEVEL"'
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH0d6u0xjBWm0m1u2q5Sg8jzxf9C2ri8Hc3tnrsY+q0a"


def _root(base: str) -> tuple[str, str, str, str]:
    root = os.path.join(base, "root")
    ka = bootkit.add_file(root, "linux-6.1", "bzImage", b"kernel A")
    kb = bootkit.add_file(root, "linux-6.6", "bzImage", b"kernel B")
    ia = bootkit.add_file(root, "initrd-a", "initrd", b"initrd A")
    old = bootkit.add_toplevel(root, "old", ka, ia, PARAMS)
    new = bootkit.add_toplevel(root, "new", kb, ia, PARAMS)
    same = bootkit.add_toplevel(root, "same-kernel", ka, ia, PARAMS)
    bootkit.set_profile(root, [old])
    bootkit.set_booted(root, old)
    os.makedirs(os.path.join(root, "boot", "loader", "entries"))
    with open(os.path.join(root, "boot", "loader", "loader.conf"), "w") as fh:
        fh.write("timeout 0\ndefault nixos-generation-1.conf\n")
    bootkit.write_settings(root, tries=3, reboot_delay=0,
                           reboot_command=["sh", "-c", 'echo reboot >> "$REUP_ROOT/reboots"'])
    return root, old, new, same


def _cli(root: str, *args: str) -> Run:
    return receive(root, None, *args, env={**os.environ})


def _entries(root: str) -> list[str]:
    return sorted(os.listdir(os.path.join(root, "boot", "loader", "entries")))


def _reboots(root: str, expect: int) -> int:
    """How many reboots the receiver asked for, waiting up to 5 s for `expect` (they run detached)."""
    path = os.path.join(root, "reboots")

    def count() -> int:
        try:
            with open(path) as fh:
                return len(fh.read().splitlines())
        except FileNotFoundError:
            return 0

    deadline = time.monotonic() + 5
    while count() < expect and time.monotonic() < deadline:
        time.sleep(0.02)
    if expect == 0:
        time.sleep(0.3)  # give an unwanted reboot the time to show
    return count()


def _on_trial(root: str, toplevel: str, timeout: float = 600) -> int:
    """Phase 3 of a receive with activation reboot and a confirm deadline (receive.py does the same)."""
    from reup_receiver.confirm import switch_armed

    device = Device(root)
    os.makedirs(device.state, exist_ok=True)
    with device.lock():
        number, _ = switch_armed(device, toplevel, "reboot", timeout)
    return number


def _boot_into(root: str, generation: int, toplevel: str) -> None:
    """What systemd-boot does when it boots the counted entry, and NixOS's stage 2 after it."""
    entries = os.path.join(root, "boot", "loader", "entries")
    os.rename(os.path.join(entries, f"reup-generation-{generation}+3.conf"),
              os.path.join(entries, f"reup-generation-{generation}+2-1.conf"))
    bootkit.set_booted(root, toplevel)


def test_reboot_is_an_activation_of_the_protocol_and_fleet_toml() -> None:
    assert "reboot" in ACTIONS
    assert receive_command("reboot", 300) == "receive --activate reboot --confirm-timeout 300"
    fleet = parse_fleet(f'[rollout]\nactivation = "reboot"\n[devices.a]\nhost = "h"\nhost_key = "{KEY}"\n')
    assert fleet.rollout.activation == "reboot"


def test_only_a_generation_that_changes_what_boots_goes_on_trial(tmp_path: str) -> None:
    root, old, new, same = _root(str(tmp_path))
    number = _on_trial(root, same)
    assert bootkit.activations(root) == ["same-kernel switch"]  # nothing that boots changed: switched
    assert _entries(root) == []
    assert _cli(root, "--confirm", str(number)).returncode == 0


def test_confirm_waits_for_the_reboot_then_checks_and_blesses(tmp_path: str) -> None:
    root, old, new, _ = _root(str(tmp_path))
    number = _on_trial(root, new)
    assert bootkit.activations(root) == [] and _entries(root) == [f"reup-generation-{number}+3.conf"]
    with open(os.path.join(root, "boot", "loader", "loader.conf")) as fh:
        assert fh.read() == "timeout 0\n"  # the pinned default would keep the loader from trying it
    early = _cli(root, "--confirm", str(number), "--check", CHECK)
    assert early.returncode == ExitCode.REBOOTING and "awaits the reboot" in early.stderr
    _boot_into(root, number, new)
    assert _cli(root, "--confirm", str(number), "--check", CHECK).returncode == 0
    assert _entries(root) == [f"reup-generation-{number}.conf"]
    with open(os.path.join(root, "boot", "loader", "loader.conf")) as fh:
        assert fh.read() == f"timeout 0\ndefault reup-generation-{number}.conf\n"
    status = _cli(root, "--status").json()
    assert status["current"] == new and status["pending"] is None and status["last_rollback"] is None


def test_failed_health_check_after_the_reboot_goes_back_and_reboots(tmp_path: str) -> None:
    root, old, new, _ = _root(str(tmp_path))
    number = _on_trial(root, new)
    _boot_into(root, number, new)
    run = _cli(root, "--confirm", str(number), "--check", "exit 3")
    assert run.returncode == ExitCode.HEALTH_CHECK_FAILED, run.stderr
    assert _entries(root) == []  # the counted entry is gone: the previous one boots
    assert bootkit.activations(root) == ["old boot"]
    assert _reboots(root, 1) == 1  # it ran the new kernel: back to the old one
    assert _cli(root, "--status").json()["current"] == old


def test_exhausted_entry_and_old_system_running_is_boot_failed(tmp_path: str) -> None:
    root, old, new, _ = _root(str(tmp_path))
    number = _on_trial(root, new)
    entries = os.path.join(root, "boot", "loader", "entries")
    os.rename(os.path.join(entries, f"reup-generation-{number}+3.conf"),
              os.path.join(entries, f"reup-generation-{number}+0-3.conf"))  # three boots, none came up
    status = _cli(root, "--status").json()
    assert status["last_rollback"]["reason"] == "boot_failed"
    assert status["current"] == old and status["pending"] is None
    assert [g["toplevel"] for g in status["generations"]] == [old]
    assert _entries(root) == [] and bootkit.activations(root) == ["old boot"]
    assert _reboots(root, 0) == 0  # it runs the old generation already
    run = _cli(root, "--confirm", str(number))
    assert run.returncode == ExitCode.NOT_PENDING and "boot_failed" in run.stderr
    # The controller's reading of both: a rollback (quarantine), with the device's reason.
    assert isinstance(classify_exit(run.returncode, run.stderr), RolledBackError)
    assert judge_timed_out(StatusAnswer.from_json(status), new, number) == ("rolled_back", "boot_failed")


def test_trial_without_a_confirm_deadline_is_judged_too(tmp_path: str) -> None:
    root, old, new, _ = _root(str(tmp_path))
    number, _ = switch_generation(Device(root), new, "reboot")
    entries = os.path.join(root, "boot", "loader", "entries")
    os.rename(os.path.join(entries, f"reup-generation-{number}+3.conf"),
              os.path.join(entries, f"reup-generation-{number}+0-3.conf"))
    status = _cli(root, "--status").json()
    assert (status["last_rollback"]["generation"], status["last_rollback"]["reason"]) == (number, "boot_failed")
    assert status["current"] == old and status["pending"] is None


def test_no_boot_loader_is_an_activation_failure_that_changes_nothing(tmp_path: str) -> None:
    root, old, new, _ = _root(str(tmp_path))
    bootkit.write_settings(root, boot_dir="/nowhere")
    try:
        _on_trial(root, new)
    except Exception as exc:
        assert type(exc).__name__ == "ActivationFailed" and "no boot loader" in str(exc)
    else:
        raise AssertionError("expected ActivationFailed")
    status = _cli(root, "--status").json()
    assert status["current"] == old and [g["toplevel"] for g in status["generations"]] == [old]
