# A reup fleet repo: one NixOS configuration per kind of device. The reup controller builds
# nixosConfigurations.<config>.config.system.build.toplevel for every device of fleet.toml and
# sends each device the difference from what it runs. Here: an x86_64 board (`board`) and a
# Raspberry Pi class device (`pi`), both minified (modules/minify.nix) and running the reup
# receiver (modules/receiver.nix).
{
  description = "A reup fleet: NixOS for an x86_64 board and a Raspberry Pi class device";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-24.11";
    # PLACEHOLDER: where your copy of the reup repository lives (a git+https://, git+ssh:// or
    # path: URL). Only its packages.<system>.reup-receiver is used; the modules are in ./modules.
    reup.url = "github:example/reup";
    reup.inputs.nixpkgs.follows = "nixpkgs";
  };

  outputs = { self, nixpkgs, reup }:
    let
      device = system: host: nixpkgs.lib.nixosSystem {
        modules = [
          ./modules/minify.nix
          ./modules/receiver.nix
          ./hosts/common.nix
          host
          {
            nixpkgs.hostPlatform = system;
            reup.receiver.package = reup.packages.${system}.reup-receiver;
          }
        ];
      };
    in
    {
      # fleet.toml names these in each device's `config`. Devices sharing one share its build.
      nixosConfigurations = {
        board = device "x86_64-linux" ./hosts/board.nix;
        pi = device "aarch64-linux" ./hosts/pi.nix;
      };

      # Install media: `nix build .#pi-sd-image` (on aarch64, or with an aarch64 builder).
      packages.aarch64-linux.pi-sd-image =
        (self.nixosConfigurations.pi.extendModules { modules = [ ./hosts/pi-sd-image.nix ]; })
        .config.system.build.sdImage;
    };
}
