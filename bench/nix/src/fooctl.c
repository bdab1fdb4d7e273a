#include <stdio.h>
#include <stdlib.h>
#include "base.h"
#include "foo.h"

static const char usage[] = "usage: fooctl OP X\n  applies libfoo operation OP to X (built against libfoo " FOO_VERSION ")\n";

int main(int argc, char **argv) {
    if (argc != 3) { fputs(usage, stderr); return 2; }
    printf("%ld\n", foo_apply(atoi(argv[1]), atol(argv[2])));
    base_log("fooctl", foo_version());
    return 0;
}
