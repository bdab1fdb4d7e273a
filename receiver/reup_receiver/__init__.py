"""reup-receiver: the passive device side of reup.

Reads a reup stream (docs/stream-format.md), stages and verifies every new
store path, installs it atomically, switches the system profile and activates.
"""
