-- panini's logging: the app's logger, named loggers got anywhere by name,
-- levels, and an exception logged with its traceback.
--
--   log = app.logger   /   log = get_logger('ms_template_sync_by_lib')
--   log.info("some log"); log.warning(...); log.error(...); log.exception(...)
--
-- osara.log.get(name) is the same logger wherever it is asked for; its name
-- is on every line (logger=... in text, a "logger" field in JSON) and its
-- level can be set in config.yaml (log.levels.<name>). panini's log folder is
-- --log-file FILE (rotated with --log-max-size, reopened on SIGUSR1); its
-- separate logging process is osara's logger thread.
local osara = require "osara"

local log = osara.log.get("ms_template_sync_by_lib")

osara.after(0, function()
  log.info("some log")
  log.warn("some warn log")
  log.error("some error log")
  local ok, err = xpcall(function() error("boom") end, debug.traceback)
  if not ok then log.error("some exception log with automatic traceback logging", { err = err }) end
  osara.log.get("some_logger_name").warn("some log")
end)
