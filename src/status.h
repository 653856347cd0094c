/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

#include "request.h"

/* GET /health: status, default provider, each provider's state. */
extern const Handler health_handler;
/* GET /metrics: the statistics in the Prometheus text format. */
extern const Handler metrics_handler;
