# LMDB (liblmdb-dev has no pkg-config file) for host/store/store.c
find_path(LMDB_INCLUDE_DIR lmdb.h REQUIRED)
find_library(LMDB_LIBRARY lmdb REQUIRED)
list(APPEND OSARA_LIBS ${LMDB_LIBRARY})
list(APPEND OSARA_INCLUDES ${LMDB_INCLUDE_DIR})
