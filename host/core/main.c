/* main.c - the command line: run, check, test, version (and the subsystems'
 * own commands). Decides what to print and which exit code to return; see
 * README "Exit codes". */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "core/err.h"
#include "kafka/kafka.h"
#include "nats/natsio.h"
#include "sql/sql.h"
#include "store/store.h"
#include "core/log.h"
#include "core/worker.h"

#ifndef OSARA_VERSION
#define OSARA_VERSION "0.0.0"
#endif

enum { EXIT_OK = 0, EXIT_SCRIPT = 1, EXIT_USAGE = 2, EXIT_NOFILE = 3 };

/* Options as data: drives parsing and --help. */
typedef struct {
    const char *name;    /* "--watch" */
    const char *arg;     /* NULL for flags, else the value's name */
    const char *help;
    const char *commands; /* which commands accept it: "rct" run/check/test */
} option_t;

static const option_t options[] = {
    {"--watch", NULL, "reload when the script or a module it required changes", "r"},
    {"--data", "DIR", "data folder (default: .osara-data beside the script)", "r"},
    {"--config", "FILE", "config file (default: config.yaml beside the script, or OSARA_CONFIG)", "rcd"},
    {"--http", "ADDR", "HTTP listen address for routes (default 127.0.0.1:8080)", "r"},
    {"--log-level", "L", "debug|info|warn|error (default info, or OSARA_LOG_LEVEL)", "rctd"},
    {"--log-format", "F", "text|json (default text, or OSARA_LOG_FORMAT)", "rctd"},
    {"--log-file", "FILE", "write the log to FILE, reopened on SIGUSR1 (default stderr, or OSARA_LOG_FILE)", "r"},
    {"--log-max-size", "SIZE", "rotate the log file past SIZE bytes (100M, 1G; default off, or OSARA_LOG_MAX_SIZE)", "r"},
    {"--grace", "SECS", "time in-flight work may take at stop and reload (default 10)", "rt"},
    {"--load-timeout", "SECS", "time a script may take to load (default 5)", "rctd"},
    {"--loop-stall-ms", "MS", "warn about a loop turn longer than MS; 0: off (default 100, 1000 in a sanitizer build, or OSARA_LOOP_STALL_MS)", "r"},
    {"--output", "NAME", "busted output handler (default utfTerminal on a tty, else plainTerminal)", "t"},
    {"--asyncapi", NULL, "the AsyncAPI 3.0 document of the Kafka topics and NATS subjects (the default)", "d"},
    {"--openapi", NULL, "the OpenAPI 3.1 document of the HTTP routes", "d"},
    {NULL, NULL, NULL, NULL},
};

static const struct {
    const char *name, *usage, *what;
    char letter;
} commands[] = {
    {"run", "osara run SCRIPT [options]", "load SCRIPT and serve until stopped", 'r'},
    {"check", "osara check SCRIPT [options]", "load SCRIPT without connecting anything and print what it registers", 'c'},
    {"test", "osara test [PATH...] [options]", "run busted specs inside the host (default: spec/)", 't'},
    {"docs", "osara docs SCRIPT [--asyncapi | --openapi]", "load SCRIPT as check does and print its AsyncAPI or OpenAPI document (JSON)", 'd'},
    {"broker", "osara broker [--brokers N] [--partitions N] [--port N] [--topic NAME...]", "run the embedded Kafka cluster standalone (development and tests)", 'b'},
    {"store", "osara store DATA_DIR dump NAME [PREFIX] | get NAME KEY", "read a store while the host runs (debugging)", 's'},
    {"sql", "osara sql migrate SCRIPT_OR_URL DIR", "apply a folder of numbered SQL migrations (docs/sql.md)", 'q'},
    {"version", "osara version", "print the version", 'v'},
};

static void usage_command(FILE *f, int ci)
{
    fprintf(f, "usage: %s\n\n%s\n", commands[ci].usage, commands[ci].what);
    int any = 0;
    for (const option_t *o = options; o->name; o++) {
        if (strchr(o->commands, commands[ci].letter)) {
            if (!any++) {
                fprintf(f, "\noptions:\n");
            }
            char left[40];
            snprintf(left, sizeof(left), "%s%s%s", o->name, o->arg ? " " : "",
                     o->arg ? o->arg : "");
            fprintf(f, "  %-22s %s\n", left, o->help);
        }
    }
    fprintf(f, "  %-22s %s\n", "--help", "show this help");
}

