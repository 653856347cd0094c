/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "manager.h"

/* The org.providerrouter.Router1 object on the system (or session) bus, on the manager's loop:
 * reads its state, calls its setters (root, the service's own user, or whoever polkit
 * authorizes), and follows its changes with PropertiesChanged. */
typedef struct Bus Bus;

/* With BusMode none, *ret is NULL. */
int bus_new(Manager *m, Bus **ret);
Bus *bus_free(Bus *b);
G_DEFINE_AUTOPTR_CLEANUP_FUNC(Bus, bus_free)

/* A change is answered once it is on disk: pending() says which generation of saved state the
 * changes made so far need; bus_persisted() says which generation is saved (and answers the
 * calls that waited for it). Without these, calls are answered at once. */
typedef uint64_t (*BusPendingFunc)(void *userdata);
void bus_set_persistence(Bus *b, BusPendingFunc pending, void *userdata);
void bus_persisted(Bus *b, uint64_t saved);

/* The caller's effective uid, as the bus broker vouches for it: never one sd-bus read from /proc
 * itself (an "augmented" credential, racy against PID reuse). -EPERM when there is none. */
int bus_creds_trusted_euid(sd_bus_creds *creds, uid_t *ret);
