#!/usr/bin/env python3
"""Compatibility fixture: the Python MCP bridge server's database operations.

Stands in for the Python server (which needs the `mcp` package and a client)
in autopoll's compatibility tests. It uses the server's exact DDL, connection
settings (fresh connection, WAL, 10 s timeout) and row shapes as described in
docs/bridge-compat (utcnow().isoformat() timestamps, json.dumps metadata,
BEGIN IMMEDIATE read-and-mark). Written for autopoll; no code copied.

Usage:
  python_bridge.py make-fixture DB        build the checked-in fixture file
  python_bridge.py create DB ROLE_A ROLE_B               -> JSON
  python_bridge.py send DB CONV SESSION TOKEN TEXT [ACTION_TYPE] -> JSON
  python_bridge.py check DB CONV SESSION TOKEN           -> JSON list
  python_bridge.py status DB CONV SESSION TOKEN STATUS
  python_bridge.py partner DB CONV SESSION TOKEN         -> JSON
  python_bridge.py schema DB                             -> JSON {table: [[name,type,notnull,dflt,pk],...]}
Exit 3 with "Invalid session token" on a bad or expired token.
"""
import hmac
import json
import secrets
import sqlite3
import sys
from datetime import datetime, timedelta

DDL = [
    """
                CREATE TABLE IF NOT EXISTS conversations (
                    id TEXT PRIMARY KEY,
                    session_a_role TEXT NOT NULL,
                    session_b_role TEXT NOT NULL,
                    session_a_token TEXT NOT NULL,
                    session_b_token TEXT NOT NULL,
                    created_at TEXT NOT NULL,
                    expires_at TEXT NOT NULL
                )
            """,
    """
                CREATE TABLE IF NOT EXISTS messages (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    conversation_id TEXT NOT NULL,
                    from_session TEXT NOT NULL,
                    to_session TEXT NOT NULL,
                    message TEXT NOT NULL,
                    metadata TEXT,
                    timestamp TEXT NOT NULL,
                    read INTEGER DEFAULT 0,
                    FOREIGN KEY (conversation_id) REFERENCES conversations(id)
                )
            """,
    """
                CREATE TABLE IF NOT EXISTS session_status (
                    conversation_id TEXT NOT NULL,
                    session_id TEXT NOT NULL,
                    status TEXT NOT NULL,
                    last_heartbeat TEXT NOT NULL,
                    PRIMARY KEY (conversation_id, session_id)
                )
            """,
    """
                CREATE TABLE IF NOT EXISTS audit_log (
                    id INTEGER PRIMARY KEY AUTOINCREMENT,
                    conversation_id TEXT,
                    session_id TEXT,
                    action TEXT NOT NULL,
                    details TEXT,
                    timestamp TEXT NOT NULL
                )
            """,
]


def connect(db):
    conn = sqlite3.connect(db, timeout=10.0)
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


def init(db):
    conn = connect(db)
    for stmt in DDL:
        conn.execute(stmt)
    conn.commit()
    conn.close()


def audit(db, conv, session, action, details):
    conn = connect(db)
    conn.execute(
        "INSERT INTO audit_log (conversation_id, session_id, action, details, timestamp) VALUES (?, ?, ?, ?, ?)",
        (conv, session, action, json.dumps(details), datetime.utcnow().isoformat()),
    )
    conn.commit()
    conn.close()


def verify(db, conv, session, token):
    conn = connect(db)
    row = conn.execute(
        "SELECT session_a_token, session_b_token, expires_at FROM conversations WHERE id = ?", (conv,)
    ).fetchone()
    conn.close()
    if not row:
        return False
    if datetime.utcnow() > datetime.fromisoformat(row[2]):
        return False
    return hmac.compare_digest(token, row[0] if session == "a" else row[1])


def deny():
    print("Invalid session token", file=sys.stderr)
    sys.exit(3)


def create(db, role_a, role_b, expires_at=None, created_at=None):
    conv = f"conv_{secrets.token_hex(8)}"
    key = secrets.token_bytes(32)
    ta = hmac.new(key, f"{conv}:a:{datetime.utcnow().isoformat()}".encode(), "sha256").hexdigest()
    tb = hmac.new(key, f"{conv}:b:{datetime.utcnow().isoformat()}".encode(), "sha256").hexdigest()
    created = created_at or datetime.utcnow()
    expires = expires_at or (created + timedelta(hours=3))
    conn = connect(db)
    conn.execute(
        "INSERT INTO conversations (id, session_a_role, session_b_role, session_a_token, session_b_token, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (conv, role_a, role_b, ta, tb, created.isoformat(), expires.isoformat()),
    )
    conn.commit()
    conn.close()
    audit(db, conv, None, "create_conversation", {"roles": [role_a, role_b]})
    return {"conversation_id": conv, "session_a_token": ta, "session_b_token": tb, "expires_at": expires.isoformat()}