static void usage(FILE *f)
{
    fprintf(f, "osara %s - a streaming host: Kafka, NATS, timers, HTTP and state, "
               "scripted in Lua\n\nusage: osara COMMAND [ARGS]\n\ncommands:\n",
            OSARA_VERSION);
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        fprintf(f, "  %-8s %s\n", commands[i].name, commands[i].what);
    }
    fprintf(f, "\n`osara COMMAND --help` shows a command's options.\n");
}

typedef struct {
    osara_worker_opts_t w;
    const char *log_level, *log_format, *log_file, *log_max_size;
    int running; /* osara run: the only command whose log may go to a file */
    int stall_given; /* --loop-stall-ms on the command line */
    const char *paths[256];
    int npaths;
} cli_t;

static int find_command(const char *name)
{
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++) {
        if (strcmp(commands[i].name, name) == 0) {
            return (int)i;
        }
    }
    return -1;
}

/* A whole number of milliseconds from 0 to one hour. */
static int parse_ms(const char *s, unsigned *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < 0 || v > 3600000) {
        return -1;
    }
    *out = (unsigned)v;
    return 0;
}

static int parse_seconds(const char *s, double *out)
{
    char *end;
    double v = strtod(s, &end);
    if (*s == '\0' || *end != '\0' || v < 0) {
        return -1;
    }
    *out = v;
    return 0;
}

/* Applies one option; returns 0, or EXIT_USAGE after printing why. */
static int apply_option(cli_t *cli, const option_t *o, const char *val)
{
    const char *n = o->name;
    if (strcmp(n, "--watch") == 0) {
        cli->w.watch = 1;
    } else if (strcmp(n, "--data") == 0) {
        cli->w.data_dir = val;
    } else if (strcmp(n, "--config") == 0) {
        setenv("OSARA_CONFIG", val, 1); /* read by lua/osara/config.lua */
    } else if (strcmp(n, "--http") == 0) {
        setenv("OSARA_HTTP_LISTEN", val, 1); /* read by lua/osara/http.lua */
    } else if (strcmp(n, "--log-level") == 0) {
        cli->log_level = val;
    } else if (strcmp(n, "--log-format") == 0) {
        cli->log_format = val;
    } else if (strcmp(n, "--log-file") == 0) {
        cli->log_file = val;
    } else if (strcmp(n, "--log-max-size") == 0) {
        cli->log_max_size = val;
    } else if (strcmp(n, "--asyncapi") == 0 || strcmp(n, "--openapi") == 0) {
        setenv("OSARA_DOCS", n + 2, 1); /* read by lua/osara/boot.lua */
    } else if (strcmp(n, "--output") == 0) {
        cli->w.test_output = val;
    } else if (strcmp(n, "--loop-stall-ms") == 0) {
        if (parse_ms(val, &cli->w.loop_stall_ms) != 0) {
            fprintf(stderr, "osara: --loop-stall-ms expects milliseconds (0-3600000), "
                            "got '%s'\n", val);
            return EXIT_USAGE;
        }
        cli->stall_given = 1;
    } else if (strcmp(n, "--grace") == 0 || strcmp(n, "--load-timeout") == 0) {
        double *dst = n[2] == 'g' ? &cli->w.grace : &cli->w.load_timeout;
        if (parse_seconds(val, dst) != 0) {
            fprintf(stderr, "osara: %s expects seconds, got '%s'\n", n, val);
            return EXIT_USAGE;
        }
    }
    return 0;
}

