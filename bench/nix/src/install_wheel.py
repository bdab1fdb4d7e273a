"""Install a wheel into a Nix output the way a Python builder would (run inside a derivation).

usage: python3 install_wheel.py WHEEL OUT
Lays out OUT/lib/python3.11/site-packages and OUT/bin, keeping the file modes recorded
in the wheel, then byte-compiles the sources (the .pyc files embed OUT, as in nixpkgs).
"""

import compileall
import os
import py_compile
import sys
import zipfile

wheel, out = sys.argv[1], sys.argv[2]
site = os.path.join(out, "lib", "python3.11", "site-packages")
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if info.is_dir():
            continue
        parts = info.filename.split("/")
        if parts[0].endswith(".data") and len(parts) > 2:
            scheme, rest = parts[1], parts[2:]
            base = os.path.join(out, "bin") if scheme == "scripts" else site
            dest = os.path.join(base, *rest)
        else:
            dest = os.path.join(site, *parts)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with z.open(info) as src, open(dest, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        mode = (info.external_attr >> 16) & 0o777
        os.chmod(dest, 0o755 if mode & 0o111 or dest.startswith(os.path.join(out, "bin")) else 0o644)
compileall.compile_dir(site, quiet=1, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
