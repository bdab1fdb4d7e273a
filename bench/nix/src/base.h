/* libbase: the device's base library (the stand-in for glibc in a mass rebuild). */
#ifndef BASE_H
#define BASE_H
const char *base_version(void);
void base_log(const char *tag, const char *msg);
unsigned long base_crc32(const void *data, unsigned long n);
#endif
