# Shared by every device of the fleet: the reup receiver and its controller key, the minified
# system (modules/minify.nix), SSH for operators, networking. Each hosts/<config>.nix adds what
# its kind of device needs.
{ config, lib, pkgs, ... }:
{
  # Everything reUpNix-style minification offers (no Nix, no Perl, no docs, read-only /etc, one
  # locale, a smaller systemd). The kernel part is per host: see hosts/board.nix.
  reup.minify.enable = true;

  reup.receiver = {
    enable = true;
    # PLACEHOLDER: the controller's public key (the private half is `[ssh] key` in reup.toml).
    controllerKeys = [
      "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPLACEHOLDERreplaceWithYourControllerKey0000 reup-controller"
    ];
    keepGenerations = 3;
  };

  # Operators log in with their own keys (the controller's key can run reup-receive and nothing
  # else). PLACEHOLDER: your operators' keys; with users.mutableUsers = false (minify) root has no
  # password, so a key is the only way in besides the console.
  users.users.root.openssh.authorizedKeys.keys = [
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPLACEHOLDERreplaceWithAnOperatorKey000000000 operator"
  ];
  services.openssh = {
    enable = true;
    settings = {
      PasswordAuthentication = false;
      KbdInteractiveAuthentication = false;
    };
  };

  # systemd-networkd with DHCP on every wired interface; resolved keeps /etc/resolv.conf a link
  # into /run, which a read-only /etc needs.
  networking.useNetworkd = true;
  networking.useDHCP = false;
  systemd.network.networks."10-wired" = {
    matchConfig.Name = "en* eth*";
    networkConfig.DHCP = "yes";
  };
  services.resolved.enable = true;

  time.timeZone = "UTC";
  system.stateVersion = "24.11";
}