def send(db, conv, session, token, text, action_type="question", check=True):
    if check and not verify(db, conv, session, token):
        deny()
    meta = {"action_type": action_type, "files_involved": []}
    to = "b" if session == "a" else "a"
    conn = connect(db)
    cur = conn.execute(
        "INSERT INTO messages (conversation_id, from_session, to_session, message, metadata, timestamp) VALUES (?, ?, ?, ?, ?, ?)",
        (conv, session, to, text, json.dumps(meta), datetime.utcnow().isoformat()),
    )
    mid = cur.lastrowid
    conn.commit()
    conn.close()
    audit(db, conv, session, "send_message", {"to": to, "message_length": len(text), "redacted": False})
    return {"status": "sent", "redacted": False, "id": mid}


def check(db, conv, session, token):
    if not verify(db, conv, session, token):
        deny()
    conn = connect(db)
    c = conn.cursor()
    c.execute("BEGIN IMMEDIATE")
    c.execute(
        "SELECT id, from_session, message, metadata, timestamp FROM messages WHERE conversation_id = ? AND to_session = ? AND read = 0 ORDER BY timestamp ASC",
        (conv, session),
    )
    msgs = [
        {"id": r[0], "from": r[1], "message": r[2], "metadata": json.loads(r[3]) if r[3] else {}, "timestamp": r[4]}
        for r in c.fetchall()
    ]
    if msgs:
        ids = [m["id"] for m in msgs]
        c.execute(f"UPDATE messages SET read = 1 WHERE id IN ({','.join('?' * len(ids))})", ids)
    conn.commit()
    conn.close()
    audit(db, conv, session, "get_messages", {"count": len(msgs)})
    return msgs


def status(db, conv, session, token, st):
    if not verify(db, conv, session, token):
        deny()
    conn = connect(db)
    conn.execute(
        "INSERT OR REPLACE INTO session_status (conversation_id, session_id, status, last_heartbeat) VALUES (?, ?, ?, ?)",
        (conv, session, st, datetime.utcnow().isoformat()),
    )
    conn.commit()
    conn.close()


def partner(db, conv, session, token):
    if not verify(db, conv, session, token):
        deny()
    other = "b" if session == "a" else "a"
    conn = connect(db)
    row = conn.execute(
        "SELECT status, last_heartbeat FROM session_status WHERE conversation_id = ? AND session_id = ?", (conv, other)
    ).fetchone()
    conn.close()
    if not row:
        return {"status": "unknown", "alive": False}
    age = (datetime.utcnow() - datetime.fromisoformat(row[1])).total_seconds()
    return {"status": row[0], "last_heartbeat": row[1], "age_seconds": int(age), "alive": age < 120}


def schema(db):
    conn = sqlite3.connect(db)
    out = {}
    for t in ["conversations", "messages", "session_status", "audit_log"]:
        out[t] = [list(r[1:]) for r in conn.execute(f"PRAGMA table_info({t})")]
        out[t + ".fk"] = [list(r[2:5]) for r in conn.execute(f"PRAGMA foreign_key_list({t})")]
    conn.close()
    return out


def make_fixture(db):
    """The checked-in fixture: one live conversation (expiry far ahead, so the
    file stays usable), one expired, messages of every kind, a heartbeat."""
    init(db)
    live = create(db, "coordinator", "memory_shard", expires_at=datetime(2099, 1, 1))
    old = create(db, "old_a", "old_b", created_at=datetime(2025, 11, 20, 20, 38, 12, 123456),
                 expires_at=datetime(2025, 11, 20, 23, 38, 12, 123456))
    c, ta, tb = live["conversation_id"], live["session_a_token"], live["session_b_token"]
    send(db, c, "a", ta, json.dumps({"type": "query", "query_id": "q-1", "question": "What did we decide about the cache?"}))
    send(db, c, "a", ta, "Plain text question about the FIFO design?")
    send(db, c, "a", ta, json.dumps({"type": "info", "text": "fyi"}), "info")
    send(db, c, "b", tb, "hello coordinator", "info")
    status(db, c, "b", tb, "waiting")
    send(db, old["conversation_id"], "a", old["session_a_token"], "from an expired conversation", check=False)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    json.dump({"live": live, "expired": old}, open(db + ".json", "w"), indent=2)


def main(argv):
    cmd, db = argv[1], argv[2]
    if cmd == "make-fixture":
        make_fixture(db)
        return
    init(db)
    if cmd == "create":
        out = create(db, argv[3], argv[4])
    elif cmd == "send":
        out = send(db, argv[3], argv[4], argv[5], argv[6], *(argv[7:8] or ["question"]))
    elif cmd == "check":
        out = check(db, argv[3], argv[4], argv[5])
    elif cmd == "status":
        status(db, argv[3], argv[4], argv[5], argv[6])
        out = {"ok": True}
    elif cmd == "partner":
        out = partner(db, argv[3], argv[4], argv[5])
    elif cmd == "schema":
        out = schema(db)
    else:
        sys.exit(f"unknown command {cmd}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv)
