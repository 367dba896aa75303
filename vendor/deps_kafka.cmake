# librdkafka (with rdkafka_mock.h) for host/kafka/kafka.c
pkg_check_modules(RDKAFKA REQUIRED IMPORTED_TARGET rdkafka)
list(APPEND OSARA_LIBS PkgConfig::RDKAFKA)