static int parse_args(cli_t *cli, int ci, int argc, char **argv)
{
    char letter = commands[ci].letter;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            usage_command(stdout, ci);
            exit(EXIT_OK);
        }
        if (strncmp(a, "--", 2) != 0) {
            if (cli->npaths == 256) {
                fprintf(stderr, "osara: too many arguments\n");
                return EXIT_USAGE;
            }
            cli->paths[cli->npaths++] = a;
            continue;
        }
        const char *eq = strchr(a, '=');
        size_t klen = eq ? (size_t)(eq - a) : strlen(a);
        const option_t *o = options;
        while (o->name && !(strlen(o->name) == klen && strncmp(o->name, a, klen) == 0 &&
                            strchr(o->commands, letter))) {
            o++;
        }
        if (o->name == NULL && letter == 't' && cli->npaths < 256) {
            cli->paths[cli->npaths++] = a; /* busted's own options pass through */
            continue;
        }
        if (o->name == NULL) {
            fprintf(stderr, "osara %s: unknown option %.*s (see osara %s --help)\n",
                    commands[ci].name, (int)klen, a, commands[ci].name);
            return EXIT_USAGE;
        }
        const char *val = NULL;
        if (o->arg) {
            val = eq ? eq + 1 : (i + 1 < argc ? argv[++i] : NULL);
            if (val == NULL) {
                fprintf(stderr, "osara: %s needs a value (%s)\n", o->name, o->arg);
                return EXIT_USAGE;
            }
        }
        int rc = apply_option(cli, o, val);
        if (rc != 0) {
            return rc;
        }
    }
    return 0;
}

/* OSARA_LOOP_STALL_MS, unless the command line set it; checked the same. */
static int stall_from_env(cli_t *cli)
{
    const char *env = getenv("OSARA_LOOP_STALL_MS");
    if (cli->stall_given || env == NULL || *env == '\0') {
        return 0;
    }
    if (parse_ms(env, &cli->w.loop_stall_ms) != 0) {
        fprintf(stderr, "osara: OSARA_LOOP_STALL_MS expects milliseconds "
                        "(0-3600000), got '%s'\n", env);
        return EXIT_USAGE;
    }
    return 0;
}

/* "100M", "1G", "65536": bytes (K, M, G are powers of 1024); 0 is off. */
static int parse_size(const char *s, uint64_t *out)
{
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    uint64_t unit = 1;
    if (*end == 'K' || *end == 'k') {
        unit = 1024, end++;
    } else if (*end == 'M' || *end == 'm') {
        unit = 1024 * 1024, end++;
    } else if (*end == 'G' || *end == 'g') {
        unit = 1024ull * 1024 * 1024, end++;
    }
    if (*s == '\0' || *s == '-' || *end != '\0' || errno || v > UINT64_MAX / unit) {
        return -1;
    }
    *out = v * unit;
    return 0;
}

static int setup_log_file(cli_t *cli)
{
    if (!cli->running) {
        return 0;
    }
    const char *file = cli->log_file ? cli->log_file : getenv("OSARA_LOG_FILE");
    const char *size = cli->log_max_size ? cli->log_max_size : getenv("OSARA_LOG_MAX_SIZE");
    uint64_t max_bytes = 0;
    if (size && *size && parse_size(size, &max_bytes) != 0) {
        fprintf(stderr, "osara: --log-max-size expects bytes like 100M or 1G, got '%s'\n", size);
        return EXIT_USAGE;
    }
    if (!file || !*file) {
        if (max_bytes) {
            fprintf(stderr, "osara: --log-max-size needs --log-file\n");
            return EXIT_USAGE;
        }
        return 0;
    }
    int rc = osara_log_set_file(file, max_bytes);
    if (rc != 0) {
        fprintf(stderr, "osara: cannot open log file %s: %s\n", file, strerror(-rc));
        return EXIT_USAGE;
    }
    return 0;
}

static int setup_logging(cli_t *cli)
{
    const char *lvl = cli->log_level ? cli->log_level : getenv("OSARA_LOG_LEVEL");
    const char *fmt = cli->log_format ? cli->log_format : getenv("OSARA_LOG_FORMAT");
    int level = lvl && *lvl ? osara_log_parse_level(lvl) : OSARA_LOG_INFO;
    int format = fmt && *fmt ? osara_log_parse_format(fmt) : OSARA_LOG_TEXT;
    if (level < 0) {
        fprintf(stderr, "osara: unknown log level '%s' (debug|info|warn|error)\n", lvl);
        return EXIT_USAGE;
    }
    if (format < 0) {
        fprintf(stderr, "osara: unknown log format '%s' (text|json)\n", fmt);
        return EXIT_USAGE;
    }
    int rc = setup_log_file(cli);
    if (rc != 0) {
        return rc;
    }
    osara_log_init((osara_log_level_t)level, (osara_log_format_t)format);
    return 0;
}

