# nodejs http-parser (libhttp-parser-dev) for host/http/http.c
find_path(HTTP_PARSER_INCLUDE_DIR http_parser.h REQUIRED)
find_library(HTTP_PARSER_LIBRARY http_parser REQUIRED)
list(APPEND OSARA_LIBS ${HTTP_PARSER_LIBRARY})
list(APPEND OSARA_INCLUDES ${HTTP_PARSER_INCLUDE_DIR})
