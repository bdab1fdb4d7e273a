"""`reup demo` (what `make demo` runs) converges both rollouts and says so."""

from __future__ import annotations

import os
import subprocess

import pytest
from support.sshd import reup_bin

pytestmark = pytest.mark.slow


def test_demo(tmp_path: os.PathLike[str]) -> None:
    workdir = os.path.join(tmp_path, "demo")
    r = subprocess.run([reup_bin(), "demo", "--devices", "3", "--dir", workdir],
                       capture_output=True, text=True, timeout=240, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert out.count("3/3 devices in sync") == 2
    assert "demo succeeded" in out
    assert "dev-2 activations: ['switch sensor 1.0', 'switch sensor 1.1']" in out
    assert "dev-1 activations: ['switch gateway 1.0']" in out
    assert 'reup_device_updates_total{result="committed"} 1.0' in out  # second rollout: the sensor only
    # The lab's sshd processes are gone.
    pids = [os.path.join(workdir, "devices", d, "sshd.pid") for d in ("dev-1", "dev-2", "dev-3")]
    for pid_file in pids:
        if os.path.exists(pid_file):
            with open(pid_file, encoding="ascii") as f:
                assert not os.path.exists(f"/proc/{f.read().strip()}")
