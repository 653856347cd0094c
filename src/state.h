/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "manager.h"

/* Runtime routing changes (D-Bus) are kept as differences from the configuration in
 * $STATE_DIRECTORY/routing.state, so a crash or restart does not silently revert them. A reload
 * returns to the configuration files and removes the file. */

char *state_file_path(void);
int state_save(Manager *m);
int state_load(Manager *m);
int state_clear(Manager *m);
/* Restores the saved changes and keeps the file up to date with the manager's from now on. */
int state_attach(Manager *m);
