# reup.receiver: the device end of reup. Installs `reup-receive` as the forced command of the
# controller's SSH key(s), keeps the rollback deadline of an unconfirmed generation across reboots,
# and garbage-collects old generations. The same file is the reup flake's nixosModules.receiver
# (which sets `package` from the flake), so fleets and the reup repository share one definition.
#
# What the receiver does and needs (reup repository: receiver/reup_receiver/, docs/stream-format.md):
# - sshd's forced command `reup-receive --root / --ssh-command` runs only the receiver's verbs
#   (status, receive, confirm GEN, rollback, gc); `restrict` forbids forwarding and PTYs.
# - It writes /nix/store, the Nix database or its own path records (/nix/var/reup), the system
#   profile links, and runs switch-to-configuration: root's work. A non-root `user` gets it
#   through sudo (a rule for exactly that command line), which gives the key no less power.
# - NixOS mounts /nix/store read-only for everyone but the nix-daemon; the receiver is not the
#   daemon, so this module makes the store mount writable (`writableStore`).
# - After activating with a confirm timeout, the receiver writes /nix/var/reup/pending.json and
#   starts a detached watchdog that rolls back at the deadline unless `confirm GEN` arrives.
#   Every receiver call also rolls back an overdue generation, and the unit below runs the same
#   watchdog (`reup-receive --watchdog`) at boot and every `watchdogInterval`, so a deadline
#   holds when the device rebooted or the detached process was killed.
# - Activation `reboot` (fleet.toml): a generation that changes the kernel, initrd, kernel
#   parameters or device tree goes on trial in the boot loader with `bootCounting.tries` tries
#   (systemd-boot's `+TRIES` entries; U-Boot's bootcount/bootlimit/altbootcmd with extlinux; GRUB
#   with grubenv) and the device reboots into it; it is blessed only after the health check, and
#   the previous entry boots if it does not come up. Settings: /etc/reup/boot.json, written below.
# - Offline updates (`offline.enable`): a USB stick labelled REUP carrying bundles from
#   `reup export` is mounted by a udev-triggered unit, applied with `reup-receive --from-file`
#   (signature checked against `offline.signers`, the device's own name, no replays) and given a
#   receipt signed with the SSH host key; `reup import` on the controller reads the receipts.
{ config, lib, pkgs, options, ... }:
let
  cfg = config.reup.receiver;
  receive = "${cfg.package}/bin/reup-receive";
  forced = "${receive} --root / --ssh-command"
    + lib.optionalString (cfg.confirmTimeout != null) " --confirm-timeout ${toString cfg.confirmTimeout}";
  isRoot = cfg.user == "root";
  bc = cfg.bootCounting;
  loaders = config.boot.loader;
  detectedLoader =
    if loaders.systemd-boot.enable or false then "systemd-boot"
    else if loaders.generic-extlinux-compatible.enable or false then "uboot"
    else if loaders.grub.enable or false then "grub"
    else null;
  # U-Boot counting boots in its environment, kept in uboot.env on the FAT firmware partition
  # (CONFIG_ENV_IS_IN_FAT), and the default environment as a file for the install image.
  ubootWithBootcount = base: (base.override {
    extraConfig = (base.extraConfig or "") + ''
      CONFIG_BOOTCOUNT_LIMIT=y
      CONFIG_BOOTCOUNT_ENV=y
      CONFIG_ENV_IS_IN_FAT=y
      CONFIG_ENV_FAT_INTERFACE="mmc"
      CONFIG_ENV_FAT_DEVICE_AND_PART="0:1"
      CONFIG_ENV_FAT_FILE="uboot.env"
    '';
  }).overrideAttrs (old: {
    postBuild = (old.postBuild or "") + "\nmake -j$NIX_BUILD_CORES u-boot-initial-env\n";
    postInstall = (old.postInstall or "") + "\ncp u-boot-initial-env $out/\n";
  });
  command = if isRoot then forced else "/run/wrappers/bin/sudo -n ${forced}";

  ifDeclared = path: value:
    let opt = lib.attrByPath path null options;
    in lib.optionalAttrs (opt != null && lib.isOption opt && (opt.visible or true) != false)
      (lib.setAttrByPath path value);
  # nixos-24.11: boot.readOnlyNixStore; later NixOS: the mount options of the /nix/store bind mount.
  storeWritable =
    let old = ifDeclared [ "boot" "readOnlyNixStore" ] false;
    in if old != { } then old else ifDeclared [ "boot" "nixStoreMountOpts" ] [ "nodev" "nosuid" ];
