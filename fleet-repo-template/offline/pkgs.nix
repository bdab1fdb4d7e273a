# The packages of the offline fleet: plain derivations built with the host's tools (sandbox off).
# libsensor is a shared library; sensord is an ELF program linked against it by RPATH, so a new
# libsensor changes sensord's store path references the way a nixpkgs rebuild does.
{ system }:
let
  build = name: script: extra: derivation ({
    inherit name system;
    builder = "/bin/sh";
    args = [ "-c" ("PATH=/usr/bin:/bin; set -e; " + script) ];
  } // extra);
in rec {
  libsensor = version: build "libsensor-${version}" ''
    mkdir -p $out/lib $out/include
    cp ${./src/sensor.h} $out/include/sensor.h
    gcc -O2 -shared -fPIC -Wl,-soname,libsensor.so.1 -DLIBSENSOR_VERSION='"${version}"' \
      -I$out/include -o $out/lib/libsensor.so.1 ${./src/libsensor.c}
    ln -s libsensor.so.1 $out/lib/libsensor.so
  '' { };

  sensord = { version, lib }: build "sensord-${version}" ''
    mkdir -p $out/bin
    gcc -O2 -DSENSORD_VERSION='"${version}"' -I${lib}/include -L${lib}/lib -Wl,-rpath,${lib}/lib \
      -o $out/bin/sensord ${./src/sensord.c} -lsensor
  '' { };

  # Stands in for the kernel, initrd and firmware: large, and unchanged by most commits.
  firmware = board: build "firmware-${board}" ''
    mkdir -p $out/lib/firmware
    seq 1 90000 | sed 's/^/${board} calibration record /' > $out/lib/firmware/${board}.bin
  '' { };
}
