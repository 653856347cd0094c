/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "manager.h"

/* Runtime routing changes (D-Bus) are kept as differences from the configuration in
 * $STATE_DIRECTORY/routing.state, so a crash or restart does not silently revert them. A reload
 * returns to the configuration files and removes the file.
 *
 * Saving never blocks the loop and costs the loop the same per change whatever the size of the
 * routing table: each change is handed, as one small record, to a writer thread that keeps its
 * own copy of the differences and rewrites the file (atomically and durably, as before) once
 * per batch of changes. Who must know when a change is on disk (the D-Bus call that made it)
 * asks state_pending() and hears the saved callback. */

typedef struct State State;

char *state_file_path(void);
/* Synchronous, on the calling thread: for tests and as the fallback without a writer thread. */
int state_save(Manager *m);
int state_load(Manager *m);
int state_clear(Manager *m);

/* Restores the saved changes and keeps the file up to date with the manager's from now on. */
int state_new(Manager *m, State **ret);
/* Writes what is pending, then stops. */
State *state_free(State *s);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(State, state_free)

/* The generation of the saved state that contains every change made so far; state_saved()
 * reaches it once they are on disk (or failed to be, which is logged). */
uint64_t state_pending(State *s);
uint64_t state_saved(State *s);
/* Called from the loop each time a generation was written. */
void state_set_saved_callback(State *s, void (*func)(uint64_t saved, void *userdata), void *userdata);
