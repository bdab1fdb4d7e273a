"""`reup demo` (what `make demo` runs): three devices installed, a change rolled out by wave, a revert
rolled back, metrics served; it exits 0, cleans up after itself and runs again."""

from __future__ import annotations

import os
import re
import subprocess

import pytest
from support.sshd import reup_bin

pytestmark = pytest.mark.slow


def run_demo(*args: str) -> str:
    r = subprocess.run([reup_bin(), "demo", *args], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "demo succeeded" in r.stdout
    return r.stdout


def sent(out: str, device: str, step: str) -> tuple[str, str]:
    m = re.search(rf"^{device}\s+{step}\s+(.+?) sent,\s+(.+?) as full NARs", out, re.MULTILINE)
    assert m, out
    return m.group(1), m.group(2)


def test_demo_twice(tmp_path: os.PathLike[str]) -> None:
    workdir = os.path.join(tmp_path, "demo")
    out = run_demo("--dir", workdir)
    assert out.count("3/3 devices in sync") == 3
    # The change reaches the Pis, canary first; the revert puts the old sensord back; the board never moves.
    for pi in ("pi-01", "pi-02"):
        assert (f"{pi} activations: ['switch pi sensord 1.4.0', 'switch pi sensord 1.5.0', "
                "'switch pi sensord 1.4.0']") in out
    assert "board-01 activations: ['switch board sensord 1.4.0']" in out
    live = out.split("a change to the pi system", 1)[1].split("git revert", 1)[0]
    assert live.index("pi-01     committed") < live.index("pi-02     pending -> ") < live.index("pi-02     committed")
    # Bytes: the change is a small delta of the new paths' NARs; the revert sends no NAR at all (held).
    assert sent(out, "pi-01", "change")[0].endswith(" B")
    assert sent(out, "pi-01", "revert")[1] == "0 B"
    assert "board-01  change" not in out
    assert re.search(r"reup_device_updates_total\{result=\"committed\"\} 7\.0", out)
    assert re.search(r"metrics: http://127\.0\.0\.1:\d+/metrics", out)
    # The devices are real: their stores verify with Nix, the profile is a generation link.
    root = os.path.join(workdir, "devices", "pi-01", "root")
    gen = os.readlink(os.path.join(root, "nix/var/nix/profiles/system"))
    assert gen == "system-3-link"
    check = subprocess.run(["nix", "--extra-experimental-features", "nix-command", "store", "verify", "--no-trust",
                            "--store", root, "--all"], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stderr
    # The lab's sshd processes are gone.
    for dev in ("pi-01", "pi-02", "board-01"):
        pid_file = os.path.join(workdir, "devices", dev, "sshd.pid")
        if os.path.exists(pid_file):
            with open(pid_file, encoding="ascii") as f:
                assert not os.path.exists(f"/proc/{f.read().strip()}")

    # The same --dir again is refused before anything starts; the first run's lab is left as it was.
    before = sorted(os.listdir(workdir))
    r = subprocess.run([reup_bin(), "demo", "--dir", workdir], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 2 and "not empty" in r.stderr and sorted(os.listdir(workdir)) == before

    # A second run (no --dir) works too and removes its temporary directory.
    again = run_demo()
    base = re.search(r"^reup demo in (\S+)", again, re.MULTILINE)
    assert base and not os.path.exists(base.group(1))
