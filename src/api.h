/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

typedef struct Request Request;

void api_health(Request *r);
void api_metrics(Request *r);
