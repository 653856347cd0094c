/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

typedef struct Request Request;

/* POST /v1/chat/completions and friends: inspect, route, relay. */
void proxy_dispatch(Request *r);
/* Stops whatever is under way for the request: its transfer, a back-off before a retry. */
void proxy_cancel(Request *r);
