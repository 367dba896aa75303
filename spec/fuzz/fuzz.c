/* fuzz.c - libFuzzer entry for osara's input paths.
 *
 * One source, one executable per target (osara_fuzz_<target>, built with
 * -DOSARA_FUZZ_TARGET="<target>" when cmake runs with -DOSARA_FUZZ=ON and
 * clang). The input goes to the Lua function of that name in
 * spec/fuzz/targets.lua, inside a real osara VM (check mode: nothing
 * connects), so the codecs, the schema validator and the dispatch path are
 * fuzzed exactly as a handler reaches them.
 *
 * The contract under test: bad input returns nil, err. A crash, a sanitizer
 * report, or a Lua error escaping a target (a codec that raises instead of
 * returning nil, err) is a finding: the target aborts so libFuzzer saves the
 * input. */
#include <dirent.h>
#include <lauxlib.h>
#include <lua.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "core/lvm.h"
#include "core/worker.h"

#ifndef OSARA_FUZZ_TARGET
#error "build with -DOSARA_FUZZ_TARGET=\"name\""
#endif
#ifndef OSARA_FUZZ_DIR
#error "build with -DOSARA_FUZZ_DIR=\"spec/fuzz\""
#endif

static osara_worker_t w;
static osara_vm_t *vm;
static lua_State *L;
static int target_ref = LUA_NOREF;

/* LuaJIT's own allocator hides pointers from LeakSanitizer: what a Lua
 * object owns looks leaked unless the state is closed before the check. */
static void close_vm(void)
{
    osara_vm_close(vm);
    osara_worker_free(&w);
}

static void die(const char *what, const char *msg)
{
    fprintf(stderr, "fuzz %s: %s: %s\n", OSARA_FUZZ_TARGET, what, msg);
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void warm_up(const char *dir)
{
    DIR *d = opendir(dir);
    struct dirent *de;
    while (d && (de = readdir(d)) != NULL) {
        char path[4096], buf[65536];
        snprintf(path, sizeof(path), "%s/%s", dir, de->d_name);
        FILE *f = de->d_name[0] == '.' ? NULL : fopen(path, "rb");
        if (f) {
            size_t n = fread(buf, 1, sizeof(buf), f);
            fclose(f);
            LLVMFuzzerTestOneInput((const uint8_t *)buf, n);
        }
    }
    if (d) {
        closedir(d);
    }
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    osara_worker_opts_t opts = {.mode = OSARA_MODE_CHECK, .grace = 1, .load_timeout = 5};
    if (osara_worker_init(&w, &opts) != 0) {
        die("worker", "cannot initialise");
    }
    vm = osara_vm_new(osara_worker_vm_host(&w), 1);
    if (vm == NULL) {
        die("vm", "cannot create");
    }
    L = vm->L;
    if (luaL_loadfile(L, OSARA_FUZZ_DIR "/targets.lua") != 0 || lua_pcall(L, 0, 1, 0) != 0) {
        die("targets.lua", lua_tostring(L, -1));
    }
    lua_getfield(L, -1, OSARA_FUZZ_TARGET); /* [targets, fn] */
    if (!lua_isfunction(L, -1)) {
        die("targets.lua", "no function of that name");
    }
    target_ref = luaL_ref(L, LUA_REGISTRYINDEX);
    lua_pop(L, 1);
    /* One-time allocations (codec instances, caches) happen here, not in
     * the first input, where libFuzzer's leak check would blame them: the
     * pointers live in LuaJIT's arena, which LeakSanitizer cannot scan. The
     * seeds reach every path a later input can make lazy allocations on. */
    warm_up(OSARA_FUZZ_DIR "/corpus/" OSARA_FUZZ_TARGET);
    lua_gc(L, LUA_GCCOLLECT, 0);
    atexit(close_vm);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    lua_rawgeti(L, LUA_REGISTRYINDEX, target_ref);
    lua_pushlstring(L, (const char *)data, size);
    if (lua_pcall(L, 1, 0, 0) != 0) {
        die("escaped error", lua_tostring(L, -1));
    }
    /* Free what the input made before libFuzzer's leak check: LeakSanitizer
     * cannot see pointers held in LuaJIT's arena, so a live Lua object's C
     * memory would look leaked. This also keeps every __gc under test. */
    lua_gc(L, LUA_GCCOLLECT, 0);
    return 0;
}
