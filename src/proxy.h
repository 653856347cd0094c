/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

typedef struct Request Request;

/* POST /v1/chat/completions and friends: inspect, route, relay. */
void proxy_dispatch(Request *r);
/* Stops whatever is under way for the request: its transfer, a back-off before a retry. */
void proxy_cancel(Request *r);
/* Makes the answer of a stream whose first event is in (or which is already complete). */
void proxy_respond_pending(Request *r);
