/* sensord: the fleet's example service. `sensord --self-test` is the rollout's health check. */
#include <stdio.h>
#include <string.h>
#include "sensor.h"

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--version") == 0) {
        printf("sensord %s (libsensor %s)\n", SENSORD_VERSION, sensor_library_version());
        return 0;
    }
    if (argc > 1 && strcmp(argv[1], "--self-test") == 0) {
        double t = sensor_read("temp");
        if (t < 0.0 || t > 100.0) {
            fprintf(stderr, "sensord: temp reading %.1f out of range\n", t);
            return 1;
        }
        printf("sensord %s: self-test ok (temp %.1f)\n", SENSORD_VERSION, t);
        return 0;
    }
    fprintf(stderr, "usage: sensord --version | --self-test\n");
    return 2;
}
