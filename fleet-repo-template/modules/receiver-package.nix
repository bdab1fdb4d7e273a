# The reup-receiver Python package (`reup-receive`, the device side of reup), built with nixpkgs'
# Python from a copy of the reup repository's receiver/ directory. Used by receiver.nix (when
# reup.receiver.src is set) and by the reup repository's flake.nix (its packages.reup-receiver),
# so both build it the same way:
#
#   pkgs.callPackage ./receiver-package.nix { src = ./path/to/reup/receiver; }
#
# HDiffPatch, an optional codec of the receiver, is not in nixpkgs: the receiver reports the codecs
# it can apply (`reup-receive --status`) and the controller's encoder keeps to them.
{ lib, python3Packages, src, version ? "0.1.0" }:
python3Packages.buildPythonPackage {
  pname = "reup-receiver";
  inherit version src;
  dependencies = [ python3Packages.zstandard python3Packages.bsdiff4 ];
  pyproject = true;
  build-system = [ python3Packages.setuptools ];
  pythonImportsCheck = [ "reup_receiver" ];
  meta = {
    description = "Device side of reup: verified, atomic, resumable installs of Nix store paths from a reup stream";
    mainProgram = "reup-receive";
    platforms = lib.platforms.linux;
  };
}
