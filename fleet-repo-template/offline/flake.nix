# The offline flavor of the fleet template: the same fleet as ../flake.nix (an x86_64 board and a
# Raspberry Pi class device; configurations `board` and `pi`) built from input-free derivations, so
# that it evaluates and builds with Nix alone: no nixpkgs, no network. `reup demo` and
# `reup init --offline` use it. Each toplevel has the shape of a NixOS system (bin/switch-to-configuration,
# etc/, sw/bin with real ELF programs built by the host's gcc against a shared library in another
# store path, firmware/), so what reup sends for a change here is what it sends for a real one.
{
  description = "A reup fleet, offline flavor (no inputs)";

  outputs = { self }:
    let
      # Both devices are built for the machine running the demo (`reup init --offline` writes its system here).
      system = "x86_64-linux";
      pkgs = import ./pkgs.nix { inherit system; };
      mkSystem = import ./system.nix { inherit system pkgs; };
    in {
      # reup builds nixosConfigurations.<config>.config.system.build.toplevel for each device of fleet.toml.
      nixosConfigurations = {
        board = mkSystem (import ./hosts/board.nix);
        pi = mkSystem (import ./hosts/pi.nix);
      };
    };
}
