"""Boot counting for generations that change what boots (activation `reboot`).

`entry.py` says what boots and what a loader must do; `systemd_boot.py`, `uboot.py` and
`grub.py` write each loader's counted entry; `counted.py` runs the trial (install, judge,
bless, revert, reboot) for generations.py, confirm.py and cli.py.
"""
