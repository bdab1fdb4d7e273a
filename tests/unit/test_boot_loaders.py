"""Boot counting's files, golden: what each loader module writes for a generation on trial, how it
reads the loader's counter back, blessing and discarding (reup_receiver.boot). The boot loaders
themselves run in the VM test (tests/vm/); here the counter is moved the way each loader moves it."""

from __future__ import annotations

import os
import struct
import zlib

import pytest
from reup_receiver.boot.entry import BootEntry, EntryState, boot_changes
from reup_receiver.boot.grub import Grub, encode_grubenv, read_grubenv
from reup_receiver.boot.systemd_boot import SystemdBoot
from reup_receiver.boot.uboot import UBoot, encode_env, read_env
from reup_receiver.device import Device
from support.bootkit import add_file, add_toplevel, store_name, tree

KERNEL_A = f"/nix/store/{store_name('linux-6.1')}/bzImage"
KERNEL_B = f"/nix/store/{store_name('linux-6.6')}/bzImage"


def _device(root: str) -> tuple[Device, str, str, str]:
    ka = add_file(root, "linux-6.1", "bzImage", b"kernel A")
    kb = add_file(root, "linux-6.6", "bzImage", b"kernel B")
    ia = add_file(root, "initrd-a", "initrd", b"initrd A")
    old = add_toplevel(root, "old", ka, ia, "console=ttyS0 panic=1")
    new = add_toplevel(root, "new", kb, ia, "console=ttyS0 panic=1")
    params = add_toplevel(root, "params", ka, ia, "console=ttyS0 panic=1 quiet")
    return Device(root), old, new, params


def test_boot_changes_name_what_differs(tmp_path: str) -> None:
    device, old, new, params = _device(str(tmp_path))
    assert boot_changes(device, old, new) == ("kernel",)
    assert boot_changes(device, old, params) == ("kernel-params",)
    assert boot_changes(device, old, old) == ()
    assert boot_changes(device, None, new) == ("kernel", "initrd", "kernel-params")


def test_systemd_boot_counted_entry_golden(tmp_path: str) -> None:
    root = str(tmp_path)
    device, old, new, _ = _device(root)
    esp = os.path.join(root, "boot")
    os.makedirs(os.path.join(esp, "loader", "entries"))
    with open(os.path.join(esp, "loader", "loader.conf"), "w") as fh:
        fh.write("timeout 3\ndefault nixos-generation-1.conf\n")
    loader = SystemdBoot(device, "/boot")
    written = loader.install(BootEntry.of(device, 2, new), BootEntry.of(device, 1, old), 3)
    kname = f"{store_name('linux-6.6')}-bzImage.efi"
    iname = f"{store_name('initrd-a')}-initrd.efi"
    assert written == [f"EFI/reup/{kname}", f"EFI/reup/{iname}", "loader/entries/reup-generation-2+3.conf"]
    assert tree(esp) == {
        f"EFI/reup/{kname}": b"kernel B",
        f"EFI/reup/{iname}": b"initrd A",
        "loader/loader.conf": b"timeout 3\n",  # no pinned default: the entries' order decides
        "loader/entries/reup-generation-2+3.conf": (
            "title reup generation 2\nversion 2\n"
            f"linux /EFI/reup/{kname}\ninitrd /EFI/reup/{iname}\n"
            f"options init={new}/init console=ttyS0 panic=1\n").encode(),
    }
    entries = os.path.join(esp, "loader", "entries")
    assert loader.state(2) == EntryState.UNTRIED
    os.rename(os.path.join(entries, "reup-generation-2+3.conf"), os.path.join(entries, "reup-generation-2+2-1.conf"))
    assert loader.state(2) == EntryState.TRYING
    os.rename(os.path.join(entries, "reup-generation-2+2-1.conf"), os.path.join(entries, "reup-generation-2+0-3.conf"))
    assert loader.state(2) == EntryState.EXHAUSTED
    loader.bless(2)
    assert sorted(os.listdir(entries)) == ["reup-generation-2.conf"]
    assert loader.state(2) == EntryState.BLESSED
    with open(os.path.join(esp, "loader", "loader.conf")) as fh:
        assert fh.read() == "timeout 3\ndefault reup-generation-2.conf\n"
    loader.install(BootEntry.of(device, 3, old), BootEntry.of(device, 2, new), 3)
    loader.discard(3)  # generation 3's kernel goes with its entry; generation 2's files stay
    assert sorted(os.listdir(os.path.join(esp, "EFI", "reup"))) == sorted([kname, iname])
    loader.discard(2)
    assert loader.state(2) == EntryState.ABSENT
    assert os.listdir(os.path.join(esp, "EFI", "reup")) == []


