# librabbitmq (rabbitmq-c, librabbitmq-dev) for host/amqp
pkg_check_modules(LIBRABBITMQ REQUIRED IMPORTED_TARGET librabbitmq)
list(APPEND OSARA_LIBS PkgConfig::LIBRABBITMQ)
