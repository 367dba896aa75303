# WebSocket framing for host/ws: wslay (libwslay-dev, which ships no
# pkg-config file); the handshake's SHA-1 and base64 from OpenSSL's
# libcrypto (libssl-dev).
find_path(WSLAY_INCLUDE_DIR wslay/wslay.h REQUIRED)
find_library(WSLAY_LIBRARY wslay REQUIRED)
pkg_check_modules(LIBCRYPTO REQUIRED IMPORTED_TARGET libcrypto)
list(APPEND OSARA_LIBS ${WSLAY_LIBRARY} PkgConfig::LIBCRYPTO)
list(APPEND OSARA_INCLUDES ${WSLAY_INCLUDE_DIR})
