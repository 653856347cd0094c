/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "exchange.h"
#include "worker.h"

/* The front door: for each exchange, checks what is checked for every request (client token,
 * method, body size, CORS preflight), picks the handler from the route table, and keeps the
 * request's record until it is emitted. */

/* For ExchangeFrontSetup: start with the Worker as userdata, and the callbacks. */
void *dispatch_start(Exchange *x, void *userdata);
extern const ExchangeOps dispatch_ops;
