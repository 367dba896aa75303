/* The C unit tests, listed once. Each runs in its own process under ctest
 * (CMakeLists.txt reads this list). */
OSARA_TEST(inbox_drains_in_batches)
OSARA_TEST(inbox_accepts_posts_from_threads)
OSARA_TEST(inbox_rejects_after_close)
OSARA_TEST(metrics_render_prometheus_text)
OSARA_TEST(metrics_histogram_buckets)
OSARA_TEST(registry_diff_adopts_unchanged)
OSARA_TEST(registry_rejects_duplicate_keys)
OSARA_TEST(err_records_message)
OSARA_TEST(offsets_commit_contiguous_prefix)
