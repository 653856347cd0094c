/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "manager.h"

/* The org.providerrouter.Router1 object on the system (or session) bus, on the router's loop. */
int bus_setup(Manager *m);
void bus_done(Manager *m);
void bus_emit_routing_changed(Manager *m);
void bus_emit_provider_states_changed(Manager *m);
