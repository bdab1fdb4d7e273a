"""reup: GitOps delivery of NixOS system closures to device fleets by binary delta."""

__version__ = "0.1.0"
