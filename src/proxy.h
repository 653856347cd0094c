/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "request.h"

/* POST /v1/chat/completions and the other model APIs: inspect, route, relay. */
extern const Handler proxy_handler;
