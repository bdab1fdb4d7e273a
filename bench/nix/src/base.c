#include <stdio.h>
#include "base.h"

const char *base_version(void) { return "1.0"; }

void base_log(const char *tag, const char *msg) { fprintf(stderr, "[%s] %s\n", tag, msg); }

unsigned long base_crc32(const void *data, unsigned long n) {
    const unsigned char *p = data;
    unsigned long crc = 0xffffffffUL;
    for (unsigned long i = 0; i < n; i++) {
        crc ^= p[i];
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0xedb88320UL & (0UL - (crc & 1UL)));
    }
    return crc ^ 0xffffffffUL;
}
