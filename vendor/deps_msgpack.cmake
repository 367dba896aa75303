# msgpack-c (libmsgpack-dev) for host/codec/codec_msgpack.c
pkg_check_modules(MSGPACK REQUIRED IMPORTED_TARGET msgpack)
list(APPEND OSARA_LIBS PkgConfig::MSGPACK)
