#include <string.h>
#include "base.h"
#include "foo.h"
#include "ops.inc"

const char *foo_version(void) { base_log("foo", "version queried"); return FOO_VERSION; }

int foo_ops(void) { return (int)(sizeof(foo_table) / sizeof(foo_table[0])); }

long foo_apply(int op, long x) {
    if (op < 0 || op >= foo_ops()) return -1;
#if FOO_PATCH >= 6
    /* 1.5.6: clamp negative inputs before dispatch */
    if (x < 0) x = -x;
#endif
    return foo_table[op](x);
}

double foo_filter(const double *xs, int n) {
    double acc = 0, w = 0;
    for (int i = 0; i < n; i++) {
#if FOO_PATCH >= 6
        double k = 1.0 / (1.0 + (double)(n - i));  /* 1.5.6: recency weighting */
#else
        double k = 1.0;
#endif
        acc += k * xs[i];
        w += k;
    }
    return w > 0 ? acc / w : 0;
}
