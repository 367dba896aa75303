# nats.c (libnats-dev) for host/nats/natsio.c
pkg_check_modules(LIBNATS REQUIRED IMPORTED_TARGET libnats)
list(APPEND OSARA_LIBS PkgConfig::LIBNATS)
