"""A kernel that cannot boot rolls itself back, on a real (virtual) machine: OVMF + systemd-boot +
Linux under qemu TCG (reup_lab.uefivm). The receiver installs a generation with activation
`reboot` from a real stream; systemd-boot tries the bad generation's entry `tries` times (its
initramfs panics, `panic=1` resets the VM), then boots the previous entry; the receiver reports
`boot_failed` and `system` is the old generation again. A good generation boots, passes the health
check through `confirm`, is blessed (its entry loses the counter) and boots so from then on.

`make vm-test` runs this directory. `make test` runs only the bad-kernel scenario (marked slow:
one qemu run, three firmware starts, 40-80 s of TCG); the others need REUP_VM_TEST=1, which
`make vm-test` sets.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import pytest
from reup.core.model import Device
from reup.io.answers import RolledBackError
from reup.io.ssh import PushOutcome, SshPusher
from reup_lab import uefivm
from reup_lab.simdevice import SimDevice, generate_key
from support import bootkit
from support.receiverkit import Run, receive
from support.streams import TreeEncoder, fake_store_name

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200),  # TCG on 2 busy cores: minutes, not seconds
              pytest.mark.skipif(bool(uefivm.available()), reason=f"VM test needs {uefivm.available()}")]

TRIES = 2
PARAMS = "console=ttyS0 panic=1"
# What the check sees on the device: it runs the generation it is asked to confirm.
CHECK = 'test "$(readlink "$REUP_ROOT/run/booted-system")" = "$REUP_TOPLEVEL"'
TIMINGS: list[tuple[str, float, int]] = []
vm_test_only = pytest.mark.skipif(os.environ.get("REUP_VM_TEST") != "1", reason="make vm-test (REUP_VM_TEST=1)")


@dataclass
class VmDevice:
    root: str
    esp: str
    vm: uefivm.UefiVm
    kernel: str  # device path of the one kernel
    first: str  # generation 1's toplevel

    def run(self, *args: str, stream: bytes | None = None) -> Run:
        return receive(self.root, stream, *args, env={**os.environ})

    def status(self) -> dict[str, object]:
        run = self.run("--status")
        assert run.returncode == 0, run.stderr
        return run.json()  # type: ignore[no-any-return]

    def entries(self) -> list[str]:
        return sorted(os.listdir(os.path.join(self.esp, "loader", "entries")))

    def boot(self, what: str) -> uefivm.Boot:
        """Power the VM on with the device's ESP; it runs until a generation boots and powers off."""
        self.vm.write_esp(self.esp)
        result = self.vm.boot(timeout=900)
        self.vm.read_esp(self.esp)
        bootkit.set_booted(self.root, result.booted_init)
        TIMINGS.append((what, result.seconds, result.firmware_starts))
        return result


@pytest.fixture
def device() -> Iterator[VmDevice]:
    tmp = tempfile.mkdtemp(prefix="reup-vm-")
    yield make_device(tmp)
    shutil.rmtree(tmp, ignore_errors=True)


def make_device(tmp: str) -> VmDevice:
    root = os.path.join(tmp, "dev", "root")  # where SimDevice("vm", tmp/dev) has its root
    kernel_image = uefivm.kernel_image()
    assert kernel_image is not None
    with open(kernel_image, "rb") as fh:
        kernel = bootkit.add_file(root, "linux", "bzImage", fh.read())
    initrd = bootkit.add_file(root, "initrd-good", "initrd", uefivm.initramfs(uefivm.GOOD_INIT))
    first = bootkit.add_toplevel(root, "v1", kernel, initrd, PARAMS)
    bootkit.set_profile(root, [first])
    bootkit.set_booted(root, first)
    # The ESP as NixOS's systemd-boot installer leaves it: generation 1's entry, pinned as default.
    esp = os.path.join(root, "boot")
    os.makedirs(os.path.join(esp, "EFI", "BOOT"))
    os.makedirs(os.path.join(esp, "EFI", "nixos"))
    os.makedirs(os.path.join(esp, "loader", "entries"))
    shutil.copyfile(uefivm.SYSTEMD_BOOT, os.path.join(esp, "EFI", "BOOT", "BOOTX64.EFI"))
    shutil.copyfile(bootkit_host(root, kernel), os.path.join(esp, "EFI", "nixos", "linux.efi"))
    shutil.copyfile(bootkit_host(root, initrd), os.path.join(esp, "EFI", "nixos", "initrd-1.efi"))
    with open(os.path.join(esp, "loader", "loader.conf"), "w") as fh:
        fh.write("timeout 0\ndefault nixos-generation-1.conf\n")
    with open(os.path.join(esp, "loader", "entries", "nixos-generation-1.conf"), "w") as fh:
        fh.write(f"title NixOS generation 1\nversion Generation 1\nlinux /EFI/nixos/linux.efi\n"
                 f"initrd /EFI/nixos/initrd-1.efi\noptions init={first}/init {PARAMS}\n")
    bootkit.write_settings(root, loader="systemd-boot", tries=TRIES, reboot_delay=0,
                           reboot_command=["sh", "-c", 'touch "$REUP_ROOT/reboot-requested"'])
    return VmDevice(root, esp, uefivm.UefiVm(os.path.join(tmp, "vm")), kernel, first)


