"""Generations on the device: add one and switch the `system` profile to it, activate it, and revert.

Called by receive.py (phase 3 of a receive), confirm.py (rollback at the deadline or on a failed
health check) and maintenance.py (`--rollback`).
"""

from __future__ import annotations

import os
import subprocess

from reup_receiver.boot import counted
from reup_receiver.device import Device
from reup_receiver.errors import ActivationFailed


def switch_generation(device: Device, toplevel: str, activate: str) -> tuple[int, tuple[int, str] | None]:
    """Phase 3: new generation, atomic profile swap, activation with roll-back on failure.

    Returns the new generation's number and the previous generation.
    """
    previous = device.current()
    if activate == "reboot":
        changed = counted.changes(device, previous, toplevel)
        if changed:
            return _switch_for_reboot(device, toplevel, previous, changed), previous
        activate = "switch"  # nothing that boots changes: switch at once
    number = device.add_generation(toplevel)
    device.switch_to(number)
    try:
        run_activation(device, toplevel, activate)
    except ActivationFailed as exc:
        try:
            revert_to(device, previous, number, activate)
        except ActivationFailed as again:
            raise ActivationFailed(f"{exc}; {again}") from again
        raise ActivationFailed(f"{exc}; rolled back to generation "
                               f"{previous[0] if previous else 'none'}") from exc
    return number, previous


def revert_to(device: Device, previous: tuple[int, str] | None, failed: int, activate: str) -> None:
    """Put `system` back on `previous`, drop generation `failed`, re-activate `previous`."""
    reboot = False
    if activate == "reboot":
        activate, reboot = counted.revert(device, failed, previous[1] if previous else None)
    if previous is not None:
        device.switch_to(previous[0])
    else:
        device.clear_system()  # the device had no generation: none is better than a failed one
    device.drop_generation(failed)
    if previous is not None:
        try:
            run_activation(device, previous[1], activate)
        except ActivationFailed as exc:
            raise ActivationFailed(f"re-activating generation {previous[0]} also failed: {exc}") from exc
    if reboot:  # it runs the failed generation's kernel: back to the previous one's
        counted.reboot(device)


def run_activation(device: Device, toplevel: str, activate: str) -> None:
    if activate == "none":
        return
    script = device.host(toplevel + "/bin/switch-to-configuration")
    if not os.path.exists(script):
        raise ActivationFailed(f"activation failed: {toplevel} has no bin/switch-to-configuration")
    from reup_receiver.faults import FAULT_ENV

    env = {**{k: v for k, v in os.environ.items() if k != FAULT_ENV},
           "REUP_ROOT": device.root, "REUP_TOPLEVEL": toplevel}
    # Its own session: activation restarts sshd and the network, and the hangup that follows
    # must not kill it halfway (invariant 1). No stdin: it is not the SSH channel's.
    proc = subprocess.run([script, activate], env=env, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL, start_new_session=True)
    if proc.returncode != 0:
        detail = (proc.stderr.strip().splitlines() or [""])[-1]
        raise ActivationFailed(f"activation failed ({activate}, exit {proc.returncode}): {detail}")


def _switch_for_reboot(device: Device, toplevel: str, previous: tuple[int, str] | None,
                       changed: tuple[str, ...]) -> int:
    """Activation `reboot` of a generation that changes what boots: a counted boot entry instead
    of activating; the caller (cli.py) reboots once the answer is out."""
    number = device.add_generation(toplevel)
    try:
        counted.install(device, number, toplevel, previous, changed)
    except (OSError, ValueError) as exc:
        device.drop_generation(number)
        raise ActivationFailed(f"activation failed (reboot): boot entry for generation {number}: {exc}") from exc
    device.switch_to(number)
    return number
