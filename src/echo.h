/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

typedef struct Request Request;

void echo_respond(Request *r);
