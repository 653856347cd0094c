/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

typedef struct Request Request;

/* POST /v1/chat/completions and friends: inspect, route, relay. */
void proxy_dispatch(Request *r);
