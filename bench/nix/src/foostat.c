#include <stdio.h>
#include <string.h>
#include "base.h"
#include "foo.h"

int main(int argc, char **argv) {
    double xs[64];
    int n = 0;
    for (int i = 1; i < argc && n < 64; i++) xs[n++] = (double)strlen(argv[i]);
    printf("libfoo %s, %d ops, filter %.3f, crc %08lx\n", foo_version(), foo_ops(),
           foo_filter(xs, n), base_crc32(argv[0], strlen(argv[0])));
    return 0;
}
