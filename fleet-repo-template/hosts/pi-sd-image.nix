# Install media for the Pi: an SD card image of the `pi` configuration (flake output
# packages.aarch64-linux.pi-sd-image), built with nixpkgs' sd-image module and the Raspberry Pi 4
# firmware files of nixpkgs' sd-image-aarch64.nix. Only the image uses this module: the system
# reup deploys is nixosConfigurations.pi, and its first update is a delta from this image.
{ config, lib, pkgs, modulesPath, ... }:
{
  imports = [ "${modulesPath}/installer/sd-card/sd-image.nix" ];

  sdImage = {
    populateFirmwareCommands =
      let
        uboot = config.reup.receiver.bootCounting.ubootPackage;
        configTxt = pkgs.writeText "config.txt" ''
          [pi4]
          kernel=u-boot-rpi4.bin
          enable_gic=1
          armstub=armstub8-gic.bin
          disable_overscan=1
          arm_boost=1

          [all]
          arm_64bit=1
          enable_uart=1
          avoid_warnings=1
        '';
      in
      ''
        (cd ${pkgs.raspberrypifw}/share/raspberrypi/boot && cp bootcode.bin fixup*.dat start*.elf $NIX_BUILD_TOP/firmware/)
        cp ${configTxt} firmware/config.txt
        cp ${uboot}/u-boot.bin firmware/u-boot-rpi4.bin
        # U-Boot's default environment as uboot.env: boot counting keeps its counter there.
        ${pkgs.ubootTools}/bin/mkenvimage -s 0x4000 -o firmware/uboot.env ${uboot}/u-boot-initial-env
        cp ${pkgs.raspberrypi-armstubs}/armstub8-gic.bin firmware/armstub8-gic.bin
        cp ${pkgs.raspberrypifw}/share/raspberrypi/boot/bcm2711-rpi-4-b.dtb firmware/
      '';
    populateRootCommands = ''
      mkdir -p ./files/boot
      ${config.boot.loader.generic-extlinux-compatible.populateCmd} -c ${config.system.build.toplevel} -d ./files/boot
    '';
  };

  # sd-image.nix's first-boot script registers the store with nix-store, makes the system profile
  # with nix-env and touches /etc/NIXOS: the device has no Nix (reup.minify.dropNix) and a
  # read-only /etc. This does the rest without them: grow the root partition, and make the running
  # system generation 1 of the system profile, which is what reup-receive reports to the
  # controller. The store needs no database: without one the receiver takes the paths in
  # /nix/store as held and keeps its own records of what it installs.
  boot.postBootCommands = lib.mkForce ''
    if [ -f ${config.sdImage.nixPathRegistrationFile} ]; then
      set -euo pipefail
      rootPart=$(${pkgs.util-linux}/bin/findmnt -n -o SOURCE /)
      bootDevice=$(${pkgs.util-linux}/bin/lsblk -npo PKNAME "$rootPart")
      partNum=$(${pkgs.util-linux}/bin/lsblk -npo MAJ:MIN "$rootPart" | ${pkgs.gawk}/bin/awk -F: '{print $2}')
      echo ",+," | ${pkgs.util-linux}/bin/sfdisk -N"$partNum" --no-reread "$bootDevice"
      ${pkgs.parted}/bin/partprobe
      ${pkgs.e2fsprogs}/bin/resize2fs "$rootPart"

      mkdir -p /nix/var/nix/profiles
      ln -sfn "$(readlink -f /run/current-system)" /nix/var/nix/profiles/system-1-link
      ln -sfn system-1-link /nix/var/nix/profiles/system
      rm -f ${config.sdImage.nixPathRegistrationFile}
    fi
  '';
}
