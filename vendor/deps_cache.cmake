# Cache clients and the YAML config loader (host/cache/, host/config/):
# hiredis with its libuv adapter (libhiredis-dev), libmemcached run off the
# loop (libmemcached-dev), libyaml (libyaml-dev).
pkg_check_modules(HIREDIS REQUIRED IMPORTED_TARGET hiredis)
pkg_check_modules(LIBMEMCACHED REQUIRED IMPORTED_TARGET libmemcached)
pkg_check_modules(YAML REQUIRED IMPORTED_TARGET yaml-0.1)
list(APPEND OSARA_LIBS PkgConfig::HIREDIS PkgConfig::LIBMEMCACHED PkgConfig::YAML)
