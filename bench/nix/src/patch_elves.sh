# Add RPATH entries to every ELF file under a directory (what autoPatchelfHook does in nixpkgs),
# so that the files embed the store hashes of the libraries they link.
# usage: sh patch_elves.sh DIR RPATH
dir=$1; rpath=$2
find "$dir" -type f | sort | while read -r f; do
  if [ "$(head -c 4 "$f" | od -An -c | tr -d ' ')" = "177ELF" ]; then
    chmod u+w "$f"
    patchelf --add-rpath "$rpath" "$f"
  fi
done
