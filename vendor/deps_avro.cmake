# avro-c (libavro-dev) for host/codec/codec_avro.c
pkg_check_modules(AVRO REQUIRED IMPORTED_TARGET avro-c)
list(APPEND OSARA_LIBS PkgConfig::AVRO)
