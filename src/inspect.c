/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include <json-glib/json-glib.h>

#include "inspect.h"

void chat_request_info_clear(ChatRequestInfo *info) {
        g_clear_pointer(&info->model, g_free);
        info->stream = false;
        info->has_messages = false;
}

static int parse_object(const char *body, size_t size, JsonParser **ret_parser, JsonObject **ret_object,
                        char **ret_message) {
        g_autoptr(JsonParser) parser = json_parser_new_immutable();
        g_autoptr(GError) error = NULL;
        JsonNode *root;

        if (size == 0) {
                *ret_message = g_strdup("The request body is empty; expected a JSON object.");
                return -EINVAL;
        }
        if (!json_parser_load_from_data(parser, body, (gssize) size, &error)) {
                *ret_message = g_strdup_printf("The request body is not valid JSON: %s", error->message);
                return -EINVAL;
        }
        root = json_parser_get_root(parser);
        if (!root || !JSON_NODE_HOLDS_OBJECT(root)) {
                *ret_message = g_strdup("The request body must be a JSON object.");
                return -EINVAL;
        }
        *ret_object = json_node_get_object(root);
        *ret_parser = TAKE_PTR(parser);
        return 0;
}

int inspect_chat_request(const char *body, size_t size, ChatRequestInfo *ret, char **ret_message) {
        g_autoptr(JsonParser) parser = NULL;
        JsonObject *o = NULL;
        JsonNode *n;
        int r;

        g_assert(ret);
        g_assert(ret_message);

        r = parse_object(body, size, &parser, &o, ret_message);
        if (r < 0)
                return r;

        *ret = (ChatRequestInfo) {};

        n = json_object_get_member(o, "model");
        if (n && !JSON_NODE_HOLDS_NULL(n)) {
                if (!JSON_NODE_HOLDS_VALUE(n) || json_node_get_value_type(n) != G_TYPE_STRING) {
                        *ret_message = g_strdup("'model' must be a string.");
                        return -EINVAL;
                }
                ret->model = g_strdup(json_node_get_string(n));
        }

        n = json_object_get_member(o, "stream");
        if (n && !JSON_NODE_HOLDS_NULL(n)) {
                if (!JSON_NODE_HOLDS_VALUE(n) || json_node_get_value_type(n) != G_TYPE_BOOLEAN) {
                        chat_request_info_clear(ret);
                        *ret_message = g_strdup("'stream' must be a boolean.");
                        return -EINVAL;
                }
                ret->stream = json_node_get_boolean(n);
        }

        n = json_object_get_member(o, "messages");
        ret->has_messages = n && JSON_NODE_HOLDS_ARRAY(n);
        return 0;
}

int inspect_set_model(const char *body, size_t size, const char *model, char **ret_body, size_t *ret_size) {
        g_autoptr(JsonParser) parser = json_parser_new();
        g_autoptr(JsonGenerator) gen = NULL;
        JsonNode *root;
        gsize n;

        if (!json_parser_load_from_data(parser, body, (gssize) size, NULL))
                return -EINVAL;
        root = json_parser_get_root(parser);
        if (!root || !JSON_NODE_HOLDS_OBJECT(root))
                return -EINVAL;
        json_object_set_string_member(json_node_get_object(root), "model", model);

        gen = json_generator_new();
        json_generator_set_root(gen, root);
        *ret_body = json_generator_to_data(gen, &n);
        *ret_size = n;
        return 0;
}

static bool get_uint(JsonObject *o, const char *name, uint64_t *ret) {
        JsonNode *n = json_object_get_member(o, name);
        if (!n || !JSON_NODE_HOLDS_VALUE(n) || json_node_get_value_type(n) != G_TYPE_INT64)
                return false;
        if (json_node_get_int(n) < 0)
                return false;
        *ret = (uint64_t) json_node_get_int(n);
        return true;
}

int inspect_usage(const char *body, size_t size, uint64_t *ret_prompt, uint64_t *ret_completion) {
        g_autoptr(JsonParser) parser = json_parser_new_immutable();
        JsonNode *root, *usage;
        JsonObject *u;
        uint64_t p = 0, c = 0;

        /* Cheap test first: most stream chunks carry no usage. */
        if (!g_strstr_len(body, (gssize) size, "\"usage\""))
                return -ENOENT;
        if (!json_parser_load_from_data(parser, body, (gssize) size, NULL))
                return -EINVAL;
        root = json_parser_get_root(parser);
        if (!root || !JSON_NODE_HOLDS_OBJECT(root))
                return -EINVAL;
        usage = json_object_get_member(json_node_get_object(root), "usage");
        if (!usage || !JSON_NODE_HOLDS_OBJECT(usage))
                return -ENOENT;
        u = json_node_get_object(usage);
        if (!get_uint(u, "prompt_tokens", &p) && !get_uint(u, "completion_tokens", &c))
                return -ENOENT;
        (void) get_uint(u, "completion_tokens", &c);
        *ret_prompt = p;
        *ret_completion = c;
        return 0;
}
