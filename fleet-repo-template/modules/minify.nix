# reup.minify: shrink a device's NixOS closure the way reUpNix did ("installation minification"),
# so that there is less to store, to build and to send. One switch, `reup.minify.enable`, turns
# every part on; each part is its own option (default: reup.minify.enable) and can be turned off:
#
#   dropDocumentation  no man pages, info, /share/doc, NixOS manual
#   dropDefaultPackages  no nano, no default admin tools, no command-not-found, no logrotate
#   dropDesktop        no xdg menus/icons/mime/sounds/autostart, no fontconfig
#   dropNix            no Nix on the device (reup-receive installs store paths without it)
#   perlless           no Perl at run or switch time: Rust switch-to-configuration, userborn or
#                      systemd-sysusers for users, /etc as an overlay image, systemd in the initrd
#   readOnlyEtc        /etc is the read-only overlay of that image (host keys move to /var/lib/ssh)
#   oneLocale          one glibc locale (reup.minify.locale, default C.UTF-8)
#   smallSystemd       systemd without homed, machined, importd, ... (see lib.nix: smallSystemd)
#   kernel.lsmod       a kernel with only the modules the device uses (off unless set: below)
#
# Option names are those of nixos-24.11; a few options that newer or older NixOS renamed or
# removed are set only where this NixOS declares them (see `ifDeclared`).
{ config, lib, pkgs, options, ... }:
let
  cfg = config.reup.minify;
  helpers = import ./lib.nix;

  # Set `path` only when this NixOS declares it as a normal option (removed and renamed options
  # are declared too, as invisible ones that throw or warn when defined).
  ifDeclared = path: value:
    let opt = lib.attrByPath path null options;
    in lib.optionalAttrs (opt != null && lib.isOption opt && (opt.visible or true) != false)
      (lib.setAttrByPath path value);

  part = description: lib.mkOption {
    type = lib.types.bool;
    default = cfg.enable;
    defaultText = lib.literalExpression "config.reup.minify.enable";
    inherit description;
  };

  features = cfg.systemd.features;
  off = flag: cfg.smallSystemd && !(features.${flag} or true);

  # --- the kernel from lsmod --------------------------------------------------------------
  kcfg = cfg.kernel;
  lsmodModules = if kcfg.lsmod == null then [ ] else helpers.parseLsmod (builtins.readFile kcfg.lsmod);
  resolved = helpers.configFor (helpers.moduleConfig // kcfg.moduleConfig) (lsmodModules ++ kcfg.extraModules);
  settings = helpers.mergeSettings [ helpers.nixosBaseline resolved.settings ] // kcfg.extraConfig;
  kernelValue = v:
    if v == "y" then lib.kernel.yes
    else if v == "m" then lib.kernel.module
    else if v == "n" then lib.kernel.no
    else lib.kernel.freeform v;
  # Every symbol is optional: one the base kernel's Kconfig does not know is skipped, not an error.
  structured = lib.mapAttrs (_: v: lib.kernel.option (kernelValue v)) settings;
  minimalKernel = kcfg.base.override {
    # The base kernel's defconfig plus `structured`; no NixOS common config (which turns on
    # thousands of options) and no "answer m to every question" (autoModules).
    enableCommonConfig = false;
    autoModules = false;
    ignoreConfigErrors = true;
    structuredExtraConfig = structured;
  };
in
{
  options.reup.minify = {
    enable = lib.mkEnableOption ''
      the reup minification of this NixOS system, after reUpNix: every `reup.minify.*` part
      below whose default is this switch. Meant for headless devices that are updated by reup
      (no Nix, no documentation, no Perl, one locale, a smaller systemd)'';

    dropDocumentation = part ''
      Build the system without documentation: `documentation.{enable,man,info,doc,dev,nixos}`
      are off, so no man pages, info files, /share/doc or NixOS manual are in the closure.'';

    dropDefaultPackages = part ''
      No packages the device does not ask for: `environment.defaultPackages = [ ]` (perl, rsync,
      strace), nano (`programs.nano.enable`), command-not-found (a Perl script and a database),
      less's lesspipe, the stub ld.so, logrotate (the journal is the log).'';

    dropDesktop = part ''
      No desktop plumbing on a headless device: `xdg.{autostart,icons,menus,mime,sounds}` off
      and `fonts.fontconfig.enable = false`.'';

    dropNix = part ''
      No Nix on the device (`nix.enable = false`): no nix-daemon, no Nix tools, no nixos-rebuild
      (`system.disableInstallerTools`). reup-receive installs store paths and registers them
      without Nix, and the controller builds everything.'';

    perlless = part ''
      Activation and switching without Perl (the reUpNix "no perl" goal, today nixpkgs'
      perlless profile): Rust `switch-to-configuration` (`system.switch.enableNg` where this
      NixOS still has the choice), users and groups from userborn (`services.userborn`, or
      `systemd.sysusers` where userborn is not available) with `users.mutableUsers = false`,
      /etc built as an overlay image (`system.etc.overlay.enable`, which needs
      `boot.initrd.systemd.enable`), no NixOS containers (a Perl tool) and no GRUB (a Perl
      installer). `reup.minify.forbidPerl` turns it into a build-time check.'';

    forbidPerl = lib.mkOption {
      type = lib.types.bool;
      default = cfg.perlless;
      defaultText = lib.literalExpression "config.reup.minify.perlless";
      description = ''
        Fail the build when a store path with "perl" in its name is in the system closure
        (`system.forbiddenDependenciesRegexes`), so that a module pulling Perl back in is found
        at build time rather than on the device.'';
    };

    readOnlyEtc = part ''
      /etc is the read-only overlay of the generation's image (`system.etc.overlay.mutable =
      false`): nothing on the device can change it, and a generation's /etc is exactly what
      was built. sshd's host keys move to /var/lib/ssh (`services.openssh.hostKeys`), and
      /etc/machine-id stays empty (systemd mounts a fresh one at boot). Needs `perlless`.'';

    oneLocale = part ''
      Build glibc's locale archive with one locale, `reup.minify.locale`, instead of NixOS's
      default set (`i18n.supportedLocales`, `i18n.defaultLocale`).'';

    locale = lib.mkOption {
      type = lib.types.str;
      default = "C.UTF-8";
      example = "en_US.UTF-8";
      description = "The one locale of `reup.minify.oneLocale` (charset UTF-8).";
    };

    smallSystemd = part ''
      Use a systemd built without the parts `reup.minify.systemd.features` turns off
      (`systemd.package = pkgs.systemd.override features`), and turn off the NixOS services that
      need them (systemd-coredump, systemd-oomd, TPM2 units, NixOS containers). This replaces
      the service manager, its units and tools. Packages that link libsystemd from nixpkgs' full
      `pkgs.systemd` (rather than systemdLibs/systemdMinimal) still bring that one along: check
      the closure (`nix path-info -rS`), and see `reup.minify.systemd.overlay`.'';

    systemd.overlay = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = ''
        Replace `pkgs.systemd` for every package with the `smallSystemd` build (a nixpkgs
        overlay), so that one small systemd is in the closure. Everything that depends on
        systemd is then rebuilt locally: no binary cache has these builds.'';
    };

    systemd.features = lib.mkOption {
      type = lib.types.attrsOf lib.types.bool;
      default = helpers.smallSystemd;
      defaultText = lib.literalMD "`smallSystemd` of modules/lib.nix: withHomed, withMachined, withImportd, withPortabled, withRemote, withTpm2Tss, withCoredump, withOomd, withSysupdate, withVmspawn, withApparmor, withQrencode, withPasswordQuality, withDocumentation and withShellCompletions off";
      example = lib.literalExpression "{ withHomed = false; withMachined = false; }";
      description = ''
        Arguments of `pkgs.systemd.override` for `smallSystemd`. Each must be a flag of
        nixpkgs' systemd package (pkgs/os-specific/linux/systemd/default.nix); an unknown name
        is an evaluation error there.'';
    };

    kernel = {
      lsmod = lib.mkOption {
        type = lib.types.nullOr lib.types.path;
        default = null;
        example = lib.literalExpression "./board.lsmod";
        description = ''
          `lsmod` output (or /proc/modules) captured on the device after it has used all of
          its hardware. When set, the device gets a kernel built from `reup.minify.kernel.base`'s
          defconfig plus only the symbols of these modules (`reup.minify.kernel.moduleConfig`),
          plus what NixOS needs at boot, with no NixOS common config and no
          build-every-module, in the spirit of `make localmodconfig`; and the initrd gets no
          default module list (`boot.initrd.includeDefaultModules = false`), so
          `boot.initrd.availableKernelModules` must name only modules of this kernel.

          What this does not do: it does not read the kernel's Makefiles as localmodconfig does
          (modules missing from the table are only reported, see `unmappedModules`), it cannot
          see drivers built into the running kernel (they are not in lsmod: the defconfig and
          the NixOS baseline must provide them), and it cannot know hardware the device did not
          use while lsmod was captured. A new kernel runs after a reboot, and a kernel that does
          not boot is not rolled back by reup: try it on one device with console access first.
          Check the result with
          `nix build .#nixosConfigurations.<config>.config.boot.kernelPackages.kernel.configfile`.'';
      };

      base = lib.mkOption {
        type = lib.types.package;
        default = pkgs.linux;
        defaultText = lib.literalExpression "pkgs.linux";
        example = lib.literalExpression "pkgs.linux_6_12";
        description = ''
          The kernel whose source and defconfig the minimal kernel is built from (overridden
          with `enableCommonConfig = false`, `autoModules = false`, `structuredExtraConfig`).
          Set this instead of `boot.kernelPackages` when `lsmod` is set. /etc as an overlay
          (`readOnlyEtc`, `perlless`) needs 6.6 or newer on a switchable system.'';
      };

      moduleConfig = lib.mkOption {
        type = lib.types.attrsOf (lib.types.attrsOf lib.types.str);
        default = { };
        example = { mydriver = { MY_DRIVER = "m"; }; };
        description = ''
          More entries of the module -> Kconfig symbols table (`moduleConfig` in modules/lib.nix):
          module name (as lsmod prints it) -> { SYMBOL = "y" | "m"; }. Entries here replace
          the table's entry of the same module.'';
      };

      extraModules = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        default = [ ];
        example = [ "usb_storage" "uas" ];
        description = "Modules to build as if lsmod had shown them (hardware not plugged in when it was captured).";
      };

      extraConfig = lib.mkOption {
        type = lib.types.attrsOf lib.types.str;
        default = { };
        example = { PREEMPT = "y"; DEBUG_INFO = "n"; };
        description = "Kconfig symbols set last, over the table and the baseline (\"y\", \"m\", \"n\" or a freeform value).";
      };

      modules = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        readOnly = true;
        default = lsmodModules ++ kcfg.extraModules;
        defaultText = lib.literalMD "the modules of `lsmod` and `extraModules`";
        description = "The module names read from `lsmod`, and `extraModules`.";
      };

      unmappedModules = lib.mkOption {
        type = lib.types.listOf lib.types.str;
        readOnly = true;
        default = resolved.unmapped;
        defaultText = lib.literalMD "modules of `modules` missing from the table";
        description = "Modules the table does not know: they are not built (and a warning says so).";
      };

      settings = lib.mkOption {
        type = lib.types.attrsOf lib.types.str;
        readOnly = true;
        default = settings;
        defaultText = lib.literalMD "computed";
        description = "The Kconfig symbols given to the kernel build (all optional), for review.";
      };
    };
  };

  config = lib.mkMerge [
    (lib.mkIf cfg.dropDocumentation {
      documentation = {
        enable = false;
        man.enable = false;
        info.enable = false;
        doc.enable = false;
        dev.enable = false;
        nixos.enable = false;
      };
    })

    (lib.mkIf cfg.dropDefaultPackages (lib.mkMerge [
      {
        environment.defaultPackages = [ ];
        programs.command-not-found.enable = false;
        programs.less.lessopen = null;
        services.logrotate.enable = false;
      }
      (ifDeclared [ "programs" "nano" "enable" ] false)
      (ifDeclared [ "environment" "stub-ld" "enable" ] false)
    ]))

    (lib.mkIf cfg.dropDesktop {
      xdg.autostart.enable = false;
      xdg.icons.enable = false;
      xdg.menus.enable = false;
      xdg.mime.enable = false;
      xdg.sounds.enable = false;
      fonts.fontconfig.enable = false;
    })

    (lib.mkIf cfg.dropNix (lib.mkMerge [
      {
        nix.enable = false;
        system.disableInstallerTools = true;
      }
      # A flake-built system would otherwise point NIX_PATH and the flake registry at the
      # nixpkgs source, which would then be part of the closure.
      (ifDeclared [ "nixpkgs" "flake" "setNixPath" ] false)
      (ifDeclared [ "nixpkgs" "flake" "setFlakeRegistry" ] false)
    ]))

    (lib.mkIf cfg.perlless (lib.mkMerge [
      {
        boot.initrd.systemd.enable = true;
        system.etc.overlay.enable = true;
        users.mutableUsers = false;
        boot.enableContainers = false;
        boot.loader.grub.enable = lib.mkDefault false;
        programs.less.lessopen = null;
      }
      (ifDeclared [ "system" "switch" "enableNg" ] true)
      (let userborn = ifDeclared [ "services" "userborn" "enable" ] true;
       in if userborn != { } then userborn else { systemd.sysusers.enable = true; })
    ]))

    (lib.mkIf cfg.forbidPerl (ifDeclared [ "system" "forbiddenDependenciesRegexes" ] [ "perl" ]))

    (lib.mkIf cfg.readOnlyEtc {
      system.etc.overlay.mutable = false;
      services.openssh.hostKeys = lib.mkDefault [
        { type = "ed25519"; path = "/var/lib/ssh/ssh_host_ed25519_key"; }
      ];
    })

    (lib.mkIf cfg.oneLocale {
      i18n.defaultLocale = cfg.locale;
      i18n.supportedLocales = [ "${cfg.locale}/UTF-8" ];
    })

    (lib.mkIf cfg.smallSystemd (lib.mkMerge [
      { systemd.package = lib.mkDefault (pkgs.systemd.override features); }
      (lib.mkIf (off "withCoredump") { systemd.coredump.enable = false; })
      (lib.mkIf (off "withOomd") { systemd.oomd.enable = false; })
      (lib.mkIf (off "withMachined") { boot.enableContainers = false; })
      (lib.mkIf (off "withTpm2Tss") (ifDeclared [ "systemd" "tpm2" "enable" ] false))
      (lib.mkIf cfg.systemd.overlay {
        nixpkgs.overlays = [ (final: prev: { systemd = prev.systemd.override features; }) ];
      })
    ]))

    (lib.mkIf (kcfg.lsmod != null) {
      boot.kernelPackages = pkgs.linuxPackagesFor minimalKernel;
      boot.initrd.includeDefaultModules = false;
      warnings = lib.optional (resolved.unmapped != [ ]) ''
        reup.minify.kernel: no Kconfig symbols known for ${toString (builtins.length resolved.unmapped)} loaded module(s), which this kernel will not build: ${lib.concatStringsSep " " resolved.unmapped}. Add them to reup.minify.kernel.moduleConfig (module = { SYMBOL = "m"; }).'';
    })

    {
      assertions = [
        {
          assertion = cfg.readOnlyEtc -> cfg.perlless || config.system.etc.overlay.enable;
          message = "reup.minify.readOnlyEtc needs /etc as an overlay: reup.minify.perlless (or system.etc.overlay.enable).";
        }
      ];
    }
  ];
}