def _uboot_env(path: str, env: dict[str, str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(encode_env(env))


def test_uboot_env_format_is_crc_then_nul_separated_pairs(tmp_path: str) -> None:
    data = encode_env({"bootcmd": "run distro_bootcmd", "bootdelay": "2"}, size=64)
    body = b"bootcmd=run distro_bootcmd\0bootdelay=2\0\0"
    assert data == struct.pack("<I", zlib.crc32(body + b"\0" * (60 - len(body)))) + body + b"\0" * (60 - len(body))
    path = os.path.join(str(tmp_path), "uboot.env")
    with open(path, "wb") as fh:
        fh.write(data)
    assert read_env(path) == {"bootcmd": "run distro_bootcmd", "bootdelay": "2"}
    with open(path, "r+b") as fh:
        fh.seek(10)
        fh.write(b"X")
    with pytest.raises(ValueError, match="CRC"):
        read_env(path)


def test_uboot_extlinux_and_bootcount_golden(tmp_path: str) -> None:
    root = str(tmp_path)
    device, old, new, _ = _device(root)
    env_file = os.path.join(root, "boot", "firmware", "uboot.env")
    _uboot_env(env_file, {"bootcmd": "run distro_bootcmd"})
    original = "DEFAULT nixos-default\nLABEL nixos-default\n  LINUX ../nixos/x-Image\n"
    os.makedirs(os.path.join(root, "boot", "extlinux"))
    with open(os.path.join(root, "boot", "extlinux", "extlinux.conf"), "w") as fh:
        fh.write(original)
    loader = UBoot(device, "/boot", "/boot/firmware/uboot.env", "mmc 0:2")
    loader.install(BootEntry.of(device, 2, new), BootEntry.of(device, 1, old), 3)
    files = tree(os.path.join(root, "boot"))
    assert files["extlinux/reup-fallback.conf"] == original.encode()
    kname, iname = f"{store_name('linux-6.6')}-bzImage", f"{store_name('initrd-a')}-initrd"
    assert files["extlinux/extlinux.conf"].decode() == (
        "# reup: generation 2 on trial (3 boots, U-Boot bootcount); the previous entries are in reup-fallback.conf\n"
        "DEFAULT reup-2\nTIMEOUT 10\n"
        "LABEL reup-2\n  MENU LABEL reup generation 2\n"
        f"  LINUX ../reup/{kname}\n  INITRD ../reup/{iname}\n"
        f"  APPEND init={new}/init console=ttyS0 panic=1\n")
    assert read_env(env_file) == {
        "bootcmd": "run distro_bootcmd", "bootlimit": "3", "bootcount": "0", "upgrade_available": "1",
        "reup_trial": "2", "reup_bootdev": "mmc 0:2",
        "altbootcmd": "setenv upgrade_available 0; saveenv; "
                      "sysboot ${reup_bootdev} any ${scriptaddr} /boot/extlinux/reup-fallback.conf"}
    assert loader.state(2) == EntryState.UNTRIED
    for count, state in (("1", EntryState.TRYING), ("3", EntryState.TRYING), ("4", EntryState.EXHAUSTED)):
        env = read_env(env_file)
        _uboot_env(env_file, {**env, "bootcount": count})  # as U-Boot counts at each boot
        assert loader.state(2) == state
    loader.discard(2)
    with open(os.path.join(root, "boot", "extlinux", "extlinux.conf")) as fh:
        assert fh.read() == original
    env = read_env(env_file)
    assert (env["upgrade_available"], env["bootcount"], "altbootcmd" in env) == ("0", "0", False)


def test_uboot_bless_stops_counting(tmp_path: str) -> None:
    root = str(tmp_path)
    device, old, new, _ = _device(root)
    env_file = os.path.join(root, "boot", "firmware", "uboot.env")
    _uboot_env(env_file, {"bootcmd": "run distro_bootcmd"})
    loader = UBoot(device, "/boot", "/boot/firmware/uboot.env", "mmc 0:2")
    loader.install(BootEntry.of(device, 2, new), BootEntry.of(device, 1, old), 2)
    fallback = tree(os.path.join(root, "boot"))["extlinux/reup-fallback.conf"].decode()
    assert fallback.startswith("DEFAULT reup-1\nLABEL reup-1\n")  # no loader file before: made from generation 1
    loader.bless(2)
    env = read_env(env_file)
    assert (env["upgrade_available"], env["bootcount"], env["reup_blessed"]) == ("0", "0", "2")
    assert loader.state(2) == EntryState.BLESSED
    assert not os.path.exists(os.path.join(root, "boot", "extlinux", "reup-fallback.conf"))


def test_uboot_refuses_without_an_environment(tmp_path: str) -> None:
    root = str(tmp_path)
    device, old, new, _ = _device(root)
    with pytest.raises(FileNotFoundError):
        UBoot(device, "/boot", "/boot/firmware/uboot.env", "mmc 0:2").install(
            BootEntry.of(device, 2, new), BootEntry.of(device, 1, old), 3)
    assert not os.path.exists(os.path.join(root, "boot", "extlinux"))


def test_grub_trial_script_and_grubenv_golden(tmp_path: str) -> None:
    root = str(tmp_path)
    device, old, new, _ = _device(root)
    loader = Grub(device, "/boot")
    loader.install(BootEntry.of(device, 2, new), BootEntry.of(device, 1, old), 2)
    files = tree(os.path.join(root, "boot"))
    kname, iname = f"{store_name('linux-6.6')}-bzImage", f"{store_name('initrd-a')}-initrd"
    assert files["grub/reup.cfg"].decode() == (
        "# reup: generation 2 on trial, 2 boots counted in grubenv (reup_tries); at 0 the\n"
        "# default of grub.cfg (the previous generation) boots.\n"
        "load_env reup_trial reup_tries\n"
        'if [ "$reup_trial" = "2" ]; then\n'
        '  if [ "$reup_tries" = "2" ]; then set reup_tries="1"; save_env reup_tries; set default="reup-2"\n'
        '  elif [ "$reup_tries" = "1" ]; then set reup_tries="0"; save_env reup_tries; set default="reup-2"\n'
        "  fi\nfi\n"
        'menuentry "reup generation 2" --id reup-2 {\n'
        f"  linux /boot/reup/{kname} init={new}/init console=ttyS0 panic=1\n"
        f"  initrd /boot/reup/{iname}\n}}\n")
    block = files["grub/grubenv"]
    assert len(block) == 1024
    assert block.startswith(b"# GRUB Environment Block\nreup_limit=2\nreup_trial=2\nreup_tries=2\n###")
    env_path = os.path.join(root, "boot", "grub", "grubenv")
    assert loader.state(2) == EntryState.UNTRIED
    for left, state in (("1", EntryState.TRYING), ("0", EntryState.EXHAUSTED), ("1", EntryState.TRYING)):
        block = encode_grubenv({**read_grubenv(env_path), "reup_tries": left})
        with open(env_path, "wb") as fh:  # as the script's save_env does at each boot
            fh.write(block)
        assert loader.state(2) == state
    loader.bless(2)
    assert loader.state(2) == EntryState.BLESSED
    with open(os.path.join(root, "boot", "grub", "reup.cfg")) as fh:
        assert fh.read().startswith('# reup: generation 2, blessed\nset default="reup-2"\nmenuentry "reup generation 2"')
