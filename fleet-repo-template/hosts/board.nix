# The x86_64 board (nixosConfigurations.board; device board-01 in fleet.toml): a UEFI box with an
# NVMe disk and Intel NICs that runs the site's MQTT broker. Installed once with
# `nixos-install --flake .#board` from a NixOS installer (which brings its own Nix); reup updates
# it from then on.
{ config, lib, pkgs, ... }:
{
  networking.hostName = "board";

  # UEFI with systemd-boot (its installer is Python, not Perl; GRUB's is Perl).
  boot.loader.systemd-boot.enable = true;
  boot.loader.systemd-boot.configurationLimit = 5;
  boot.loader.efi.canTouchEfiVariables = true;

  # What nixos-generate-config finds on such a board; the partitions carry these labels.
  boot.initrd.availableKernelModules = [ "nvme" "xhci_pci" "ahci" "usb_storage" "sd_mod" ];
  fileSystems."/" = { device = "/dev/disk/by-label/nixos"; fsType = "ext4"; };
  fileSystems."/boot" = {
    device = "/dev/disk/by-label/boot";
    fsType = "vfat";
    options = [ "fmask=0077" "dmask=0077" ];
  };

  # A kernel with only the modules this board uses (modules/minify.nix, reup.minify.kernel):
  # capture `lsmod > hosts/board.lsmod` on the board after it has used all of its hardware,
  # check the initrd modules above against it, try it on one board with a console, then enable:
  # reup.minify.kernel.lsmod = ./board.lsmod;

  # The site's MQTT broker (sensors publish to it; tighten the ACL for production).
  services.mosquitto = {
    enable = true;
    listeners = [
      {
        port = 1883;
        omitPasswordAuth = true;
        settings.allow_anonymous = true;
        acl = [ "topic readwrite sensors/#" ];
      }
    ];
  };
  networking.firewall.allowedTCPPorts = [ 1883 ];
}
