# Writes ops.inc: N generated functions and a dispatch table (sizeable, realistic code).
# usage: sh gen_ops.sh N PATCH > ops.inc
n=$1; patch=$2
awk -v n="$n" -v patch="$patch" 'BEGIN {
  for (i = 0; i < n; i++) {
    m = (i * 2654435761) % 65521; s = i % 13 + 1
    if (patch >= 6 && i % 97 == 5) m = m + 7
    printf "static long foo_op_%d(long x) { long y = x * %d + %d; for (int i = 0; i < %d; i++) y = (y << %d) ^ (y >> %d) ^ %dL; return y %% %d; }\n", i, m, i, i % 5 + 2, s % 7 + 1, s, m * 31 + i, m + 17
  }
  printf "static long (*const foo_table[])(long) = {\n"
  for (i = 0; i < n; i++) printf "  foo_op_%d,\n", i
  printf "};\n"
}'
