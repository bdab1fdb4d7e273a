/* libfoo: a versioned shared library (libfoo.so.1 -> libfoo.so.1.5.N). */
#ifndef FOO_H
#define FOO_H
#define FOO_VERSION FOO_VERSION_STRING
const char *foo_version(void);
long foo_apply(int op, long x);
int foo_ops(void);
double foo_filter(const double *xs, int n);
#endif
