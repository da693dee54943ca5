//! What `tools/list` returns and `initialize` negotiates: the protocol
//! versions we speak, and each tool's name, description, JSON-Schema input
//! (the Python bridge server's names, argument names, required lists and
//! limits) and output schema (the facts of `structuredContent`). The
//! schemas are written in code as JSON values, next to each other, so a
//! change to one tool's shape is one place.

use serde_json::{Value, json};

/// Protocol versions we answer `initialize` with when the client asks for
/// them, oldest first. A client asking for another gets [`LATEST`].
pub const PROTOCOL_VERSIONS: &[&str] = &["2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25"];

/// Our newest protocol version.
pub const LATEST: &str = "2025-11-25";

/// The version to answer a client that asked for `requested`.
pub fn negotiate(requested: Option<&str>) -> &'static str {
    requested
        .and_then(|r| PROTOCOL_VERSIONS.iter().find(|v| **v == r))
        .copied()
        .unwrap_or(LATEST)
}

/// The action types `send_to_partner` accepts (the Python server's list).
pub const ACTION_TYPES: &[&str] = &["question", "info", "proposal", "blocked", "complete"];

/// The statuses `update_my_status` accepts.
pub const STATUSES: &[&str] = &["working", "waiting", "blocked", "complete"];

/// Most files `send_to_partner` takes in `files_involved`.
pub const MAX_FILES: usize = 20;

/// Shortest and longest role names.
pub const ROLE_CHARS: (usize, usize) = (3, 100);

/// The longest `ask_shard` question, in characters (the query object
/// around it must fit the bridge's 50,000-character message limit).
pub const MAX_QUESTION_CHARS: usize = 49_000;

/// Default and longest `ask_shard` wait, seconds.
pub const ASK_TIMEOUT_SECS: (f64, f64) = (60.0, 3600.0);

/// The pattern of a conversation id.
pub const CONVERSATION_PATTERN: &str = "^conv_[a-f0-9]{16}$";

/// The tool names, in the order listed.
pub const TOOL_NAMES: &[&str] = &[
    "create_conversation",
    "send_to_partner",
    "check_messages",
    "update_my_status",
    "check_partner_status",
    "ask_shard",
    "shard_status",
];

fn auth_props() -> serde_json::Map<String, Value> {
    let v = json!({
        "conversation_id": {
            "type": "string",
            "pattern": CONVERSATION_PATTERN,
            "description": "The conversation id create_conversation returned (conv_ + 16 hex digits)"
        },
        "session_id": {
            "type": "string",
            "enum": ["a", "b"],
            "description": "Your session: a (created the conversation) or b"
        },
        "token": {
            "type": "string",
            "minLength": 64,
            "maxLength": 64,
            "description": "Your session token (64 hex characters)"
        }
    });
    match v {
        Value::Object(m) => m,
        _ => serde_json::Map::new(),
    }
}

fn input(extra: Value, required_extra: &[&str]) -> Value {
    let mut props = auth_props();
    if let Value::Object(m) = extra {
        props.extend(m);
    }
    let mut required = vec!["conversation_id", "session_id", "token"];
    required.extend_from_slice(required_extra);
    json!({ "type": "object", "properties": props, "required": required })
}

fn string_list() -> Value {
    json!({ "type": "array", "items": { "type": "string" } })
}