def bootkit_host(root: str, device_path: str) -> str:
    return os.path.join(root, device_path.lstrip("/"))


def _generation_stream(dev: VmDevice, label: str, init_script: str) -> tuple[bytes, str]:
    """A real stream carrying a new initrd and a toplevel that boots it with the same kernel."""
    work = tempfile.mkdtemp(prefix="reup-vm-gen-")
    initrd_name = fake_store_name(7, f"initrd-{label}").decode()
    top_name = fake_store_name(7, f"nixos-system-{label}").decode()
    initrd_dir = os.path.join(work, "initrd")
    os.makedirs(initrd_dir)
    with open(os.path.join(initrd_dir, "initrd"), "wb") as fh:
        fh.write(uefivm.initramfs(init_script))
    top_dir = os.path.join(work, "top")
    os.makedirs(os.path.join(top_dir, "bin"))
    os.symlink(dev.kernel, os.path.join(top_dir, "kernel"))
    os.symlink(f"/nix/store/{initrd_name}/initrd", os.path.join(top_dir, "initrd"))
    with open(os.path.join(top_dir, "kernel-params"), "w") as fh:
        fh.write(PARAMS)
    with open(os.path.join(top_dir, "init"), "w") as fh:
        fh.write("#!/bin/sh\n")
    script = os.path.join(top_dir, "bin", "switch-to-configuration")
    with open(script, "w") as fh:
        fh.write(f'#!/bin/sh\nmkdir -p "$REUP_ROOT/var/log"\necho "{label} $1" >> "$REUP_ROOT/var/log/activations"\n')
    os.chmod(script, 0o755)
    enc = TreeEncoder()
    enc.add(top_dir, top_name.encode())
    enc.add(initrd_dir, initrd_name.encode())
    data = enc.stream(toplevel=0).encode()
    shutil.rmtree(work)
    return data, f"/nix/store/{top_name}"


def _wait_reboot_request(dev: VmDevice, timeout: float = 5.0) -> None:
    marker = os.path.join(dev.root, "reboot-requested")
    deadline = time.monotonic() + timeout
    while not os.path.exists(marker) and time.monotonic() < deadline:  # detached, after the answer
        time.sleep(0.05)
    assert os.path.exists(marker), "the receiver did not ask for a reboot"
    os.unlink(marker)


def _install(dev: VmDevice, label: str, init_script: str) -> tuple[int, str]:
    stream, toplevel = _generation_stream(dev, label, init_script)
    run = dev.run("--activate", "reboot", "--confirm-timeout", "900", stream=stream)
    assert run.returncode == 0, run.stderr
    answer = run.json()
    assert answer["toplevel"] == toplevel
    _wait_reboot_request(dev)
    return int(answer["generation"]), toplevel


def test_bad_kernel_falls_back_and_reports_boot_failed(device: VmDevice) -> None:
    dev = device
    gen, bad = _install(dev, "bad", uefivm.BAD_INIT)
    assert dev.entries() == ["nixos-generation-1.conf", f"reup-generation-{gen}+{TRIES}.conf"]
    assert bootkit.activations(dev.root) == []  # not activated: it waits for the reboot
    early = dev.run("--confirm", str(gen), "--check", CHECK)
    assert early.returncode == 26, early.stderr  # not rebooted yet: the controller asks again

    boot = dev.boot("bad generation, then the fallback")
    assert boot.panics == TRIES  # systemd-boot tried the counted entry TRIES times
    assert boot.firmware_starts == TRIES + 1
    assert boot.booted_init == dev.first  # then it booted the previous entry
    assert dev.entries() == ["nixos-generation-1.conf", f"reup-generation-{gen}+0-{TRIES}.conf"]

    status = dev.status()  # the receiver's first call after the boot settles the trial
    rb = status["last_rollback"]
    assert isinstance(rb, dict) and (rb["generation"], rb["reason"]) == (gen, "boot_failed")
    assert status["current"] == dev.first and status["pending"] is None
    assert dev.entries() == ["nixos-generation-1.conf"]  # the exhausted entry is gone
    assert bootkit.activations(dev.root) == ["v1 boot"]  # the previous generation's boot entry, again
    late = dev.run("--confirm", str(gen), "--check", CHECK)
    assert late.returncode == 24 and "boot_failed" in late.stderr, late.stderr
    _print_timings()


