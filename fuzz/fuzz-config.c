/* SPDX-License-Identifier: LGPL-2.1-or-later */
/* A configuration file, and after a line "--ENV--" the plan's environment variables (one
 * NAME=value per line), through config_load() and, when valid, the router built from it. */
#include <assert.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "router.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define ENV_MARK "\n--ENV--\n"

static char *config_dir, *config_path;

static void cleanup(void) {
        (void) unlink(config_path);
        (void) rmdir(config_dir);
}

static void setup(void) {
        g_autofree char *dir = NULL;

        /* One private directory for the whole run; tmpfs when there is one. */
        if (access("/dev/shm", W_OK) == 0)
                dir = g_strdup("/dev/shm/fuzz-config-XXXXXX");
        else
                dir = g_build_filename(g_get_tmp_dir(), "fuzz-config-XXXXXX", NULL);
        assert(g_mkdtemp(dir));
        config_path = g_build_filename(dir, "provider-router.conf", NULL);
        config_dir = g_steal_pointer(&dir);
        assert(atexit(cleanup) == 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
        const char *text = (const char *) data, *mark;
        g_autoptr(GPtrArray) errors = NULL, warnings = NULL;
        g_autoptr(Config) c = NULL;
        g_auto(GStrv) env = NULL;
        size_t file_size = size;
        int r;

        if (!config_path)
                setup();

        mark = memmem(text, size, ENV_MARK, strlen(ENV_MARK));
        if (mark) {
                g_autofree char *vars = g_strndup(mark + strlen(ENV_MARK), size - (size_t) (mark - text) - strlen(ENV_MARK));
                file_size = (size_t) (mark - text);
                env = g_strsplit(vars, "\n", 64);
        }
        assert(g_file_set_contents(config_path, text, (gssize) file_size, NULL));

        ConfigSources src = {
                .path = config_path,
                .path_required = true,
                .dropin_dir = "/nonexistent/fuzz-config.d",
                .environ = env,
        };
        r = config_load(&src, &c, &errors, &warnings);
        assert(warnings);
        if (r < 0) {
                assert(r == -EINVAL);
                assert(errors && errors->len > 0);
                assert(!c);
                return 0;
        }
        assert(c && !errors);
        assert(config_find_provider(c, c->default_provider));
        for (guint i = 0; i < c->providers->len; i++) {
                ProviderConfig *p = c->providers->pdata[i];
                assert(config_find_provider(c, p->name) == p);
                assert(provider_name_is_valid(p->name));
                assert(p->kind != PROVIDER_KIND_OPENAI || p->base_url);
        }

        g_autoptr(ProviderSet) set = provider_set_new(c, NULL, NULL);
        g_autoptr(Router) router = router_new(c, set, NULL);
        RoutePick pick = {};
        for (guint i = 0; i < c->mapping_order->len; i++) {
                r = router_pick(router, NULL, c->mapping_order->pdata[i], NULL, NULL, 0, &pick);
                assert(r >= 0 && pick.provider);
        }
        r = router_pick(router, NULL, NULL, NULL, NULL, 0, &pick);
        assert(r >= 0 && pick.provider);
        return 0;
}
