//! JSON-RPC 2.0 framing for MCP's stdio transport: one message a line,
//! UTF-8, no embedded newlines. Reading a line is capped
//! ([`MAX_LINE`]); a line is classified into a request, a notification, a
//! response (we send no requests, so those are ignored) or an error reply
//! to send back (-32700 parse error, -32600 invalid request). Replies are
//! built here too, so the rest of the crate never spells `"jsonrpc"`.

use std::io::{BufRead, Read};

use serde_json::{Map, Value, json};

/// Invalid JSON was received.
pub const PARSE_ERROR: i64 = -32700;
/// The JSON sent is not a valid request object.
pub const INVALID_REQUEST: i64 = -32600;
/// The method does not exist.
pub const METHOD_NOT_FOUND: i64 = -32601;
/// Invalid method parameters.
pub const INVALID_PARAMS: i64 = -32602;
/// Internal error.
pub const INTERNAL_ERROR: i64 = -32603;

/// Longest line read; a longer one is answered with a parse error and
/// skipped up to its newline. Tool arguments are small: the longest is a
/// 50,000-character message (at most 200 kB of UTF-8, 300 kB escaped).
pub const MAX_LINE: usize = 4 << 20;

/// A request id: a string or a number, kept as it came.
pub type Id = Value;

/// One line from the client, classified.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A call that wants a reply.
    Request {
        /// Its id.
        id: Id,
        /// The method.
        method: String,
        /// Its params (`Value::Null` when absent).
        params: Value,
    },
    /// A message that wants no reply.
    Notification {
        /// The method.
        method: String,
        /// Its params (`Value::Null` when absent).
        params: Value,
    },
    /// A reply to a request of ours (we send none; ignored).
    Response,
    /// Not a valid message: send this error reply.
    Invalid(Value),
    /// An empty line (ignored).
    Empty,
}

/// What one read from the input gave.
#[derive(Debug)]
pub enum Line {
    /// A whole line (newline stripped).
    Text(String),
    /// A line over [`MAX_LINE`] bytes, skipped.
    TooLong(usize),
    /// A line that is not UTF-8.
    NotUtf8,
    /// End of input: the client closed our stdin.
    Eof,
}

/// Read one line of at most [`MAX_LINE`] bytes.
pub fn read_line<R: BufRead>(r: &mut R) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    let n = Read::by_ref(r)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() != Some(&b'\n') && buf.len() > MAX_LINE {
        // Skip the rest of this line.
        let mut skipped = buf.len();
        loop {
            let (done, used) = {
                let chunk = r.fill_buf()?;
                if chunk.is_empty() {
                    (true, 0)
                } else {
                    match chunk.iter().position(|&b| b == b'\n') {
                        Some(i) => (true, i + 1),
                        None => (false, chunk.len()),
                    }
                }
            };
            r.consume(used);
            skipped += used;
            if done {
                return Ok(Line::TooLong(skipped));
            }
        }
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    match String::from_utf8(buf) {
        Ok(s) => Ok(Line::Text(s)),
        Err(_) => Ok(Line::NotUtf8),
    }
}

/// Classify one line.
pub fn classify(line: &str) -> Incoming {
    if line.trim().is_empty() {
        return Incoming::Empty;
    }
    let v: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => {
            return Incoming::Invalid(error(
                &Value::Null,
                PARSE_ERROR,
                &format!(
                    "parse error: the line is not JSON ({e}); send one JSON-RPC 2.0 object per line"
                ),
            ));
        }
    };
    let Value::Object(obj) = v else {
        let what = if v.is_array() {
            "a batch (array); send one JSON-RPC object per line, batches are not supported"
        } else {
            "not a JSON object; send a JSON-RPC 2.0 object"
        };
        return Incoming::Invalid(error(
            &Value::Null,
            INVALID_REQUEST,
            &format!("invalid request: {what}"),
        ));
    };
    classify_object(obj)
}

