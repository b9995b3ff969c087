//! The JSON a constraint produces, one rule for both processes: the worker
//! compiles a request's `json_schema` with it, and the coordinator embeds
//! schemas in the grammars it builds (tool calls in a chat template's own
//! format) with it, so the two produce the same JSON.
//!
//! - Layout: compact, one space after `:` and `,` (`{"a": 1, "b": [2,
//!   3]}`), no other whitespace: flexible whitespace lets a small model pad
//!   a completion with newlines until `max_tokens` runs out.
//! - Integers a schema leaves unbounded are kept within ±(2^53 − 1)
//!   ([`INTEGER_LIMIT`]).

use serde_json::Value;

/// The layout, as llguidance's `x-guidance` options.
const LAYOUT: &str =
    r#"{"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}"#;

/// The integers a schema leaves unbounded are kept within I-JSON's
/// interoperable range, ±(2^53 − 1) (RFC 7493): without it a small model
/// can write digits until `max_tokens` runs out, and a value beyond it
/// would not survive a JavaScript or double-precision parser anyway.
pub const INTEGER_LIMIT: i64 = (1 << 53) - 1;

/// `schema` with the layout and the integer bounds: an object, or `true` /
/// `false`; anything else is refused.
pub fn prepare(mut schema: Value) -> Result<Value, String> {
    bound_integers(&mut schema);
    match &mut schema {
        Value::Object(map) => {
            let layout = serde_json::from_str(LAYOUT).expect("the layout is JSON");
            map.insert("x-guidance".to_string(), layout);
        }
        Value::Bool(_) => {}
        _ => return Err("the schema must be a JSON object".to_string()),
    }
    Ok(schema)
}

/// Gives every integer schema in `schema` (at any depth) that has no lower
/// or upper bound the [`INTEGER_LIMIT`] one.
fn bound_integers(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            let integer = match map.get("type") {
                Some(Value::String(t)) => t == "integer",
                Some(Value::Array(ts)) => ts.iter().any(|t| t == "integer"),
                _ => false,
            };
            if integer {
                if !map.contains_key("minimum") && !map.contains_key("exclusiveMinimum") {
                    map.insert("minimum".into(), Value::from(-INTEGER_LIMIT));
                }
                if !map.contains_key("maximum") && !map.contains_key("exclusiveMaximum") {
                    map.insert("maximum".into(), Value::from(INTEGER_LIMIT));
                }
            }
            for v in map.values_mut() {
                bound_integers(v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(bound_integers),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unbounded_integers_get_the_interoperable_range() {
        let mut schema = serde_json::json!({
            "type": "object",
            "properties": {
                "n": {"type": "integer"},
                "m": {"type": ["integer", "null"], "minimum": 0},
                "type": {"type": "string"},
                "list": {"type": "array", "items": {"anyOf": [{"type": "integer", "exclusiveMaximum": 5}]}}
            }
        });
        bound_integers(&mut schema);
        let p = &schema["properties"];
        assert_eq!(p["n"]["minimum"], -INTEGER_LIMIT);
        assert_eq!(p["n"]["maximum"], INTEGER_LIMIT);
        assert_eq!(p["m"]["minimum"], 0, "a bound given is kept");
        assert_eq!(p["m"]["maximum"], INTEGER_LIMIT);
        assert!(p["type"].get("maximum").is_none(), "{p}");
        let inner = &p["list"]["items"]["anyOf"][0];
        assert_eq!(inner["minimum"], -INTEGER_LIMIT);
        assert!(inner.get("maximum").is_none(), "{inner}");
        assert!(schema.get("minimum").is_none());
    }

    #[test]
    fn the_layout_is_added_and_non_objects_refused() {
        let s = prepare(serde_json::json!({"type": "object"})).unwrap();
        assert_eq!(s["x-guidance"]["item_separator"], ", ");
        assert_eq!(
            prepare(serde_json::json!(true)).unwrap(),
            serde_json::json!(true)
        );
        assert!(prepare(serde_json::json!([1])).is_err());
    }
}
