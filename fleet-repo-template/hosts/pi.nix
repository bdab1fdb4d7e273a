# The Raspberry Pi class device (nixosConfigurations.pi; device pi-01 in fleet.toml): a Pi 4 with an
# SD card, booted the way nixpkgs' aarch64 SD images boot (Raspberry Pi firmware -> U-Boot ->
# extlinux.conf -> mainline kernel). It reads its SoC temperature into the journal. Install it by
# writing the image of ./pi-sd-image.nix to an SD card (`nix build .#pi-sd-image`); reup
# updates it from then on.
{ config, lib, pkgs, ... }:
{
  networking.hostName = "pi";

  boot.loader.grub.enable = false;
  boot.loader.generic-extlinux-compatible.enable = true;
  boot.loader.generic-extlinux-compatible.configurationLimit = 5;
  # As nixpkgs' sd-image-aarch64.nix: serial consoles, then the screen.
  boot.kernelParams = [ "console=ttyS0,115200n8" "console=ttyAMA0,115200n8" "console=tty0" ];
  # Only the Pi 4's device trees in /boot, not every board's.
  hardware.deviceTree.filter = "bcm2711-rpi-*.dtb";
  boot.initrd.availableKernelModules = [ "mmc_block" "usbhid" "usb_storage" "vc4" "pcie_brcmstb" "reset-raspberrypi" ];

  # The SD image's root file system (sdImage.rootVolumeLabel of nixpkgs' sd-image.nix).
  fileSystems."/" = { device = "/dev/disk/by-label/NIXOS_SD"; fsType = "ext4"; };

  # Boot counting for activation = "reboot" (modules/receiver.nix): U-Boot built with bootcount
  # and its environment in uboot.env on the firmware partition, which the receiver writes.
  reup.receiver.bootCounting.ubootBase = pkgs.ubootRaspberryPi4_64bit;
  fileSystems."/boot/firmware" = {
    device = "/dev/disk/by-label/FIRMWARE";
    fsType = "vfat";
    options = [ "nofail" "noatime" ];
  };

  # The device's job: log the SoC temperature every minute.
  systemd.services.soc-temperature = {
    description = "Log the SoC temperature";
    serviceConfig.Type = "oneshot";
    serviceConfig.DynamicUser = true;
    script = ''echo "soc_temp_millicelsius $(< /sys/class/thermal/thermal_zone0/temp)"'';
  };
  systemd.timers.soc-temperature = {
    wantedBy = [ "timers.target" ];
    timerConfig.OnCalendar = "minutely";
  };
}
