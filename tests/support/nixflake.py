"""A small test flake with three system generations, built with the host's Nix.

Each generation is a NixOS-like toplevel made of plain `derivation`s (builder
/bin/sh, no inputs, sandbox off so gcc from the host works):

- `lib-N`: a real ELF shared library compiled by gcc (`lib/libgreet.so`);
- `prog-N`: a program compiled by gcc, linked against that library with an
  RPATH into the store (so its binary embeds the library's store hash);
- `etc-N`: config files, a symlink, an empty directory, an executable script
  and files whose names hold a space, UTF-8 and a leading dash;
- `data`: 768 KiB of incompressible (xorshift) bytes shared by every
  generation (dedup, and receives that last long enough to be killed);
- `system-N`: the toplevel, with `bin/switch-to-configuration` that appends
  "$1 $REUP_TOPLEVEL" to `$REUP_ROOT/activations` (generation 3 fails: exit 1).

Generation 2 changes the library (so the program is rebuilt), one config file
and adds another; generation 3 differs from 2 only in its failing activation.
`build_generations` writes the flake to a directory and builds it once.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass

from reup_lab.nixenv import nix_env

ODD_NAMES = ("-leading dash", "spa ce ü€.conf")


def _drv(name: str, script: str, extra: str = "") -> str:
    body = "PATH=/usr/bin:/bin; set -e; " + script
    return (
        f'  {name} = derivation {{ name = "{name}"; builder = "/bin/sh"; '
        f'system = "x86_64-linux"; {extra}args = [ "-c" {_nix_str(body)} ]; }};\n'
    )


def _nix_str(text: str) -> str:
    """A Nix indented string ('' ... '') holding `text` literally, except ${...} interpolations."""
    return "''" + text.replace("''", "'''") + "''"


def flake_text(salt: str = "") -> str:
    """The flake.nix source. `salt` changes every store path (fresh, unbuilt generations)."""
    lines = ["{\n  outputs = { self }: let\n"]
    lines.append(_drv(
        "data",
        "mkdir -p $out/share; cd $TMPDIR; "
        "printf '%s\\n' '#include <stdio.h>' '#include <stdint.h>' "
        "'int main(void) { uint64_t x = 88172645463325252ULL; for (long i = 0; i < 98304; i++) {' "
        "'x ^= x << 13; x ^= x >> 7; x ^= x << 17; fwrite(&x, 8, 1, stdout); } return 0; }' > rnd.c; "
        f"gcc -O1 -o rnd rnd.c; ./rnd > $out/share/random.bin; echo {salt} >> $out/share/random.bin; "
        "seq 1 4000 > $out/share/numbers.txt",
    ))
    for gen in (1, 2):
        lib = f"lib{gen}"
        lines.append(_drv(
            lib,
            f"mkdir -p $out/lib $out/include; cd $TMPDIR; "
            f"printf '%s\\n' '#include <stdio.h>' "
            f"'const char *greet_version(void) {{ return \"greet {gen}{salt}\"; }}' "
            f"'void greet(const char *who) {{ printf(\"hello %s from %s\\n\", who, greet_version()); }}' > greet.c; "
            f"gcc -O1 -shared -fPIC -Wl,-soname,libgreet.so -o $out/lib/libgreet.so greet.c; "
            f"printf 'void greet(const char *who);\\n' > $out/include/greet.h",
        ))
        lines.append(_drv(
            f"prog{gen}",
            f"mkdir -p $out/bin; cd $TMPDIR; "
            f"printf '%s\\n' '#include <greet.h>' 'int main(int c, char **v) {{ greet(c > 1 ? v[1] : \"world\"); return 0; }}' > main.c; "
            f"gcc -O1 -I${{{lib}}}/include -o $out/bin/greeter main.c -L${{{lib}}}/lib -lgreet -Wl,-rpath,${{{lib}}}/lib",
        ))
    for gen in (1, 2):
        extra_conf = "echo 'added in 2' > $out/etc/new.conf; " if gen == 2 else ""
        lines.append(_drv(
            f"etc{gen}",
            f"mkdir -p $out/etc/ssh $out/empty $out/bin; "
            f"echo 'hostname = dev-{gen}{salt}' > $out/etc/hostname.conf; "
            f"seq 1 500 | sed 's/^/option-/' > $out/etc/big.conf; "
            f"echo 'Port 22' > $out/etc/ssh/sshd_config; "
            f"ln -s ssh/sshd_config $out/etc/sshd_link; "
            f"ln -s /nonexistent/dangling $out/etc/dangling; "
            f"printf '#!/bin/sh\\necho tool {gen}\\n' > $out/bin/tool; chmod +x $out/bin/tool; "
            f"echo odd > \"$out/etc/{ODD_NAMES[0]}\"; echo 'odd {gen}' > \"$out/etc/{ODD_NAMES[1]}\"; "
            + extra_conf,
        ))
    for gen, lib, prog, etc, fail in ((1, "lib1", "prog1", "etc1", False),
                                      (2, "lib2", "prog2", "etc2", False),
                                      (3, "lib2", "prog2", "etc2", True)):
        tail = "exit 1" if fail else "exit 0"
        lines.append(_drv(
            f"system{gen}",
            f"mkdir -p $out/bin; ln -s ${{{etc}}}/etc $out/etc; ln -s ${{{prog}}}/bin/greeter $out/bin/greeter; "
            f"ln -s ${{data}} $out/data; ln -s ${{{lib}}}/lib $out/lib; echo {gen}{salt} > $out/generation; "
            f"printf '%s\\n' '#!/bin/sh' 'echo \"$1 $REUP_TOPLEVEL\" >> \"$REUP_ROOT/activations\"' "
            f"'{tail}' > $out/bin/switch-to-configuration; chmod +x $out/bin/switch-to-configuration",
        ))
    lines.append("  in {\n    packages.x86_64-linux = {\n")
    for name in ("system1", "system2", "system3", "data", "lib1", "lib2", "prog1", "prog2",
                 "etc1", "etc2"):
        lines.append(f"      {name} = {name};\n")
    lines.append("    };\n  };\n}\n")
    return "".join(lines)


@dataclass(frozen=True)
class Generations:
    """Store paths of the built test flake."""

    gen1: str
    gen2: str
    gen3: str  # like gen2 but its activation fails
    parts: dict[str, str]  # every package by attribute name

    def closure(self, path: str) -> list[str]:
        out = subprocess.run(["nix-store", "-qR", path], env=nix_env(), capture_output=True,
                             text=True, check=True).stdout
        return sorted(out.split())


def build_generations(flake_dir: str, salt: str = "") -> Generations:
    os.makedirs(flake_dir, exist_ok=True)
    with open(os.path.join(flake_dir, "flake.nix"), "w") as fh:
        fh.write(flake_text(salt))
    attrs = ["system1", "system2", "system3", "data", "lib1", "lib2", "prog1", "prog2", "etc1", "etc2"]
    proc = subprocess.run(
        ["nix", "build", "--json", "--no-link", *[f"path:{flake_dir}#{a}" for a in attrs]],
        env=nix_env(), capture_output=True, text=True, check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building the test flake failed:\n{proc.stderr}")
    # Nix 2.8 prints the results in its own order; each store name is its attribute name.
    parts = {os.path.basename(o)[33:]: o for o in
             (item["outputs"]["out"] for item in json.loads(proc.stdout))}
    assert sorted(parts) == sorted(attrs), parts
    return Generations(parts["system1"], parts["system2"], parts["system3"], parts)
