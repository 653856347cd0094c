/* SPDX-License-Identifier: LGPL-2.1-or-later */
#include "json-util.h"

void json_append_string(GString *out, const char *s) {
        g_string_append_c(out, '"');
        for (const char *c = s; *c; c++) {
                if (*c == '"' || *c == '\\') {
                        g_string_append_c(out, '\\');
                        g_string_append_c(out, *c);
                } else if ((unsigned char) *c < 0x20)
                        g_string_append_printf(out, "\\u%04x", (unsigned) (unsigned char) *c);
                else
                        g_string_append_c(out, *c);
        }
        g_string_append_c(out, '"');
}

char *json_builder_to_string(JsonBuilder *b, size_t *ret_size) {
        g_autoptr(JsonGenerator) gen = json_generator_new();
        g_autoptr(JsonNode) root = json_builder_get_root(b);
        gsize n;
        char *s;

        json_generator_set_root(gen, root);
        s = json_generator_to_data(gen, &n);
        if (ret_size)
                *ret_size = n;
        return s;
}

char *json_error_body(const char *type, const char *message, const char *provider, const char *code) {
        g_autoptr(JsonBuilder) b = json_builder_new_immutable();

        json_builder_begin_object(b);
        json_builder_set_member_name(b, "error");
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "message");
        json_builder_add_string_value(b, message);
        json_builder_set_member_name(b, "type");
        json_builder_add_string_value(b, type);
        if (provider) {
                json_builder_set_member_name(b, "provider");
                json_builder_add_string_value(b, provider);
        }
        if (code) {
                json_builder_set_member_name(b, "code");
                json_builder_add_string_value(b, code);
        }
        json_builder_end_object(b);
        json_builder_end_object(b);
        return json_builder_to_string(b, NULL);
}

void json_builder_add_chat(JsonBuilder *b, const char *model, const char *prompt) {
        json_builder_set_member_name(b, "model");
        json_builder_add_string_value(b, model);
        json_builder_set_member_name(b, "messages");
        json_builder_begin_array(b);
        json_builder_begin_object(b);
        json_builder_set_member_name(b, "role");
        json_builder_add_string_value(b, "user");
        json_builder_set_member_name(b, "content");
        json_builder_add_string_value(b, prompt);
        json_builder_end_object(b);
        json_builder_end_array(b);
}
