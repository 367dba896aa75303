# nats.c (libnats-dev) for host/natsio.c
pkg_check_modules(LIBNATS REQUIRED IMPORTED_TARGET libnats)
list(APPEND OSARA_LIBS PkgConfig::LIBNATS)
