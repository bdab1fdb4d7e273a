"""Installed outside the source tree: the wheels carry what the commands need (the fleet template as
package data), not the lab; `reup init` works from an install alone and `reup demo` says what it lacks."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
pytestmark = pytest.mark.slow


def test_wheels_install_and_run_outside_the_tree(tmp_path: str) -> None:
    out, target = os.path.join(str(tmp_path), "wheels"), os.path.join(str(tmp_path), "site")
    os.makedirs(out)
    for project in ("receiver", "controller"):
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out,
                        os.path.join(ROOT, project)], check=True, capture_output=True, timeout=300, cwd=out)
    wheels = sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".whl"))
    controller = next(w for w in wheels if os.path.basename(w).startswith("reup-"))
    names = zipfile.ZipFile(controller).namelist()
    assert "reup/fleet_template/fleet.toml" in names and "reup/fleet_template/offline/flake.nix" in names
    assert not any(n.startswith("reup_lab/") for n in names)  # the lab is not in the product
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, *wheels],
                   check=True, capture_output=True, timeout=300)
    # -S: no site hooks, so the source tree's editable installs are invisible; third-party packages
    # come from the test environment's site-packages, after the install.
    env = {k: v for k, v in os.environ.items() if k not in ("REUP_TEMPLATE_DIR", "PYTHONPATH")}
    env["PYTHONPATH"] = os.pathsep.join([target, sysconfig.get_paths()["purelib"]])

    def reup(*args: str) -> subprocess.CompletedProcess[str]:
        code = "import sys; from reup.cli.main import main; sys.exit(main(sys.argv[1:]))"
        return subprocess.run([sys.executable, "-S", "-c", code, *args], capture_output=True, text=True,
                              timeout=120, check=False, env=env, cwd=str(tmp_path))

    where = subprocess.run([sys.executable, "-S", "-c", "import reup; print(reup.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(target), where
    assert reup("--version").stdout.strip() == "reup 0.1.0"
    dest = os.path.join(str(tmp_path), "fleet")
    r = reup("init", "--offline", dest)
    assert r.returncode == 0, r.stderr
    assert os.path.isfile(os.path.join(dest, "hosts", "pi.nix"))
    demo = reup("demo")
    assert demo.returncode == 2 and "the demo needs the lab" in demo.stderr and "Traceback" not in demo.stderr
