/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "request.h"

/* POST /v1/chat/completions and the other model APIs: inspect, route, relay. */
extern const Handler proxy_handler;
/* Any other POST /v1/…: the same, when the body is a JSON object that names a model (else 404);
 * the provider's URL is its BaseURL and the path after /v1. */
extern const Handler proxy_any_handler;
