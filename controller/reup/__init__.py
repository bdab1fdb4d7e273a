"""reup: GitOps delivery of NixOS system closures to device fleets by binary delta."""