@vm_test_only
def test_good_kernel_is_blessed_after_the_check(device: VmDevice) -> None:
    dev = device
    gen, good = _install(dev, "good", uefivm.GOOD_INIT + "# the good generation\n")
    boot = dev.boot("good generation")
    assert (boot.panics, boot.firmware_starts, boot.booted_init) == (0, 1, good)
    assert dev.entries() == ["nixos-generation-1.conf", f"reup-generation-{gen}+{TRIES - 1}-1.conf"]
    ok = dev.run("--confirm", str(gen), "--check", CHECK)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout) == {"confirmed": gen}
    assert dev.entries() == ["nixos-generation-1.conf", f"reup-generation-{gen}.conf"]  # blessed
    status = dev.status()
    assert status["current"] == good and status["pending"] is None

    boot = dev.boot("blessed generation")  # from now on it boots without counting
    assert (boot.panics, boot.firmware_starts, boot.booted_init) == (0, 1, good)
    assert dev.entries() == ["nixos-generation-1.conf", f"reup-generation-{gen}.conf"]
    _print_timings()


def _print_timings() -> None:
    for what, seconds, starts in TIMINGS:
        print(f"VM boot: {what}: {seconds:.1f} s, {starts} firmware start(s)")
    TIMINGS.clear()


@dataclass(frozen=True)
class _StreamFile:
    path: str
    stream_bytes: int
    nar_bytes: int


class _OneStream:
    """The controller's stream source for this test: the generation's real stream, whatever the
    device holds (it holds generation 1, which the stream does not need)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def get(self, held: Sequence[str], target: str, staged: Sequence[str] = (), avoid: Sequence[str] = (),
            codecs: Sequence[str] | None = None) -> _StreamFile:
        size = os.path.getsize(self.path)
        return _StreamFile(self.path, size, size)


@vm_test_only
def test_controller_reports_boot_failed_then_commits_a_good_kernel(tmp_path: str) -> None:
    """The controller's SSH executor against the device behind a real sshd: push with activation
    `reboot`, confirm across the reboot; the bad kernel -> RolledBackError naming boot_failed (the
    executor records `rolled_back` and quarantines the revision), the good one -> acknowledged."""
    tmp = tempfile.mkdtemp(prefix="reup-vm-")
    dev = make_device(tmp)
    key = os.path.join(tmp, "id_ed25519")
    sim = SimDevice("vm", os.path.join(tmp, "dev"), generate_key(key))
    sim.prepare()
    sim.start()
    target = Device("vm", "127.0.0.1", sim.host_key, port=sim.port, user=getpass.getuser())
    try:
        def push(label: str, init_script: str) -> tuple[str, PushOutcome | Exception, uefivm.Boot]:
            stream, toplevel = _generation_stream(dev, label, init_script)
            path = os.path.join(tmp, f"{label}.stream")
            with open(path, "wb") as fh:
                fh.write(stream)
            pusher = SshPusher(_OneStream(path), key=key, connect_timeout=10, attempts=1)

            def reboot() -> uefivm.Boot:
                _wait_reboot_request(dev, timeout=120)
                return dev.boot(f"{label} generation, pushed by the controller")

            async def both() -> tuple[PushOutcome | Exception, uefivm.Boot]:
                vm = asyncio.create_task(asyncio.to_thread(reboot))
                try:
                    pushed = await pusher.push(target, toplevel, activation="reboot", confirm_timeout=900)
                    if pushed.generation is not None and pushed.confirm_deadline is not None:
                        await pusher.confirm(target, toplevel, pushed.generation, pushed.confirm_deadline, CHECK)
                    outcome: PushOutcome | Exception = pushed
                except RolledBackError as exc:
                    outcome = exc
                return outcome, await vm

            outcome, boot = asyncio.run(both())
            return toplevel, outcome, boot

        _, outcome, boot = push("bad", uefivm.BAD_INIT)
        assert (boot.panics, boot.booted_init) == (TRIES, dev.first)
        assert isinstance(outcome, RolledBackError) and "boot_failed" in str(outcome), outcome
        assert dev.status()["current"] == dev.first

        good, outcome, boot = push("good", uefivm.GOOD_INIT + "# the good generation\n")
        assert (boot.panics, boot.booted_init) == (0, good)
        assert isinstance(outcome, PushOutcome) and outcome.toplevel == good, outcome
        assert dev.entries() == ["nixos-generation-1.conf", f"reup-generation-{outcome.generation}.conf"]
        status = dev.status()
        assert status["current"] == good and status["pending"] is None
        _print_timings()
    finally:
        sim.stop()
        shutil.rmtree(tmp, ignore_errors=True)
