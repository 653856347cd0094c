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
