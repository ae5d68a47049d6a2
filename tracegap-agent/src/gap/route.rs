//! Low-cardinality span names: `METHOD route`, where the route is the path
//! with its identifiers replaced, as the OpenTelemetry HTTP conventions ask
//! when the server's real route template is unknown.

/// Replaces path segments that look like identifiers: numbers, UUIDs and
/// long hex strings. `/users/42/orders/9f1c...` → `/users/{id}/orders/{id}`.
pub fn template(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for (i, seg) in path.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if is_identifier(seg) {
            out.push_str("{id}");
        } else {
            out.push_str(seg);
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

fn is_identifier(seg: &str) -> bool {
    if seg.is_empty() {
        return false;
    }
    let digits = seg.bytes().filter(u8::is_ascii_digit).count();
    let hex = seg.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    // A number; a UUID or hash-like hex run (at least one digit, so words
    // like "deadbeef" or "cafe" stay); or a long token that is mostly digits.
    seg.bytes().all(|b| b.is_ascii_digit())
        || (hex && seg.len() >= 16 && digits > 0)
        || (seg.len() >= 8 && digits * 2 >= seg.len())
}

#[cfg(test)]
mod tests {
    use super::template;

    #[test]
    fn identifiers_are_grouped_and_words_kept() {
        for (path, want) in [
            ("/", "/"),
            ("", "/"),
            ("/users/42", "/users/{id}"),
            ("/users/42/orders", "/users/{id}/orders"),
            (
                "/o/6f1c2d3e-0b4a-4c5d-9e8f-0123456789ab/items",
                "/o/{id}/items",
            ),
            ("/blob/0af7651916cd43dd8448eb211c80319c", "/blob/{id}"),
            ("/v1/traces", "/v1/traces"),
            ("/api/cafe", "/api/cafe"),
            ("/slow/3", "/slow/{id}"),
            ("/a/INV20240117", "/a/{id}"),
        ] {
            assert_eq!(template(path), want, "{path}");
        }
    }
}
