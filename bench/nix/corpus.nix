# The reup benchmark corpus: one device system in several generations, shaped like NixOS.
# Built by bench/corpus.py:
#   nix build -f bench/nix/corpus.nix --argstr manifest M --argstr gens G <generation names>
# M (written by bench/inputs.py) lists the fetched wheels and Debian packages; G (written by
# bench/corpus.py) gives each generation's versions and config. No nixpkgs: every derivation
# is /bin/sh with the host's tools (sandbox off), so builds take seconds.
{ manifest, gens }:
let
  m = builtins.fromJSON (builtins.readFile manifest);
  G = builtins.fromJSON (builtins.readFile gens);
  src = builtins.path { path = ./src; name = "reup-bench-src"; };
  input = file: builtins.path {
    path = /. + "${m.dir}/${file}";
    name = builtins.replaceStrings [ "/" "+" "~" ] [ "-" "_" "_" ] file;
  };

  sh = name: env: script: derivation ({
    inherit name;
    system = "x86_64-linux";
    builder = "/bin/sh";
    args = [ "-c" "PATH=/usr/bin:/bin; set -eu; ${script}" ];
  } // env);

  # The base library; `tag` changes the derivation, never the content (the mass rebuild).
  libbase = tag: sh "libbase-1.0" { rebuildTag = tag; } ''
    mkdir -p $out/lib/pkgconfig $out/include
    cp ${src}/base.h $out/include/
    gcc -O2 -fPIC -shared -Wl,-soname,libbase.so.1 -o $out/lib/libbase.so.1.0 ${src}/base.c
    ln -s libbase.so.1.0 $out/lib/libbase.so.1
    ln -s libbase.so.1 $out/lib/libbase.so
    printf 'prefix=%s\nlibdir=%s/lib\nName: base\nVersion: 1.0\nLibs: -L%s/lib -lbase\n' \
      $out $out $out > $out/lib/pkgconfig/base.pc
  '';

  fooCflags = v: patch: "-DFOO_VERSION_STRING='\"${v}\"' -DFOO_PATCH=${patch}";

  libfoo = base: v: patch: sh "libfoo-${v}" {} ''
    mkdir -p $out/lib $out/include build
    sh ${src}/gen_ops.sh 600 ${patch} > build/ops.inc
    cp ${src}/foo.h build/ops.inc $out/include/
    gcc -O2 -fPIC -shared ${fooCflags v patch} -I${base}/include -Ibuild \
      -Wl,-soname,libfoo.so.1 -Wl,-rpath,${base}/lib -o $out/lib/libfoo.so.${v} \
      ${src}/foo.c -L${base}/lib -lbase
    ln -s libfoo.so.${v} $out/lib/libfoo.so.1
    ln -s libfoo.so.1 $out/lib/libfoo.so
  '';

  # A C program linking libfoo and libbase by RPATH (embeds both store hashes).
  cprog = name: base: foo: v: patch: progs: sh name {} ''
    mkdir -p $out/bin
    for p in ${progs}; do
      gcc -O2 ${fooCflags v patch} -I${base}/include -I${foo}/include -o $out/bin/$p ${src}/$p.c \
        -L${foo}/lib -L${base}/lib -lfoo -lbase -Wl,-rpath,${foo}/lib:${base}/lib
    done
  '';

  wheel = base: dist: v: sh "python3.11-${dist}-${v}" {} ''
    python3 ${src}/install_wheel.py ${input m.wheels.${dist}.${v}} $out
    sh ${src}/patch_elves.sh $out ${base}/lib
  '';

  deb = base: pkg: rpath: sh "${pkg}-${m.debs.${pkg}.version}" {} ''
    dpkg-deb -x ${input m.debs.${pkg}.file} x
    mkdir -p $out
    if [ -d x/usr/bin ]; then cp -a x/usr/bin $out/bin; fi
    if [ -d x/usr/lib/x86_64-linux-gnu ]; then cp -a x/usr/lib/x86_64-linux-gnu $out/lib; fi
    sh ${src}/patch_elves.sh $out ${rpath}
  '';

  # A widely used C library built from a registry's source archive: the zstd that a
  # python-zstandard sdist vendors as one amalgamated zstd.c (tar from PyPI, pinned).
  libzstd = v: sh "libzstd-${v}" {} ''
    tar xzf ${input m.vendored.zstd.${v}}
    mkdir -p $out/lib $out/include
    cp zstandard-*/zstd/zstd.h zstandard-*/zstd/zstd_errors.h zstandard-*/zstd/zdict.h $out/include/
    gcc -O2 -fPIC -shared -pthread -Wl,-soname,libzstd.so.1 -o $out/lib/libzstd.so.${v} zstandard-*/zstd/zstd.c
    ln -s libzstd.so.${v} $out/lib/libzstd.so.1
    ln -s libzstd.so.1 $out/lib/libzstd.so
  '';

  # Two programs linked against it by RPATH (rebuilt when it changes, as in nixpkgs).
  zstdTools = z: v: sh "zstd-tools-${v}" {} ''
    mkdir -p $out/bin
    for p in zpack zcheck; do
      gcc -O2 -I${z}/include -o $out/bin/$p ${src}/$p.c -L${z}/lib -lzstd -Wl,-rpath,${z}/lib
    done
    $out/bin/zcheck > /dev/null
  '';

  # A pure-Python wheel (install_wheel.py byte-compiles it, as nixpkgs' Python packages are).
  pureWheel = dist: v: sh "python3.11-${dist}-${v}" {} ''
    python3 ${src}/install_wheel.py ${input m.wheels.${dist}.${v}} $out
  '';

  system = label: g:
    let
      base = libbase g.baseTag;
      foo = libfoo base g.libfoo g.fooPatch;
      footools = cprog "foo-tools-${g.libfoo}" base foo g.libfoo g.fooPatch "fooctl foostat";
      sensord = sh "sensord-2.3.0" {} ''
        mkdir -p $out/bin $out/share/sensord build
        sh ${src}/gen_ops.sh 300 0 > build/ops.inc
        gcc -O2 ${fooCflags g.libfoo g.fooPatch} -I${base}/include -I${foo}/include -Ibuild \
          -o $out/bin/sensord ${src}/sensord.c -L${foo}/lib -L${base}/lib -lfoo -lbase \
          -Wl,-rpath,${foo}/lib:${base}/lib
        printf 'interval=60\nlog=${base}/lib\n' > $out/share/sensord/default.conf
      '';
      pydantic = wheel base "pydantic-core" g.pydanticCore;
      msgpack = wheel base "msgpack" "1.1.0";
      typingExt = wheel base "typing-extensions" "4.12.2";
      ruff = sh "ruff-${g.ruff}" {} ''
        python3 ${src}/install_wheel.py ${input m.wheels.ruff.${g.ruff}} $out
        sh ${src}/patch_elves.sh $out ${base}/lib
        $out/bin/ruff --version > /dev/null
      '';
      onig = deb base "libonig5" "${base}/lib";
      libjq = deb base "libjq1" "${onig}/lib:${base}/lib";
      jq = deb base "jq" "${libjq}/lib:${onig}/lib:${base}/lib";
      libsqlite = deb base "libsqlite3-0" "${base}/lib";
      sqlite = deb base "sqlite3" "${libsqlite}/lib:${base}/lib";
      gridapp = sh "gridapp-${g.gridapp}" {} ''
        site=$out/lib/python3.11/site-packages
        mkdir -p $out/bin $site/gridapp
        printf '"""gridapp %s: reads meters, ships readings."""\nVERSION = "%s"\n' \
          ${g.gridapp} ${g.gridapp} > $site/gridapp/__init__.py
        printf 'import msgpack\nimport pydantic_core\n\n\ndef main():\n    print("gridapp", __import__("gridapp").VERSION, pydantic_core.__version__)\n' \
          > $site/gridapp/main.py
        printf '#!/bin/sh\nPYTHONPATH=%s:%s:%s:%s exec /usr/bin/python3 -c "from gridapp.main import main; main()" "$@"\n' \
          $site ${pydantic}/lib/python3.11/site-packages ${msgpack}/lib/python3.11/site-packages \
          ${typingExt}/lib/python3.11/site-packages \
          > $out/bin/gridapp
        chmod +x $out/bin/gridapp
        python3 -m compileall -q --invalidation-mode unchecked-hash $site
      '';
      zstd = libzstd g.zstd;
      ztools = zstdTools zstd g.zstd;
      urllib3 = pureWheel "urllib3" g.urllib3;
      packages = [ base foo footools sensord pydantic msgpack typingExt ruff onig libjq jq libsqlite sqlite gridapp
                   zstd ztools urllib3 ];
      systemPath = sh "system-path" {} ''
        mkdir -p $out/bin $out/lib/python3.11/site-packages
        for p in ${builtins.concatStringsSep " " (map toString packages)}; do
          for f in $p/bin/* $p/lib/*.so*; do
            if [ -e "$f" ]; then d=$out/''${f#$p/}; d=''${d%/*}; ln -sf "$f" "$d/"; fi
          done
          for f in $p/lib/python3.11/site-packages/*; do
            if [ -e "$f" ]; then ln -sf "$f" $out/lib/python3.11/site-packages/; fi
          done
        done
      '';
      etc = sh "etc" {} ''
        mkdir -p $out/etc/systemd/system
        printf 'dev\n' > $out/etc/hostname
        printf 'NAME=NixOS\nID=nixos\nVERSION_ID="${label}"\n' > $out/etc/os-release
        printf 'interval=${toString g.config.interval}\nendpoint=${g.config.endpoint}\nlevel=${g.config.level}\n' \
          > $out/etc/sensord.conf
        printf '[Unit]\nDescription=sensord\n[Service]\nExecStart=${sensord}/bin/sensord /etc/sensord.conf\n' \
          > $out/etc/systemd/system/sensord.service
        printf '[Service]\nExecStart=${gridapp}/bin/gridapp\nEnvironment=PATH=${systemPath}/bin\n' \
          > $out/etc/systemd/system/gridapp.service
        ln -s ${systemPath}/bin $out/etc/profile-bin
      '';
    in sh "nixos-system-dev-${label}" {} ''
      mkdir -p $out/bin
      sed "s|@toplevel@|$out|" ${src}/switch-to-configuration.sh > $out/bin/switch-to-configuration
      chmod +x $out/bin/switch-to-configuration
      ln -s ${etc}/etc $out/etc
      ln -s ${systemPath} $out/sw
      printf '%s\n' "${label}" > $out/nixos-version
    '';
in builtins.mapAttrs system G
