/* libsensor: the fleet's example shared library (offline flavor of the template). */
#ifndef SENSOR_H
#define SENSOR_H
const char *sensor_library_version(void);
double sensor_read(const char *name);
#endif
