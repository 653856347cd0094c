/* SPDX-License-Identifier: LGPL-2.1-or-later */
#pragma once

typedef struct Request Request;
typedef struct ModelsQuery ModelsQuery;

/* GET /v1/models: asks every provider (or the one named by X-Provider) for its list at once and
 * answers with the union, plus configured and mapped model names. */
void models_dispatch(Request *r);
ModelsQuery *models_query_free(ModelsQuery *q);
