/* check.h - what every C unit test file uses: CHECK and the failure count.
 * Tests are `void test_<name>(void)` listed once in tests.h. */
#ifndef OSARA_CHECK_H
#define OSARA_CHECK_H

#include <stdio.h>

extern int osara_test_failures;

/* Records a failure with file:line and returns from the test. */
#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, \
                    #cond);                                                  \
            osara_test_failures++;                                           \
            return;                                                          \
        }                                                                    \
    } while (0)

#define OSARA_TEST(name) void test_##name(void);
#include "tests.h"
#undef OSARA_TEST

#endif
