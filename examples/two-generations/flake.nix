# Two generations of a tiny NixOS-shaped system, buildable offline (no nixpkgs):
# a shared library, a program linked to it with an RPATH, config, and a toplevel
# whose bin/switch-to-configuration records each activation. gen2 bumps the
# library and changes one config value. Used by the README's walkthrough.
{
  outputs = { self }:
    let
      system = "x86_64-linux";
      sh = name: script: extra: derivation ({
        inherit name system;
        builder = "/bin/sh";
        args = [ "-c" ("PATH=/usr/bin:/bin; set -e; " + script) ];
      } // extra);
      generation = { libVersion, interval }:
        let
          lib = sh "libgreet-${libVersion}" ''
            mkdir -p $out/lib; cd $TMPDIR
            echo 'const char *greet(void) { return "hello from ${libVersion}"; }' > g.c
            gcc -shared -fPIC -o $out/lib/libgreet.so.${libVersion} g.c
            ln -s libgreet.so.${libVersion} $out/lib/libgreet.so
          '' { };
          app = sh "greeter-1.0" ''
            mkdir -p $out/bin; cd $TMPDIR
            printf '#include <stdio.h>\nconst char *greet(void);\nint main(void) { puts(greet()); return 0; }\n' > m.c
            gcc -o $out/bin/greeter m.c -L${lib}/lib -lgreet -Wl,-rpath,${lib}/lib
          '' { };
          etc = sh "etc" ''
            mkdir -p $out/etc; echo "interval = ${toString interval}" > $out/etc/greeter.conf
          '' { };
        in sh "nixos-system-demo" ''
          mkdir -p $out/bin; ln -s ${app} $out/sw; ln -s ${etc}/etc $out/etc
          printf '#!/bin/sh\necho "$1 $REUP_TOPLEVEL" >> "$REUP_ROOT/activations"\n' > $out/bin/switch-to-configuration
          chmod +x $out/bin/switch-to-configuration
        '' { };
    in {
      packages.${system} = {
        gen1 = generation { libVersion = "1.0.0"; interval = 60; };
        gen2 = generation { libVersion = "1.0.1"; interval = 30; };
      };
    };
}