in
{
  options.reup.receiver = {
    enable = lib.mkEnableOption ''
      the reup receiver: `reup-receive` as the forced command of the controller's SSH keys, the
      rollback-deadline watchdog unit and store garbage collection'';

    package = lib.mkOption {
      type = lib.types.package;
      default =
        if cfg.src != null then pkgs.callPackage ./receiver-package.nix { inherit (cfg) src; }
        else throw "reup.receiver: set reup.receiver.package (e.g. inputs.reup.packages.\${system}.reup-receiver) or reup.receiver.src";
      defaultText = lib.literalMD "built from `reup.receiver.src` with ./receiver-package.nix";
      description = "The reup-receiver package (provides `bin/reup-receive`).";
    };

    src = lib.mkOption {
      type = lib.types.nullOr lib.types.path;
      default = null;
      example = lib.literalExpression "./reup/receiver";
      description = "A copy of the reup repository's receiver/ directory, to build `package` from when it is not given.";
    };

    controllerKeys = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAA... reup-controller" ];
      description = ''
        Public keys of the controller (the private half is `[ssh] key` of its reup.toml; one per
        controller replica if they use different keys). Each becomes an `authorized_keys` line
        of `user`: `restrict,command="reup-receive --root / --ssh-command" KEY`.'';
    };

    user = lib.mkOption {
      type = lib.types.str;
      default = "root";
      example = "reup";
      description = ''
        The account the controller logs in as (`user` of the device in fleet.toml, default
        "root"). Installing store paths and activating a system need root; for another name this
        module creates a system user and a sudo rule that lets it run exactly the forced command
        as root (keeping SSH_ORIGINAL_COMMAND). That separates the login and logs the calls;
        it does not make the key less powerful.'';
    };

    confirmTimeout = lib.mkOption {
      type = lib.types.nullOr lib.types.ints.unsigned;
      default = null;
      example = 120;
      description = ''
        `--confirm-timeout` of the forced command: the rollback deadline (seconds) for streams
        whose `receive` does not give one. The controller always gives one (`confirm_timeout`
        of fleet.toml), so this matters for pushes by hand. null: no deadline by default.'';
    };

    keepGenerations = lib.mkOption {
      type = lib.types.ints.positive;
      default = 3;
      description = ''
        `reup-receive --gc --keep N`: system generations (besides the current one) whose store
        paths garbage collection keeps. The previous generation is what a rollback goes back to;
        collection is skipped while a generation awaits confirmation.'';
    };

    gcInterval = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = "daily";
      example = "weekly";
      description = "When the garbage collection timer runs (systemd OnCalendar); null: no timer.";
    };

    watchdogInterval = lib.mkOption {
      type = lib.types.str;
      default = "5min";
      description = ''
        How often the rollback-deadline unit looks for an overdue unconfirmed generation (it also
        runs at boot and, when one is pending, waits for its deadline).'';
    };

    bootCounting = {
      tries = lib.mkOption {
        type = lib.types.ints.between 1 9;
        default = 3;
        description = ''
          Activation `reboot`: how often the boot loader tries a generation that changes what
          boots before it boots the previous one again (the receiver then reports boot_failed).'';
      };
      loader = lib.mkOption {
        type = lib.types.nullOr (lib.types.enum [ "systemd-boot" "uboot" "grub" ]);
        default = detectedLoader;
        defaultText = lib.literalMD "systemd-boot, uboot (generic-extlinux-compatible) or grub, as enabled in `boot.loader`";
        description = "The boot loader whose entries the receiver writes for a generation on trial.";
      };
      bootDir = lib.mkOption {
        type = lib.types.str;
        default = if bc.loader == "systemd-boot" then loaders.efi.efiSysMountPoint or "/boot" else "/boot";
        defaultText = lib.literalMD "the ESP for systemd-boot, else /boot";
        description = "Where the loader's files live (the ESP; the partition holding extlinux/ or grub/).";
      };
      ubootEnvFile = lib.mkOption {
        type = lib.types.str;
        default = "/boot/firmware/uboot.env";
        description = "U-Boot's environment file (CONFIG_ENV_IS_IN_FAT), as mounted on the device.";
      };
      ubootBootDevice = lib.mkOption {
        type = lib.types.str;
        default = "mmc 0:2";
        description = "`sysboot` interface and partition of `bootDir`, for U-Boot's altbootcmd.";
      };
      ubootBase = lib.mkOption {
        type = lib.types.nullOr lib.types.package;
        default = null;
        example = lib.literalExpression "pkgs.ubootRaspberryPi4_64bit";
        description = "The board's U-Boot; `ubootPackage` is it built with bootcount and the environment in FAT.";
      };
      ubootPackage = lib.mkOption {
        type = lib.types.nullOr lib.types.package;
        readOnly = true;
        default = if bc.ubootBase == null then null else ubootWithBootcount bc.ubootBase;
        defaultText = lib.literalMD "`ubootBase` with CONFIG_BOOTCOUNT_LIMIT, CONFIG_BOOTCOUNT_ENV, CONFIG_ENV_IS_IN_FAT";
        description = "U-Boot for the install image: `u-boot.bin` and `u-boot-initial-env` (for mkenvimage).";
      };
    };

    offline = {
      enable = lib.mkEnableOption "updates from a USB stick labelled `offline.label` (bundles of `reup export`)";
      label = lib.mkOption {
        type = lib.types.str;
        default = "REUP";
        description = "File system label of the stick that triggers `reup-receive --from-file`.";
      };
      signers = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = cfg.controllerKeys;
        defaultText = lib.literalExpression "config.reup.receiver.controllerKeys";
        description = ''
          Public keys whose signature a bundle must carry (the controller's `[ssh] key`); written
          to /etc/reup/allowed_signers with the principal `reup-controller`.'';
      };
      deviceName = lib.mkOption {
        type = lib.types.str;
        default = config.networking.hostName;
        defaultText = lib.literalExpression "config.networking.hostName";
        description = "This device's name in fleet.toml: a bundle for another name is refused.";
      };
    };

    writableStore = lib.mkOption {
      type = lib.types.bool;
      default = true;
      description = ''
        Mount /nix/store read-write (`boot.readOnlyNixStore = false`, or the store mount options
        where NixOS has `boot.nixStoreMountOpts`): the receiver writes the store itself. Turn off
        only if something else makes the store writable for it.'';
    };
  };

  config = lib.mkIf cfg.enable (lib.mkMerge [
    {
      assertions = [
        {
          assertion = cfg.controllerKeys != [ ];
          message = "reup.receiver.controllerKeys: give the controller's public key(s).";
        }
      ];

      services.openssh.enable = true;
      users.users.${cfg.user}.openssh.authorizedKeys.keys =
        map (key: ''restrict,command="${command}" ${key}'') cfg.controllerKeys;

      # For the console: `reup-receive --status`, `--rollback`.
      environment.systemPackages = [ cfg.package ];

      # Activation `reboot` (receiver/reup_receiver/boot/): what the receiver needs to know.
      environment.etc."reup/boot.json".text = builtins.toJSON ({
        inherit (bc) tries;
        boot_dir = bc.bootDir;
        uboot_env = bc.ubootEnvFile;
        uboot_bootdev = bc.ubootBootDevice;
        reboot_command = [ "${config.systemd.package}/bin/systemctl" "reboot" ];
      } // lib.optionalAttrs (bc.loader != null) { inherit (bc) loader; });
      # The receiver blesses a counted entry after the health check, not systemd-bless-boot at
      # boot-complete.target; a kernel that panics must reset the board so the loader counts it.
      systemd.suppressedSystemUnits = [ "systemd-bless-boot.service" ];
      boot.kernelParams = [ "panic=10" ];

      systemd.services.reup-rollback-deadline = {
        description = "reup: roll back a generation not confirmed before its deadline";
        wantedBy = [ "multi-user.target" ];
        after = [ "local-fs.target" ];
        # It may be running the rollback (switch-to-configuration) itself: never restart or stop
        # it because a generation changed or removed the unit.
        restartIfChanged = false;
        unitConfig.X-StopOnRemoval = false;
        serviceConfig = {
          Type = "exec";
          ExecStart = "${receive} --root / --watchdog";
        };
      };
      systemd.timers.reup-rollback-deadline = {
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnBootSec = "2min";
          OnUnitInactiveSec = cfg.watchdogInterval;
        };
      };
    }

    (lib.mkIf (cfg.gcInterval != null) {
      systemd.services.reup-gc = {
        description = "reup: delete store paths that no kept system generation needs";
        serviceConfig = {
          Type = "oneshot";
          # Not while a generation awaits confirmation: its rollback needs the previous one.
          ExecCondition = "${pkgs.coreutils}/bin/test ! -e /nix/var/reup/pending.json";
          ExecStart = "${receive} --root / --gc --keep ${toString cfg.keepGenerations}";
          # 19: another reup-receive (an update) holds the device lock; the next run collects.
          SuccessExitStatus = [ 19 ];
          Nice = 19;
          IOSchedulingClass = "idle";
        };
      };
      systemd.timers.reup-gc = {
        wantedBy = [ "timers.target" ];
        timerConfig = {
          OnCalendar = cfg.gcInterval;
          Persistent = true;
          RandomizedDelaySec = "30min";
        };
      };
    })

    (lib.mkIf cfg.writableStore storeWritable)

    (lib.mkIf cfg.offline.enable {
      environment.etc."reup/allowed_signers".text =
        lib.concatMapStrings (key: "reup-controller ${key}\n") cfg.offline.signers;
      services.udev.extraRules = ''
        ACTION=="add", SUBSYSTEM=="block", ENV{ID_FS_LABEL}=="${cfg.offline.label}", TAG+="systemd", ENV{SYSTEMD_WANTS}+="reup-stick.service"
      '';
      systemd.services.reup-stick = {
        description = "reup: apply the update bundle on the stick labelled ${cfg.offline.label}";
        restartIfChanged = false;
        unitConfig.X-StopOnRemoval = false;
        path = [ pkgs.util-linux pkgs.openssh ];
        serviceConfig.Type = "oneshot";
        # The stick is mounted read-write only while the receipt is written; the exit code of
        # reup-receive (e.g. 27: refused) is the unit's result, the receipt on the stick says why.
        script = ''
          set -eu
          dir=/run/reup-stick
          mkdir -p "$dir"
          mount -o rw,nosuid,nodev,noexec /dev/disk/by-label/${cfg.offline.label} "$dir"
          trap 'sync; umount "$dir"' EXIT
          ${receive} --root / --from-file "$dir" --device ${lib.escapeShellArg cfg.offline.deviceName} \
            --allowed-signers /etc/reup/allowed_signers --host-key /etc/ssh/ssh_host_ed25519_key
        '';
      };
    })

    (lib.mkIf (!isRoot) {
      users.users.${cfg.user} = {
        isSystemUser = true;
        group = cfg.user;
        description = "reup controller login";
        home = "/var/empty";
        # sshd runs the forced command through the login shell.
        useDefaultShell = true;
      };
      users.groups.${cfg.user} = { };
      security.sudo = {
        enable = true;
        extraRules = [
          {
            users = [ cfg.user ];
            runAs = "root";
            commands = [ { command = forced; options = [ "NOPASSWD" ]; } ];
          }
        ];
        extraConfig = ''
          Defaults:${cfg.user} env_keep += "SSH_ORIGINAL_COMMAND"
        '';
      };
    })
  ]);
}
