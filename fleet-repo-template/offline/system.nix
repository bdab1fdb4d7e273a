# mkSystem: a host description (hosts/*.nix) -> { config.system.build.toplevel } (the attribute path reup
# builds, as for a NixOS configuration), a toplevel shaped like a NixOS system.
# bin/switch-to-configuration is what reup-receive runs to activate; here it records the activation in
# $REUP_ROOT/activations (the simulated device's root) instead of starting services.
{ system, pkgs }:
host:
let
  lib = pkgs.libsensor host.libsensor;
  sensord = pkgs.sensord { version = host.sensord.version; inherit lib; };
  firmware = pkgs.firmware host.board;
  conf = builtins.toFile "sensord.conf" ''
    interval = ${toString host.sensord.interval}
    sensors = ${builtins.concatStringsSep "," host.sensord.sensors}
  '';
  activate = builtins.toFile "switch-to-configuration" ''
    #!/bin/sh
    echo "$1 ${host.hostName} sensord ${host.sensord.version}" >> "$REUP_ROOT/activations"
  '';
in {
config.system.build.toplevel = derivation {
  name = "nixos-system-${host.hostName}-${host.release}";
  inherit system;
  builder = "/bin/sh";
  args = [ "-c" ''
    PATH=/usr/bin:/bin; set -e
    mkdir -p $out/bin $out/etc $out/sw/bin
    echo ${host.hostName} > $out/etc/hostname
    printf '%s\n' ${builtins.toJSON host.motd} > $out/etc/motd
    cp ${conf} $out/etc/sensord.conf
    ln -s ${sensord}/bin/sensord $out/sw/bin/sensord
    ln -s ${firmware}/lib/firmware $out/firmware
    echo ${host.release} > $out/nixos-version
    cp ${activate} $out/bin/switch-to-configuration
    chmod +x $out/bin/switch-to-configuration
  '' ];
};
}
