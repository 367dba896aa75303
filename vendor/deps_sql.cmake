# SQL (host/sql): libpq for PostgreSQL, SQLite embedded.
pkg_check_modules(LIBPQ REQUIRED IMPORTED_TARGET libpq)
pkg_check_modules(SQLITE3 REQUIRED IMPORTED_TARGET sqlite3)
list(APPEND OSARA_LIBS PkgConfig::LIBPQ PkgConfig::SQLITE3)
