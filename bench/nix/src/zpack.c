/* zpack: compress stdin to stdout with libzstd's streaming API (a dependent of libzstd). */
#include <stdio.h>
#include <stdlib.h>
#include <zstd.h>

int main(int argc, char **argv) {
    int level = argc > 1 ? atoi(argv[1]) : 3;
    size_t in_cap = ZSTD_CStreamInSize(), out_cap = ZSTD_CStreamOutSize();
    char *in = malloc(in_cap), *out = malloc(out_cap);
    ZSTD_CCtx *cctx = ZSTD_createCCtx();
    if (!in || !out || !cctx) return 2;
    ZSTD_CCtx_setParameter(cctx, ZSTD_c_compressionLevel, level);
    ZSTD_CCtx_setParameter(cctx, ZSTD_c_checksumFlag, 1);
    for (;;) {
        size_t n = fread(in, 1, in_cap, stdin);
        int last = n < in_cap;
        ZSTD_inBuffer ib = {in, n, 0};
        int done;
        do {
            ZSTD_outBuffer ob = {out, out_cap, 0};
            size_t left = ZSTD_compressStream2(cctx, &ob, &ib, last ? ZSTD_e_end : ZSTD_e_continue);
            if (ZSTD_isError(left)) { fprintf(stderr, "zpack: %s\n", ZSTD_getErrorName(left)); return 1; }
            fwrite(out, 1, ob.pos, stdout);
            done = last ? left == 0 : ib.pos == ib.size;
        } while (!done);
        if (last) break;
    }
    ZSTD_freeCCtx(cctx);
    return 0;
}
