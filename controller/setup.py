"""Build hook: the wheel carries the fleet-repo template (`reup init`) as package data.

The template lives at the repository's top (fleet-repo-template/, shared with the flake and the
NixOS modules); this copies it into the built package as reup/fleet_template when the build runs
from a source tree. Everything else is in pyproject.toml.
"""

from __future__ import annotations

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))
TEMPLATE = os.path.join(HERE, "..", "fleet-repo-template")


class BuildWithTemplate(build_py):
    def run(self) -> None:
        super().run()
        if os.path.isfile(os.path.join(TEMPLATE, "fleet.toml")) and not self.editable_mode:
            dest = os.path.join(self.build_lib, "reup", "fleet_template")
            shutil.rmtree(dest, ignore_errors=True)
            shutil.copytree(TEMPLATE, dest)


setup(cmdclass={"build_py": BuildWithTemplate})
