/* zcheck: report libzstd's version and round-trip a buffer (a second dependent of libzstd). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zstd.h>

int main(void) {
    static const char text[] = "reup bench: a reading, a reading, a reading of the meter";
    size_t cap = ZSTD_compressBound(sizeof text);
    char *buf = malloc(cap), back[sizeof text];
    size_t n = ZSTD_compress(buf, cap, text, sizeof text, 19);
    if (ZSTD_isError(n)) return 1;
    size_t m = ZSTD_decompress(back, sizeof back, buf, n);
    if (ZSTD_isError(m) || m != sizeof text || memcmp(back, text, m) != 0) return 1;
    printf("zstd %s ok (%zu -> %zu bytes)\n", ZSTD_versionString(), sizeof text, n);
    return 0;
}
