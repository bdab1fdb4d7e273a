# Shared by every device of the fleet.
{ pkgs, ... }:
let
  # The controller's public key (the private half is `[ssh] key` in reup.toml).
  controllerKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPLACEHOLDERreplaceWithYourControllerKey0000 reup-controller";
  # reup-receive, packaged from this repository's receiver/ (a Python application with no Nix dependency).
  reup-receive = pkgs.python3Packages.buildPythonApplication {
    pname = "reup-receiver";
    version = "0.1.0";
    pyproject = true;
    src = ./reup-receiver;  # copy or submodule receiver/ from the reup repository here
    build-system = [ pkgs.python3Packages.setuptools ];
    # hdiffpatch is not in nixpkgs: package it from PyPI the same way and add it here.
    dependencies = with pkgs.python3Packages; [ zstandard bsdiff4 ];
  };
in {
  boot.loader.grub.enable = false;
  boot.loader.generic-extlinux-compatible.enable = true;
  fileSystems."/" = { device = "/dev/disk/by-label/NIXOS_SD"; fsType = "ext4"; };

  services.openssh = {
    enable = true;
    settings.PasswordAuthentication = false;
  };

  # The controller may run reup-receive's verbs and nothing else.
  users.users.root.openssh.authorizedKeys.keys = [
    ''restrict,command="${reup-receive}/bin/reup-receive --root / --ssh-command" ${controllerKey}''
  ];

  system.stateVersion = "24.11";
}