fn classify_object(mut obj: Map<String, Value>) -> Incoming {
    // A response (to a request of ours; we send none) is never answered,
    // whatever its id: replying to a response is against JSON-RPC.
    if !obj.contains_key("method") && (obj.contains_key("result") || obj.contains_key("error")) {
        return Incoming::Response;
    }
    let id = obj.remove("id");
    let id_ok = matches!(id, None | Some(Value::String(_) | Value::Number(_)));
    let reply_id = if id_ok {
        id.clone().unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    let invalid = |msg: &str| Incoming::Invalid(error(&reply_id, INVALID_REQUEST, msg));
    if obj.get("jsonrpc") != Some(&Value::String("2.0".into())) {
        return invalid("invalid request: \"jsonrpc\" must be \"2.0\"");
    }
    if !id_ok {
        return invalid("invalid request: \"id\" must be a string or a number");
    }
    let method = match obj.remove("method") {
        Some(Value::String(m)) => m,
        Some(_) => return invalid("invalid request: \"method\" must be a string"),
        None => return invalid("invalid request: no \"method\""),
    };
    let params = obj.remove("params").unwrap_or(Value::Null);
    if !matches!(params, Value::Null | Value::Object(_) | Value::Array(_)) {
        return invalid("invalid request: \"params\" must be an object");
    }
    match id {
        Some(id) => Incoming::Request { id, method, params },
        None => Incoming::Notification { method, params },
    }
}

/// A success reply.
pub fn result(id: &Id, result: Value) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "result": result })
}

/// An error reply.
pub fn error(id: &Id, code: i64, message: &str) -> Value {
    json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(i: &Incoming) -> i64 {
        match i {
            Incoming::Invalid(v) => v["error"]["code"].as_i64().unwrap_or(0),
            _ => 0,
        }
    }

    #[test]
    fn classifies_lines() {
        assert_eq!(code(&classify("{not json")), PARSE_ERROR);
        assert_eq!(code(&classify("[1,2]")), INVALID_REQUEST);
        assert_eq!(code(&classify("42")), INVALID_REQUEST);
        assert_eq!(
            code(&classify(r#"{"id":1,"method":"ping"}"#)),
            INVALID_REQUEST
        );
        assert_eq!(
            code(&classify(r#"{"jsonrpc":"2.0","id":{},"method":"ping"}"#)),
            INVALID_REQUEST
        );
        assert_eq!(
            code(&classify(r#"{"jsonrpc":"2.0","id":3,"method":7}"#)),
            INVALID_REQUEST
        );
        match classify(r#"{"jsonrpc":"2.0","id":3,"method":7}"#) {
            Incoming::Invalid(v) => assert_eq!(v["id"], 3),
            other => panic!("{other:?}"),
        }
        assert_eq!(classify("  "), Incoming::Empty);
        assert_eq!(
            classify(r#"{"jsonrpc":"2.0","id":"x","method":"ping"}"#),
            Incoming::Request {
                id: json!("x"),
                method: "ping".into(),
                params: Value::Null
            }
        );
        assert_eq!(
            classify(r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#),
            Incoming::Notification {
                method: "notifications/initialized".into(),
                params: Value::Null
            }
        );
        assert_eq!(
            classify(r#"{"jsonrpc":"2.0","id":1,"result":{}}"#),
            Incoming::Response
        );
        // A client's error response with a null id (as JSON-RPC sends when
        // it could not read our id) is a response too: never replied to.
        assert_eq!(
            classify(r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"x"}}"#),
            Incoming::Response
        );
    }

    #[test]
    fn long_lines_are_skipped_whole() {
        let mut input = vec![b'x'; MAX_LINE + 10];
        input.extend_from_slice(b"\n{\"a\":1}\n");
        let mut r = std::io::BufReader::new(&input[..]);
        assert!(matches!(read_line(&mut r).unwrap(), Line::TooLong(n) if n == MAX_LINE + 11));
        assert!(matches!(read_line(&mut r).unwrap(), Line::Text(s) if s == "{\"a\":1}"));
        assert!(matches!(read_line(&mut r).unwrap(), Line::Eof));
        let mut r = std::io::BufReader::new(&b"\xff\xfe\n"[..]);
        assert!(matches!(read_line(&mut r).unwrap(), Line::NotUtf8));
    }
}
