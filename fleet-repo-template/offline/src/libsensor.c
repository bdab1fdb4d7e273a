/* libsensor: readings for sensord; a shared library in its own store path. */
#include <string.h>
#include "sensor.h"

const char *sensor_library_version(void) { return LIBSENSOR_VERSION; }

double sensor_read(const char *name) {
    /* A stand-in reading, stable per sensor name. */
    unsigned h = 5381;
    for (const char *p = name; *p; p++) h = h * 33u + (unsigned char)*p;
    return (double)(h % 1000) / 10.0;
}
