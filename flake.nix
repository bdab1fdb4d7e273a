# Nix packaging of reup: the device side (reup-receiver) and the controller (reup), plus a
# NixOS module that installs the receiver as the forced command of the controller's SSH key.
# Not exercised by CI (no nixpkgs offline there); `make` + pip is the tested path.
{
  description = "reup: GitOps delivery of NixOS system closures to device fleets by binary delta";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.05";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      mkPackages = pkgs:
        let
          py = pkgs.python3Packages;
          receiver = py.buildPythonPackage {
            pname = "reup-receiver";
            version = "0.1.0";
            pyproject = true;
            src = ./receiver;
            build-system = [ py.setuptools ];
            # HDiffPatch is optional on the device: the receiver reports what it can apply.
            dependencies = [ py.zstandard py.bsdiff4 ];
          };
        in {
          reup-receiver = py.toPythonApplication receiver;
          reup = py.buildPythonApplication {
            pname = "reup";
            version = "0.1.0";
            pyproject = true;
            src = ./controller;
            build-system = [ py.setuptools ];
            dependencies = [ receiver py.pygit2 py.watchdog py.asyncssh py.tenacity
                             py.prometheus-client py.zstandard py.pyzstd py.bsdiff4 ];
            # hdiffpatch is not in nixpkgs; the encoder then uses its other codecs.
            pythonRemoveDeps = [ "hdiffpatch" ];
            makeWrapperArgs = [ "--prefix PATH : ${pkgs.lib.makeBinPath [ pkgs.nix pkgs.git ]}" ];
          };
        };
    in {
      packages = forAll (pkgs: let p = mkPackages pkgs; in p // { default = p.reup; });

      nixosModules.reup-receiver = { config, lib, pkgs, ... }:
        let
          cfg = config.services.reup-receiver;
          receive = "${self.packages.${pkgs.system}.reup-receiver}/bin/reup-receive";
        in {
          options.services.reup-receiver = {
            enable = lib.mkEnableOption "the reup receiver as the forced command of the controller's key";
            controllerKey = lib.mkOption {
              type = lib.types.str;
              description = "The controller's SSH public key (ssh-ed25519 AAAA... reup-controller).";
            };
          };
          config = lib.mkIf cfg.enable {
            services.openssh.enable = true;
            users.users.root.openssh.authorizedKeys.keys = [
              ''restrict,command="${receive} --root / --ssh-command" ${cfg.controllerKey}''
            ];
          };
        };
    };
}
