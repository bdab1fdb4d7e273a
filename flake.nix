# Nix packaging of reup: the controller (`reup`) and the device side (`reup-receiver`), apps, NixOS
# modules (the controller as a service; the receiver and the minification modules, which are the
# fleet template's modules/*.nix files), a development shell and checks.
# CI does not build this (no nixpkgs offline there): tests/integration/test_nix_files.py parses it and
# evaluates what needs no nixpkgs; `make` + pip is the tested path.
{
  description = "reup: GitOps delivery of NixOS system closures to device fleets by binary delta";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAll = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});

      # The controller image's name: the chart's default image.repository (kept equal by a test).
      imageName = "ghcr.io/example/reup";

      mkPackages = pkgs:
        let
          py = pkgs.python3Packages;
          # One definition with the fleet template's receiver module.
          receiver = pkgs.callPackage ./fleet-repo-template/modules/receiver-package.nix { src = ./receiver; };
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
            makeWrapperArgs = [
              # builds (nix), signed commits (git verify-commit with gpg or ssh-keygen)
              "--prefix" "PATH" ":" (pkgs.lib.makeBinPath [ pkgs.nix pkgs.git pkgs.gnupg pkgs.openssh ])
              # `reup init` copies the fleet template from here
              "--set-default" "REUP_TEMPLATE_DIR" "${./fleet-repo-template}"
            ];
            pythonImportsCheck = [ "reup" ];
            meta.mainProgram = "reup";
          };
          # The controller's OCI image, the Helm chart's default (charts/reup/values.yaml image.*):
          # `nix build .#reup-image && docker load < result` (or skopeo copy docker-archive:result ...).
          # Everything lives in /nix/store; when the chart mounts its Nix volume over /nix, its
          # seed-nix init container first copies this closure into the volume (`nix copy --all`).
          reup-image = pkgs.dockerTools.buildLayeredImage {
            name = imageName;
            tag = reup.version;
            contents = [ reup pkgs.nix pkgs.git pkgs.openssh pkgs.cacert pkgs.coreutils pkgs.bashInteractive
                         pkgs.dockerTools.fakeNss ];  # ssh needs a passwd entry for its user
            includeNixDB = true;  # the image's own paths are valid store paths, for nix and the seed copy
            extraCommands = "mkdir -m 1777 tmp";
            config = {
              Entrypoint = [ "${reup}/bin/reup" ];
              Cmd = [ "run" "--config" "/etc/reup/reup.toml" ];
              Env = [
                "PATH=/bin"
                "SSL_CERT_FILE=${pkgs.cacert}/etc/ssl/certs/ca-bundle.crt"
                "NIX_CONFIG=experimental-features = nix-command flakes"
                "HOME=/var/lib/reup"
              ];
              ExposedPorts = { "9120/tcp" = { }; };
              WorkingDir = "/var/lib/reup";
            };
          };
        in {
          reup-receiver = receiver;
          inherit reup reup-image;
        };

      # Python tests that need neither network, sshd nor Nix builds (`nix flake check`).
      pureTests = [
        "tests/unit/test_planner.py" "tests/unit/test_planner_rollout.py" "tests/unit/test_controller_rollout_units.py"
        "tests/unit/test_controller_units.py" "tests/unit/test_controller_config.py" "tests/unit/test_delta_pairing.py"
        "tests/unit/test_literal.py" "tests/unit/test_wire_property.py" "tests/integration/test_nix_files.py"
      ];
    in {
      packages = forAll (pkgs: let p = mkPackages pkgs; in p // { default = p.reup; });

      apps = forAll (pkgs: let p = self.packages.${pkgs.system}; in {
        reup = { type = "app"; program = "${p.reup}/bin/reup"; };
        reup-receive = { type = "app"; program = "${p.reup-receiver}/bin/reup-receive"; };
        default = { type = "app"; program = "${p.reup}/bin/reup"; };
      });

      nixosModules = {
        # The device end: the fleet template's module, with this flake's receiver package.
        receiver = { lib, pkgs, ... }: {
          imports = [ ./fleet-repo-template/modules/receiver.nix ];
          reup.receiver.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.reup-receiver;
        };
        minify = ./fleet-repo-template/modules/minify.nix;

        # The controller as a systemd service: `reup run` with a reup.toml from `settings`.
        controller = { config, lib, pkgs, ... }:
          let
            cfg = config.services.reup-controller;
            toml = pkgs.formats.toml { };
            configFile = toml.generate "reup.toml" cfg.settings;
            credentials = "/run/credentials/reup-controller.service";
            credential = "${credentials}/ssh-key";
            # [source] credentials_dir file names (controller/reup/config/reup_toml.py)
            gitCredentialNames = [ "ssh_key" "known_hosts" "username" "password" "token" "ca_file" ];
          in {
            options.services.reup-controller = {
              enable = lib.mkEnableOption "the reup controller (`reup run`)";

              package = lib.mkOption {
                type = lib.types.package;
                default = self.packages.${pkgs.stdenv.hostPlatform.system}.reup;
                defaultText = lib.literalExpression "reup.packages.\${system}.reup";
                description = "The reup package.";
              };

              settings = lib.mkOption {
                type = toml.type;
                default = { };
                example = lib.literalExpression ''
                  {
                    source.url = "ssh://git@git.example.org/fleet.git";
                    source.branch = "main";
                    build.nix_options = { builders = "ssh://builder aarch64-linux"; };
                  }
                '';
                description = ''
                  reup.toml (every key: docs/controller.md). `source.url` is required;
                  `state.dir`, `ssh.key` and `http.listen` are filled in from `stateDir`,
                  `sshKeyFile` and `metrics`. Relative paths in it would be relative to the
                  Nix store: use absolute ones.'';
              };

              stateDir = lib.mkOption {
                type = lib.types.str;
                default = "/var/lib/reup";
                description = ''
                  State directory (SQLite database, git mirror, GC roots, delta cache), created by
                  systemd (StateDirectory), so it must be under /var/lib.'';
              };

              sshKeyFile = lib.mkOption {
                type = lib.types.nullOr lib.types.str;
                default = null;
                example = "/etc/reup/id_ed25519";
                description = ''
                  Private key the controller authenticates to devices with. Read by systemd
                  (LoadCredential), so it may be readable by root only; it is not copied to the
                  Nix store. Its public half goes into the devices' reup.receiver.controllerKeys.'';
              };

              gitCredentials = lib.mkOption {
                type = lib.types.attrsOf lib.types.str;
                default = { };
                example = { ssh_key = "/etc/reup/deploy_key"; known_hosts = "/etc/reup/git_known_hosts"; };
                description = ''
                  Files for a private fleet repo, by `[source] credentials_dir` key: ssh_key,
                  known_hosts (required for ssh://), username, password or token, ca_file. Passed by
                  systemd (LoadCredential) under these names, so they may be readable by root only
                  and are not copied to the Nix store; `source.credentials_dir` points at them.'';
              };

              metrics = {
                listenAddress = lib.mkOption {
                  type = lib.types.str;
                  default = "127.0.0.1";
                  example = "0.0.0.0";
                  description = "Address of /metrics, /healthz, /api/status and /webhook.";
                };
                port = lib.mkOption {
                  type = lib.types.port;
                  default = 9120;
                  description = "Port of the HTTP endpoints.";
                };
              };

              openFirewall = lib.mkOption {
                type = lib.types.bool;
                default = false;
                description = "Open `metrics.port` in the firewall.";
              };

              shard = lib.mkOption {
                type = lib.types.nullOr (lib.types.strMatching "[0-9]+/[0-9]+");
                default = null;
                example = "0/3";
                description = ''
                  `reup run --shard i/n`: manage only the devices of shard i of n (0 <= i < n),
                  one controller per shard, each with its own state directory.'';
              };

              user = lib.mkOption {
                type = lib.types.str;
                default = "reup";
                description = "User the controller runs as (created if it is \"reup\").";
              };

              nixTrusted = lib.mkOption {
                type = lib.types.bool;
                default = false;
                description = ''
                  Add `user` to nix.settings.trusted-users, so that `build.nix_options` that only
                  trusted users may pass (builders, substituters) take effect.'';
              };
            };

            config = lib.mkIf cfg.enable {
              assertions = [
                {
                  assertion = cfg.settings ? source && cfg.settings.source ? url;
                  message = "services.reup-controller.settings.source.url: the fleet repo is required.";
                }
                {
                  assertion = lib.all (n: lib.elem n gitCredentialNames) (lib.attrNames cfg.gitCredentials);
                  message = "services.reup-controller.gitCredentials: keys are ${lib.concatStringsSep ", " gitCredentialNames}.";
                }
                {
                  assertion = lib.hasPrefix "/var/lib/" cfg.stateDir;
                  message = "services.reup-controller.stateDir must be under /var/lib (StateDirectory).";
                }
              ];

              services.reup-controller.settings = {
                state.dir = lib.mkDefault cfg.stateDir;
                http.listen = lib.mkDefault "${cfg.metrics.listenAddress}:${toString cfg.metrics.port}";
                ssh = lib.mkIf (cfg.sshKeyFile != null) { key = lib.mkDefault credential; };
                source = lib.mkIf (cfg.gitCredentials != { }) { credentials_dir = lib.mkDefault credentials; };
              };

              users.users = lib.mkIf (cfg.user == "reup") {
                reup = { isSystemUser = true; group = "reup"; home = cfg.stateDir; };
              };
              users.groups = lib.mkIf (cfg.user == "reup") { reup = { }; };
              nix.settings.trusted-users = lib.mkIf cfg.nixTrusted [ cfg.user ];

              environment.systemPackages = [ cfg.package ];
              # `reup status --config /etc/reup/reup.toml`, `reup rollout pause ...` for operators.
              environment.etc."reup/reup.toml".source = configFile;

              networking.firewall.allowedTCPPorts = lib.mkIf cfg.openFirewall [ cfg.metrics.port ];

              systemd.services.reup-controller = {
                description = "reup controller: GitOps delivery of NixOS systems to devices";
                wantedBy = [ "multi-user.target" ];
                wants = [ "network-online.target" ];
                after = [ "network-online.target" "nix-daemon.socket" ];
                # nix for `nix eval`/`nix build` through the daemon, git for signature checks.
                path = [ config.nix.package pkgs.git pkgs.gnupg pkgs.openssh ];
                environment.HOME = cfg.stateDir;
                restartTriggers = [ configFile ];
                serviceConfig = {
                  ExecStart = lib.concatStringsSep " " ([ "${cfg.package}/bin/reup" "run" "--config" "${configFile}" ]
                    ++ lib.optionals (cfg.shard != null) [ "--shard" cfg.shard ]);
                  User = cfg.user;
                  Group = lib.mkIf (cfg.user == "reup") "reup";
                  StateDirectory = lib.removePrefix "/var/lib/" cfg.stateDir;
                  StateDirectoryMode = "0750";
                  WorkingDirectory = cfg.stateDir;
                  LoadCredential = lib.optional (cfg.sshKeyFile != null) "ssh-key:${cfg.sshKeyFile}"
                    ++ lib.mapAttrsToList (name: file: "${name}:${file}") cfg.gitCredentials;
                  Restart = "on-failure";
                  RestartSec = 10;
                  NoNewPrivileges = true;
                  PrivateTmp = true;
                  ProtectSystem = "full";
                  ProtectHome = true;
                };
              };
            };
          };
      };

      devShells = forAll (pkgs: {
        default = pkgs.mkShell {
          packages = [
            (pkgs.python3.withPackages (ps: with ps; [
              zstandard bsdiff4 pygit2 watchdog asyncssh tenacity prometheus-client pyzstd
              pytest pytest-xdist pytest-timeout hypothesis
            ]))
            pkgs.nix pkgs.git pkgs.openssh pkgs.zstd pkgs.xz pkgs.gnupg pkgs.ruff pkgs.mypy
          ];
          # Both distributions from the work tree, without installing them.
          shellHook = ''export PYTHONPATH="$PWD/receiver:$PWD/controller''${PYTHONPATH:+:$PYTHONPATH}"'';
        };
      });

      checks = forAll (pkgs:
        let p = self.packages.${pkgs.system}; in {
          inherit (p) reup reup-receiver;
          python-tests = pkgs.runCommand "reup-python-tests" {
            nativeBuildInputs = [
              (pkgs.python3.withPackages (ps: with ps; [
                p.reup-receiver pygit2 watchdog asyncssh tenacity prometheus-client zstandard pyzstd bsdiff4
                pytest pytest-xdist pytest-timeout hypothesis
              ]))
              pkgs.nix pkgs.git
            ];
          } ''
            cp -r ${self} src && chmod -R u+w src && cd src
            # Nix for tests/integration/test_nix_files.py (parse and evaluate only) with a store of its own.
            export HOME=$TMPDIR NIX_STATE_DIR=$TMPDIR/nix/var NIX_LOG_DIR=$TMPDIR/nix/log \
              NIX_CONF_DIR=$TMPDIR/nix/etc NIX_STORE_DIR=$TMPDIR/nix/store
            export PYTHONPATH=$PWD/controller:$PWD/lab''${PYTHONPATH:+:$PYTHONPATH}
            python -m pytest -p no:cacheprovider ${pkgs.lib.concatStringsSep " " pureTests}
            touch $out
          '';
        });
    };
}
