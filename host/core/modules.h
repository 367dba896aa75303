/* modules.h - the C halves of the Lua API, opened in this order.
 * Each line: OSARA_MODULE("package.preload name", opener). An opener pushes
 * the module table and returns 1 (see host/<area>.h). */
OSARA_MODULE("osara.vm_c", osara_vm_open)
OSARA_MODULE("osara.sched_c", osara_sched_open)
OSARA_MODULE("osara.timer_c", osara_timer_open)
OSARA_MODULE("osara.log_c", osara_log_open)
OSARA_MODULE("osara.metrics_c", osara_metrics_open)
OSARA_MODULE("osara.process_c", osara_process_open)
OSARA_MODULE("osara.kafka_c", osara_kafka_open)
OSARA_MODULE("osara.codec_c", osara_codec_open)
OSARA_MODULE("osara.natsio_c", osara_natsio_open)
OSARA_MODULE("osara.store_c", osara_store_open)
OSARA_MODULE("osara.http_c", osara_http_open)
OSARA_MODULE("osara.avro_c", osara_avro_open)
OSARA_MODULE("osara.msgpack_c", osara_msgpack_open)
OSARA_MODULE("osara.cache_c", osara_cache_open)
OSARA_MODULE("osara.yaml_c", osara_yaml_open)
OSARA_MODULE("osara.sql_c", osara_sql_open)