/// Every tool, as `tools/list` returns them.
pub fn tools() -> Vec<Value> {
    vec![
        json!({
            "name": "create_conversation",
            "title": "Create a conversation",
            "description": "Create a new secure conversation between two sessions. You become session a; \
                            give the partner token to the other session (for a memory shard: to its autopoll-poller).",
            "inputSchema": {
                "type": "object",
                "properties": {
                    "my_role": { "type": "string", "minLength": ROLE_CHARS.0, "maxLength": ROLE_CHARS.1,
                                 "description": "Your role (e.g. coordinator)" },
                    "partner_role": { "type": "string", "minLength": ROLE_CHARS.0, "maxLength": ROLE_CHARS.1,
                                      "description": "Your partner's role (e.g. memory_shard)" }
                },
                "required": ["my_role", "partner_role"]
            },
            "outputSchema": {
                "type": "object",
                "properties": {
                    "conversation_id": { "type": "string" },
                    "session_id": { "type": "string" },
                    "token": { "type": "string" },
                    "partner_session_id": { "type": "string" },
                    "partner_token": { "type": "string" },
                    "my_role": { "type": "string" },
                    "partner_role": { "type": "string" },
                    "expires_at": { "type": "string" }
                },
                "required": ["conversation_id", "session_id", "token", "partner_session_id", "partner_token", "expires_at"]
            }
        }),
        json!({
            "name": "send_to_partner",
            "title": "Send a message to your partner",
            "description": "Send a message to your partner session (secrets are redacted before it is stored).",
            "inputSchema": input(json!({
                "message": { "type": "string", "maxLength": autopoll_bridge::MAX_MESSAGE_CHARS,
                             "description": "The message text (at most 50,000 characters)" },
                "action_type": { "type": "string", "enum": ACTION_TYPES,
                                 "description": "What kind of message this is (default info)" },
                "files_involved": { "type": "array", "items": { "type": "string" }, "maxItems": MAX_FILES,
                                    "description": "Files the message is about (at most 20)" }
            }), &["message"]),
            "outputSchema": {
                "type": "object",
                "properties": {
                    "message_id": { "type": "integer" },
                    "to_session": { "type": "string" },
                    "timestamp": { "type": "string" },
                    "redacted": { "type": "boolean" }
                },
                "required": ["message_id", "to_session", "timestamp", "redacted"]
            }
        }),
        json!({
            "name": "check_messages",
            "title": "Check for new messages",
            "description": "Return your unread messages, oldest first, and mark them read.",
            "inputSchema": input(json!({}), &[]),
            "outputSchema": {
                "type": "object",
                "properties": {
                    "count": { "type": "integer" },
                    "messages": { "type": "array", "items": {
                        "type": "object",
                        "properties": {
                            "id": { "type": "integer" },
                            "from": { "type": "string" },
                            "message": { "type": "string" },
                            "metadata": {},
                            "timestamp": { "type": "string" },
                            "action_type": { "type": ["string", "null"] },
                            "files_involved": string_list()
                        },
                        "required": ["id", "from", "message", "timestamp"]
                    } }
                },
                "required": ["count", "messages"]
            }
        }),
        json!({
            "name": "update_my_status",
            "title": "Update your status",
            "description": "Set your status (and heartbeat) for your partner to see.",
            "inputSchema": input(json!({
                "status": { "type": "string", "enum": STATUSES, "description": "Your status" }
            }), &["status"]),
            "outputSchema": {
                "type": "object",
                "properties": {
                    "status": { "type": "string" },
                    "last_heartbeat": { "type": "string" }
                },
                "required": ["status", "last_heartbeat"]
            }
        }),
        json!({
            "name": "check_partner_status",
            "title": "Check your partner's status",
            "description": "Your partner's last status and heartbeat, and whether it is alive (heartbeat under 120 s old).",
            "inputSchema": input(json!({}), &[]),
            "outputSchema": {
                "type": "object",
                "properties": {
                    "partner_session": { "type": "string" },
                    "status": { "type": "string" },
                    "last_heartbeat": { "type": ["string", "null"] },
                    "age_seconds": { "type": ["integer", "null"] },
                    "alive": { "type": "boolean" }
                },
                "required": ["partner_session", "status", "alive"]
            }
        }),
        json!({
            "name": "ask_shard",
            "title": "Ask the memory shard",
            "description": "Ask your partner memory shard a question and wait for its cited answer, in one call \
                            (no check_messages loop). Returns the answer, its sources as FILE:START-END lines, the \
                            context version and the time taken. On timeout the question stays queued and the result \
                            names its query_id: check_messages later finds the late answer.",
            "inputSchema": input(json!({
                "question": { "type": "string", "minLength": 1, "maxLength": MAX_QUESTION_CHARS,
                              "description": "The question" },
                "timeout_secs": { "type": "number", "exclusiveMinimum": 0, "maximum": ASK_TIMEOUT_SECS.1,
                                  "description": "How long to wait for the answer (default 60)" }
            }), &["question"]),
            "outputSchema": {
                "type": "object",
                "properties": {
                    "query_id": { "type": "string" },
                    "answer": { "type": "string" },
                    "sources": string_list(),
                    "context_version": { "type": ["string", "null"] },
                    "elapsed_ms": { "type": "number" },
                    "shard_id": { "type": "string" },
                    "llm_type": { "type": "string" },
                    "message_id": { "type": "integer" },
                    "response_id": { "type": "integer" }
                },
                "required": ["query_id", "answer", "sources", "elapsed_ms"]
            }
        }),
        json!({
            "name": "shard_status",
            "title": "Shard status",
            "description": "Your partner shard's queue and health: questions waiting, its heartbeat, and how long ago it last answered.",
            "inputSchema": input(json!({}), &[]),
            "outputSchema": {
                "type": "object",
                "properties": {
                    "partner_session": { "type": "string" },
                    "queue_depth": { "type": "integer" },
                    "claimed": { "type": "integer" },
                    "answered": { "type": "integer" },
                    "dead_lettered": { "type": "integer" },
                    "oldest_unread_age_secs": { "type": ["number", "null"] },
                    "status": { "type": ["string", "null"] },
                    "heartbeat_age_secs": { "type": ["number", "null"] },
                    "alive": { "type": "boolean" },
                    "last_answer_at": { "type": ["string", "null"] },
                    "last_answer_age_secs": { "type": ["number", "null"] },
                    "unread_for_me": { "type": "integer" }
                },
                "required": ["partner_session", "queue_depth", "alive"]
            }
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(negotiate(Some("2024-11-05")), "2024-11-05");
        assert_eq!(negotiate(Some("2025-06-18")), "2025-06-18");
        assert_eq!(negotiate(Some("1999-01-01")), LATEST);
        assert_eq!(negotiate(None), LATEST);
    }

    #[test]
    fn every_tool_is_listed_once_with_schemas() {
        let t = tools();
        let names: Vec<&str> = t.iter().filter_map(|t| t["name"].as_str()).collect();
        assert_eq!(names, TOOL_NAMES);
        for tool in &t {
            assert_eq!(tool["inputSchema"]["type"], "object", "{tool}");
            assert_eq!(tool["outputSchema"]["type"], "object", "{tool}");
        }
        let send = &t[1]["inputSchema"];
        assert_eq!(
            send["required"],
            json!(["conversation_id", "session_id", "token", "message"])
        );
        assert_eq!(send["properties"]["token"]["minLength"], 64);
        assert!(
            t.iter()
                .all(|t| !t["name"].as_str().unwrap_or("").contains("execute"))
        );
    }
}