/* One-line error for a script that cannot be opened; exit code 3. */
static int check_script_file(const char *path)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        fprintf(stderr, "osara: cannot open %s: %s\n", path, strerror(errno));
        return EXIT_NOFILE;
    }
    if (S_ISDIR(st.st_mode)) {
        fprintf(stderr, "osara: %s is a directory, not a Lua script\n", path);
        return EXIT_NOFILE;
    }
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        fprintf(stderr, "osara: cannot read %s: %s\n", path, strerror(errno));
        return EXIT_NOFILE;
    }
    fclose(f);
    return 0;
}

static int run_worker(cli_t *cli)
{
    osara_worker_t w;
    if (osara_worker_init(&w, &cli->w) != 0) {
        OSARA_ERROR("%s", osara_err_msg());
        return 70;
    }
    int rc = osara_worker_run(&w);
    osara_worker_free(&w);
    osara_natsio_shutdown();
    return rc;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return EXIT_USAGE;
    }
    if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
        strcmp(argv[1], "help") == 0) {
        usage(stdout);
        return EXIT_OK;
    }
    if (strcmp(argv[1], "version") == 0 || strcmp(argv[1], "--version") == 0) {
        printf("osara %s\n", OSARA_VERSION);
        return EXIT_OK;
    }
    if (strcmp(argv[1], "store") == 0) {
        return osara_store_main(argc, argv);
    }
    if (strcmp(argv[1], "sql") == 0) {
        return osara_sql_main(argc, argv);
    }
    if (strcmp(argv[1], "broker") == 0) {
        return osara_kafka_broker_main(argc, argv);
    }
    int ci = find_command(argv[1]);
    if (ci < 0) {
        fprintf(stderr, "osara: unknown command '%s'\n\n", argv[1]);
        usage(stderr);
        return EXIT_USAGE;
    }
    cli_t cli = {.w = {.grace = 10, .load_timeout = 5,
                       .loop_stall_ms = OSARA_LOOP_STALL_DEFAULT_MS}};
    cli.running = commands[ci].letter == 'r';
    int rc = parse_args(&cli, ci, argc, argv);
    if (rc == 0) {
        rc = stall_from_env(&cli);
    }
    if (rc != 0) {
        return rc;
    }
    if ((rc = setup_logging(&cli)) != 0) {
        return rc;
    }
    char letter = commands[ci].letter;
    if (letter == 'd') {
        setenv("OSARA_DOCS", getenv("OSARA_DOCS") ? getenv("OSARA_DOCS") : "asyncapi", 0);
        letter = 'c'; /* loaded as osara check loads it */
    } else {
        unsetenv("OSARA_DOCS");
    }
    if (letter == 'r' || letter == 'c') {
        if (cli.npaths != 1) {
            fprintf(stderr, "osara %s: expects exactly one SCRIPT (see --help)\n",
                    commands[ci].name);
            osara_log_shutdown();
            return EXIT_USAGE;
        }
        cli.w.script = cli.paths[0];
        cli.w.mode = letter == 'r' ? OSARA_MODE_RUN : OSARA_MODE_CHECK;
        /* A script's print() shows at once in a pipe (docker logs, systemd,
         * a spec), in order with the log lines, as in a terminal. */
        if (letter == 'r')
            setvbuf(stdout, NULL, _IOLBF, 0);
        if ((rc = check_script_file(cli.w.script)) != 0) {
            osara_log_shutdown();
            return rc;
        }
    } else if (letter == 't') {
        cli.w.mode = OSARA_MODE_TEST;
        cli.w.test_paths = cli.paths;
        cli.w.ntest_paths = cli.npaths;
    }
    rc = run_worker(&cli);
    osara_log_shutdown();
    return rc;
}
