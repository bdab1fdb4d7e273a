{
  description = "A reup fleet: one NixOS configuration per kind of device";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";

  outputs = { self, nixpkgs }:
    let
      # Everything every device runs; each host file adds what is specific to it.
      common = ./hosts/common.nix;
      system = modules: nixpkgs.lib.nixosSystem {
        system = "aarch64-linux";
        modules = [ common ] ++ modules;
      };
    in {
      # reup builds nixosConfigurations.<config>.config.system.build.toplevel for each device of
      # fleet.toml (`config` defaults to the device name). Several devices may share one.
      nixosConfigurations = {
        gateway = system [ ./hosts/gateway.nix ];
        sensor = system [ ./hosts/sensor.nix ];
      };
    };
}
