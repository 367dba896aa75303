/* timer.h - osara.every / osara.after / osara.sleep on libuv timers.
 *
 * A timer registered while the script loads is a registry entry of kind
 * "timer" (it survives reloads with its phase when unchanged); a timer
 * created later by running code belongs to its VM and stops with it. A tick
 * runs the function in a pooled coroutine; a tick that is still running
 * when the next is due makes that next tick skip (counted), so ticks never
 * overlap and never pile up. */
#ifndef OSARA_TIMER_H
#define OSARA_TIMER_H

#include <lua.h>

/* Lua binding `osara.timer_c`: new, sleep, now, monotonic. Also registers
 * the "timer" registry kind. */
int osara_timer_open(lua_State *L);

#endif
