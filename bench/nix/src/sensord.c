/* sensord: the device's own daemon, linked against libfoo and libbase. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "base.h"
#include "foo.h"
#include "ops.inc"

static const char banner[] = "sensord 2.3.0 (libfoo " FOO_VERSION ")";

int main(int argc, char **argv) {
    const char *conf = argc > 1 ? argv[1] : "/etc/sensord.conf";
    FILE *f = fopen(conf, "r");
    double xs[256];
    int n = 0;
    char line[256];
    base_log("sensord", banner);
    if (f) {
        while (n < 256 && fgets(line, sizeof line, f)) xs[n++] = (double)strlen(line);
        fclose(f);
    }
    long acc = 0;
    for (int i = 0; i < foo_ops(); i++) acc ^= foo_apply(i, acc + i) + foo_table[i % foo_ops()](i);
    printf("%s: %d readings, filtered %.3f, acc %ld\n", banner, n, foo_filter(xs, n), acc);
    return 0;
}
