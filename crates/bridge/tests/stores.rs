//! One test list, two stores: every case here runs on a SQLite file and on
//! a real PostgreSQL database (a private cluster this test process starts,
//! see `autopoll_bridge::pg::cluster`), through the `Store` trait, so
//! neither store can quietly skip a behaviour. PostgreSQL's binaries are
//! required: without them these tests fail with the command that installs
//! them.
#![allow(clippy::unwrap_used)]

use std::collections::HashSet;
use std::time::Duration;

use autopoll_bridge::pg::cluster::Cluster;
use autopoll_bridge::shard::{self, Response};
use autopoll_bridge::{
    Answer, BridgeOptions, ClaimOptions, Claimer, DEFAULT_TTL, Error, NewConversation, Session,
    SessionState, Store, Target,
};

/// A bridge in one store with one conversation.
struct Fx {
    _dir: tempfile::TempDir,
    target: Target,
    store: Box<dyn Store>,
    conv: NewConversation,
}

fn opts() -> BridgeOptions {
    BridgeOptions {
        create: true,
        ..BridgeOptions::default()
    }
}

impl Fx {
    fn sqlite() -> Fx {
        let dir = tempfile::tempdir().unwrap();
        let target = Target::File(dir.path().join("bridge.db"));
        Fx::on(dir, target)
    }

    fn postgres() -> Fx {
        let cluster = cluster();
        let url = cluster.database().unwrap_or_else(|e| panic!("{e}"));
        Fx::on(tempfile::tempdir().unwrap(), Target::Postgres(url))
    }

    fn on(dir: tempfile::TempDir, target: Target) -> Fx {
        let mut store = target.open(opts()).unwrap();
        let conv = store
            .create_conversation("coordinator", "shard", DEFAULT_TTL)
            .unwrap();
        Fx {
            _dir: dir,
            target,
            store,
            conv,
        }
    }

    fn id(&self) -> String {
        self.conv.conversation_id.clone()
    }

    fn ask(&mut self, qid: &str, question: &str) -> i64 {
        let id = self.id();
        let tok = self.conv.session_a_token.clone();
        self.store
            .send(
                &id,
                Session::A,
                &tok,
                &shard::query_text(qid, question),
                None,
            )
            .unwrap()
            .id
    }

    fn another(&self) -> Box<dyn Store> {
        self.target.open(BridgeOptions::default()).unwrap()
    }

    fn responses(&mut self) -> Vec<Response> {
        let id = self.id();
        let tok = self.conv.session_a_token.clone();
        self.store
            .read_unread(&id, Session::A, &tok)
            .unwrap()
            .iter()
            .filter_map(|m| Response::parse(&m.message))
            .collect()
    }
}

/// The test cluster, after scripts/install-test-deps.sh made sure the
/// server binaries are there (panics with why not: no skipping).
fn cluster() -> &'static Cluster {
    static INSTALLED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    INSTALLED.get_or_init(|| {
        if std::env::var_os("AUTOPOLL_TEST_PG").is_some() {
            return;
        }
        let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../scripts/install-test-deps.sh");
        let out = std::process::Command::new(script)
            .arg("postgres")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "installing PostgreSQL failed (these tests need it and do not skip):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
    Cluster::shared().unwrap_or_else(|e| panic!("{e}"))
}

fn claim_opts(limit: usize, lease_ms: u64, max_attempts: u32) -> ClaimOptions {
    ClaimOptions {
        limit,
        lease: Duration::from_millis(lease_ms),
        max_attempts,
    }
}

macro_rules! both_stores {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(#[test] fn $case() { super::$case(super::Fx::sqlite()); })*
        }
        mod postgres {
            $(#[test] fn $case() { super::$case(super::Fx::postgres()); })*
        }
    };
}

both_stores!(
    tokens_are_checked_with_hints,
    send_read_marks_read_and_peek_does_not,
    mark_and_unmark_read,
    claim_is_exclusive_and_complete_answers_once,
    stale_owner_writes_nothing_after_takeover,
    release_keeps_attempts_and_dead_letter_follows,
    skip_marks_read_without_answer,
    repeat_key_keeps_the_first_answer,
    heartbeat_and_partner_status,
    claimable_names_only_queues_with_work,
    concurrent_claimers_never_share_a_message,
    extend_keeps_the_lease_ours,
    renew_and_list_conversations,
    stats_count_each_state,
    prune_keeps_unread_claimed_and_repeat_answers,
);

fn tokens_are_checked_with_hints(mut f: Fx) {
    let id = f.id();
    let (ta, tb) = (
        f.conv.session_a_token.clone(),
        f.conv.session_b_token.clone(),
    );
    f.store.verify(&id, Session::A, &ta).unwrap();
    f.store.verify(&id, Session::B, &tb).unwrap();
    let e = f.store.verify(&id, Session::B, &ta).unwrap_err();
    assert!(
        matches!(&e, Error::InvalidToken { .. }) && e.to_string().contains("session a's token"),
        "{e}"
    );
    let e = f.store.verify("nope", Session::A, &ta).unwrap_err();
    assert!(matches!(e, Error::NotFound { .. }), "{e}");
}

fn send_read_marks_read_and_peek_does_not(mut f: Fx) {
    let id = f.id();
    let tb = f.conv.session_b_token.clone();
    let q1 = f.ask("q-1", "first?");
    let q2 = f.ask("q-2", "second?");
    let peek = f.store.peek_unread(&id, Session::B, 0, 10).unwrap();
    assert_eq!(peek.iter().map(|m| m.id).collect::<Vec<_>>(), vec![q1, q2]);
    assert!(peek.iter().all(|m| !m.read));
    assert_eq!(peek[0].metadata["action_type"], "info");
    assert!(!peek[0].timestamp.is_empty() && !peek[0].timestamp.ends_with('Z'));
    let got = f.store.read_unread(&id, Session::B, &tb).unwrap();
    assert_eq!(got.iter().map(|m| m.id).collect::<Vec<_>>(), vec![q1, q2]);
    assert!(got.iter().all(|m| m.read));
    assert!(
        f.store
            .read_unread(&id, Session::B, &tb)
            .unwrap()
            .is_empty()
    );
    assert!(f.store.message(q1).unwrap().read);
    // A secret in a message is redacted on the way in.
    let ta = f.conv.session_a_token.clone();
    let sent = f
        .store
        .send(
            &id,
            Session::A,
            &ta,
            "key sk-ant-api03-abcdefghijklmnopqrstuvwxyz0123",
            None,
        )
        .unwrap();
    assert!(sent.redacted);
    assert!(
        !f.store
            .message(sent.id)
            .unwrap()
            .message
            .contains("abcdefghijkl")
    );
}

fn mark_and_unmark_read(mut f: Fx) {
    let id = f.id();
    let tb = f.conv.session_b_token.clone();
    let q = f.ask("q-1", "x?");
    assert_eq!(f.store.mark_read(&id, Session::B, &tb, &[q]).unwrap(), 1);
    assert_eq!(f.store.mark_read(&id, Session::B, &tb, &[q]).unwrap(), 0);
    assert_eq!(f.store.unmark_read(&id, Session::B, &tb, &[q]).unwrap(), 1);
    assert!(!f.store.message(q).unwrap().read);
    // The other session's token does not mark b's messages.
    let ta = f.conv.session_a_token.clone();
    assert!(f.store.mark_read(&id, Session::B, &ta, &[q]).is_err());
}

fn claim_is_exclusive_and_complete_answers_once(mut f: Fx) {
    let id = f.id();
    let q = f.ask("q-1", "what?");
    let me = Claimer::new("shard-1").unwrap();
    let other = Claimer::new("shard-2").unwrap();
    let b = f
        .store
        .claim(&me, &id, Session::B, &claim_opts(10, 30_000, 3))
        .unwrap();
    assert_eq!(b.claimed.len(), 1);
    assert_eq!((b.claimed[0].message.id, b.claimed[0].attempts), (q, 1));
    let mut second = f.another();
    assert!(
        second
            .claim(&other, &id, Session::B, &claim_opts(10, 30_000, 3))
            .unwrap()
            .claimed
            .is_empty()
    );
    assert_eq!(f.store.held_by(&me).unwrap(), vec![q]);
    let text = Response {
        query_id: "q-1".into(),
        ..Response::failure("q-1", "shard-1", "x", 1)
    }
    .to_text();
    let r = f
        .store
        .complete(&me, &[Answer::new(q, text.clone())])
        .unwrap();
    let rid = r[0].expect("answered");
    assert!(f.store.message(q).unwrap().read);
    assert_eq!(f.store.message(rid).unwrap().message, text);
    assert_eq!(
        f.store.message(rid).unwrap().metadata["action_type"],
        "response"
    );
    let (outcome, resp, attempts) = f.store.outcome(q).unwrap().unwrap();
    assert_eq!(
        (outcome.as_str(), resp, attempts),
        ("answered", Some(rid), 1)
    );
    // Completing again writes nothing.
    assert_eq!(
        f.store.complete(&me, &[Answer::new(q, "again")]).unwrap(),
        vec![None]
    );
    assert_eq!(f.responses().len(), 1);
    assert!(f.store.held_by(&me).unwrap().is_empty());
}

fn stale_owner_writes_nothing_after_takeover(mut f: Fx) {
    let id = f.id();
    let q = f.ask("q-1", "what?");
    let slow = Claimer::new("slow").unwrap();
    let fast = Claimer::new("fast").unwrap();
    assert_eq!(
        f.store
            .claim(&slow, &id, Session::B, &claim_opts(1, 1, 5))
            .unwrap()
            .claimed
            .len(),
        1
    );
    std::thread::sleep(Duration::from_millis(20));
    let mut other = f.another();
    let b = other
        .claim(&fast, &id, Session::B, &claim_opts(1, 30_000, 5))
        .unwrap();
    assert_eq!((b.claimed.len(), b.claimed[0].attempts), (1, 2));
    assert_eq!(
        f.store.complete(&slow, &[Answer::new(q, "late")]).unwrap(),
        vec![None]
    );
    assert_eq!(
        f.store
            .extend(&slow, &[q], Duration::from_secs(60))
            .unwrap(),
        0
    );
    assert_eq!(f.store.release(&slow, &[q], Some("x"), false).unwrap(), 0);
    assert!(!f.store.message(q).unwrap().read);
    let r = other.complete(&fast, &[Answer::new(q, "on time")]).unwrap();
    assert!(r[0].is_some());
    let texts: Vec<String> = {
        let aid = f.id();
        let ta = f.conv.session_a_token.clone();
        f.store
            .read_unread(&aid, Session::A, &ta)
            .unwrap()
            .into_iter()
            .map(|m| m.message)
            .collect()
    };
    assert_eq!(texts, vec!["on time".to_string()]);
}

fn release_keeps_attempts_and_dead_letter_follows(mut f: Fx) {
    let id = f.id();
    let q = f.ask("q-7", "hard?");
    let me = Claimer::new("shard-1").unwrap();
    let o = claim_opts(5, 30_000, 2);
    for attempt in 1..=2 {
        let b = f.store.claim(&me, &id, Session::B, &o).unwrap();
        assert_eq!(b.claimed[0].attempts, attempt);
        assert_eq!(
            f.store
                .release(&me, &[q], Some("engine timed out"), false)
                .unwrap(),
            1
        );
    }
    // A refunded attempt does not count.
    let b = f
        .store
        .claim(&me, &id, Session::B, &claim_opts(5, 30_000, 3))
        .unwrap();
    assert_eq!(b.claimed[0].attempts, 3);
    f.store.release(&me, &[q], None, true).unwrap();
    let b = f.store.claim(&me, &id, Session::B, &o).unwrap();
    assert!(b.claimed.is_empty());
    assert_eq!(b.dead_lettered.len(), 1);
    let d = &b.dead_lettered[0];
    assert_eq!((d.message_id, d.query_id.as_str()), (q, "q-7"));
    assert_eq!(d.last_error.as_deref(), Some("engine timed out"));
    assert!(f.store.message(q).unwrap().read);
    let rs = f.responses();
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].query_id, "q-7");
    assert!(
        rs[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("engine timed out"),
        "{:?}",
        rs[0]
    );
    assert_eq!(f.store.outcome(q).unwrap().unwrap().0, "dead_letter");
    // dead_letter() of a held message answers it with the error now.
    let q2 = f.ask("q-8", "bad?");
    f.store.claim(&me, &id, Session::B, &o).unwrap();
    let d = f
        .store
        .dead_letter(&me, q2, "question too long")
        .unwrap()
        .unwrap();
    assert_eq!(d.query_id, "q-8");
    assert!(f.store.dead_letter(&me, q2, "again").unwrap().is_none());
}

fn skip_marks_read_without_answer(mut f: Fx) {
    let id = f.id();
    let ta = f.conv.session_a_token.clone();
    let m = f
        .store
        .send(&id, Session::A, &ta, "just saying hello", None)
        .unwrap()
        .id;
    let me = Claimer::new("shard-1").unwrap();
    f.store
        .claim(&me, &id, Session::B, &claim_opts(5, 30_000, 3))
        .unwrap();
    assert_eq!(f.store.skip(&me, &[m], "not a query").unwrap(), 1);
    assert!(f.store.message(m).unwrap().read);
    assert_eq!(f.store.outcome(m).unwrap().unwrap().0, "skipped");
    assert!(f.responses().is_empty());
}

fn repeat_key_keeps_the_first_answer(mut f: Fx) {
    let id = f.id();
    let q = f.ask("q-r", "once?");
    let me = Claimer::new("shard-1").unwrap();
    f.store
        .claim(&me, &id, Session::B, &claim_opts(5, 30_000, 3))
        .unwrap();
    let mut a = Answer::new(q, "the first answer");
    a.repeat_key = Some("q-r".into());
    f.store.complete(&me, &[a]).unwrap();
    let (mid, text) = f
        .store
        .earlier_answer(&id, Session::B, "q-r")
        .unwrap()
        .unwrap();
    assert_eq!((mid, text.as_str()), (q, "the first answer"));
    assert!(
        f.store
            .earlier_answer(&id, Session::B, "q-x")
            .unwrap()
            .is_none()
    );
}

fn heartbeat_and_partner_status(mut f: Fx) {
    let id = f.id();
    let (ta, tb) = (
        f.conv.session_a_token.clone(),
        f.conv.session_b_token.clone(),
    );
    let p = f.store.partner_status(&id, Session::A, &ta).unwrap();
    assert_eq!((p.status.as_str(), p.alive), ("unknown", false));
    f.store
        .heartbeat(&id, Session::B, &tb, SessionState::Waiting)
        .unwrap();
    let p = f.store.partner_status(&id, Session::A, &ta).unwrap();
    assert_eq!((p.status.as_str(), p.alive), ("waiting", true));
    assert_eq!(p.age_seconds, Some(0));
    assert!(matches!(
        f.store
            .heartbeat(&id, Session::B, &ta, SessionState::Working),
        Err(Error::InvalidToken { .. })
    ));
    f.store
        .update_status(&id, Session::B, &tb, SessionState::Stopped)
        .unwrap();
    let s = f.store.session_status(&id, Session::B).unwrap().unwrap();
    assert_eq!((s.status.as_str(), s.alive), ("stopped", false));
}

fn claimable_names_only_queues_with_work(mut f: Fx) {
    let id = f.id();
    let mut second = f
        .store
        .create_conversation("c2", "s2", DEFAULT_TTL)
        .unwrap();
    let id2 = std::mem::take(&mut second.conversation_id);
    assert!(
        f.store
            .claimable(&[&id, &id2], Session::B)
            .unwrap()
            .is_empty()
    );
    f.ask("q-1", "x?");
    assert_eq!(
        f.store.claimable(&[&id2, &id], Session::B).unwrap(),
        vec![id.clone()]
    );
    let me = Claimer::new("shard-1").unwrap();
    f.store
        .claim(&me, &id, Session::B, &claim_opts(5, 30_000, 3))
        .unwrap();
    assert!(f.store.claimable(&[&id], Session::B).unwrap().is_empty());
}

fn concurrent_claimers_never_share_a_message(mut f: Fx) {
    let id = f.id();
    let n = 120;
    let mut asked = HashSet::new();
    for i in 0..n {
        asked.insert(f.ask(&format!("q-{i}"), "which?"));
    }
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let target = f.target.clone();
            let id = id.clone();
            std::thread::spawn(move || {
                let mut s = target.open(BridgeOptions::default()).unwrap();
                let me = Claimer::new(&format!("w{w}")).unwrap();
                let mut got = Vec::new();
                loop {
                    let b = match s.claim(&me, &id, Session::B, &claim_opts(7, 60_000, 3)) {
                        Ok(b) => b,
                        Err(e) if e.is_transient() => continue,
                        Err(e) => panic!("{e}"),
                    };
                    if b.claimed.is_empty() {
                        if s.claimable(&[&id], Session::B).unwrap().is_empty() {
                            return got;
                        }
                        continue;
                    }
                    let answers: Vec<Answer> = b
                        .claimed
                        .iter()
                        .map(|c| Answer::new(c.message.id, format!("a{}", c.message.id)))
                        .collect();
                    let r = s.complete(&me, &answers).unwrap();
                    assert!(r.iter().all(Option::is_some));
                    got.extend(b.claimed.iter().map(|c| c.message.id));
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.join().unwrap());
    }
    let unique: HashSet<i64> = all.iter().copied().collect();
    assert_eq!(all.len(), unique.len(), "a message was claimed twice");
    assert_eq!(unique, asked);
    let ta = f.conv.session_a_token.clone();
    let answers = f.store.read_unread(&id, Session::A, &ta).unwrap();
    assert_eq!(answers.len(), n, "one answer per question");
}

fn extend_keeps_the_lease_ours(mut f: Fx) {
    let id = f.id();
    let q = f.ask("q-1", "slow?");
    let me = Claimer::new("me").unwrap();
    let thief = Claimer::new("thief").unwrap();
    f.store
        .claim(&me, &id, Session::B, &claim_opts(1, 300, 3))
        .unwrap();
    assert_eq!(
        f.store.extend(&me, &[q], Duration::from_secs(60)).unwrap(),
        1
    );
    std::thread::sleep(Duration::from_millis(400));
    let mut other = f.another();
    assert!(
        other
            .claim(&thief, &id, Session::B, &claim_opts(1, 30_000, 3))
            .unwrap()
            .claimed
            .is_empty()
    );
    assert_eq!(f.store.release_all(&me, Some("stopping")).unwrap(), 1);
    assert_eq!(
        other
            .claim(&thief, &id, Session::B, &claim_opts(1, 30_000, 3))
            .unwrap()
            .claimed
            .len(),
        1
    );
}

fn renew_and_list_conversations(mut f: Fx) {
    let id = f.id();
    let ta = f.conv.session_a_token.clone();
    let before = f.store.conversation(&id).unwrap().expires_at;
    std::thread::sleep(Duration::from_millis(5));
    let after = f.store.renew(&id, &ta, DEFAULT_TTL).unwrap();
    assert!(after > before, "{after} <= {before}");
    assert!(
        f.store
            .renew(&id, "0".repeat(64).as_str(), DEFAULT_TTL)
            .is_err()
    );
    let list = f.store.list_conversations().unwrap();
    assert!(list.iter().any(|c| c.id == id && !c.expired));
    assert_eq!(f.store.conversation(&id).unwrap().session_b_role, "shard");
}

fn stats_count_each_state(mut f: Fx) {
    let id = f.id();
    let ids: Vec<i64> = (0..5).map(|i| f.ask(&format!("q-{i}"), "x?")).collect();
    let me = Claimer::new("s").unwrap();
    f.store
        .claim(&me, &id, Session::B, &claim_opts(3, 30_000, 3))
        .unwrap();
    f.store.complete(&me, &[Answer::new(ids[0], "a")]).unwrap();
    f.store.dead_letter(&me, ids[1], "bad").unwrap();
    let tb = f.conv.session_b_token.clone();
    f.store
        .heartbeat(&id, Session::B, &tb, SessionState::Working)
        .unwrap();
    let st = f.store.stats(Some(&id)).unwrap();
    assert_eq!(st.len(), 2);
    let b = st.iter().find(|s| s.session == "b").unwrap();
    assert_eq!(
        (b.unread, b.claimed, b.answered, b.dead_lettered, b.skipped),
        (3, 1, 1, 1, 0)
    );
    assert_eq!(
        (b.role.as_str(), b.status.as_deref(), b.alive),
        ("shard", Some("working"), true)
    );
    assert!(b.oldest_unread_age_secs.is_some());
    let dl = f.store.unseen_dead_letters(&id, Session::B).unwrap();
    assert_eq!(dl.len(), 1);
    assert_eq!((dl[0].message_id, dl[0].query_id.as_str()), (ids[1], "q-1"));
    // PostgreSQL keeps the heartbeat's host; a SQLite bridge is on one host.
    match f.target {
        Target::Postgres(_) => assert!(b.host.as_deref().is_some_and(|h| !h.is_empty())),
        Target::File(_) => assert_eq!(b.host, None),
    }
}

fn prune_keeps_unread_claimed_and_repeat_answers(mut f: Fx) {
    let id = f.id();
    let tb = f.conv.session_b_token.clone();
    let me = Claimer::new("p").unwrap();
    // Answered (question and response both read afterwards).
    let done = f.ask("q-done", "x?");
    f.store
        .claim(&me, &id, Session::B, &claim_opts(1, 30_000, 3))
        .unwrap();
    f.store
        .complete(&me, &[Answer::new(done, "answer")])
        .unwrap();
    let done_response = f.responses();
    assert_eq!(
        done_response.len(),
        0,
        "the plain answer text is not a Response"
    );
    // In flight: claimed, then read by hand while the claim is live.
    let busy = f.ask("q-busy", "y?");
    f.store
        .claim(&me, &id, Session::B, &claim_opts(1, 60_000, 3))
        .unwrap();
    f.store.mark_read(&id, Session::B, &tb, &[busy]).unwrap();
    // Never looked at.
    let unread = f.ask("q-unread", "z?");
    std::thread::sleep(Duration::from_millis(20));
    let dry = f.store.prune_dry_run(Duration::ZERO).unwrap();
    assert!(dry.dry_run);
    let r = f.store.prune(Duration::ZERO, 2).unwrap();
    assert_eq!(
        r.messages, dry.messages,
        "the dry run counted what the prune removed"
    );
    // The answered question and its read response went; the others stayed.
    assert!(r.messages >= 2, "{r:?}");
    assert_eq!(r.kept_live_claim, 1, "{r:?}");
    assert!(r.audit_rows > 0, "{r:?}");
    assert!(f.store.message(done).is_err());
    assert!(
        f.store.message(busy).is_ok(),
        "a message under a live claim was pruned"
    );
    assert!(!f.store.message(unread).unwrap().read);
    assert!(f.store.held_by(&me).unwrap().contains(&busy));
    // The claim in flight still completes.
    assert!(f.store.complete(&me, &[Answer::new(busy, "late")]).unwrap()[0].is_some());
    f.store.compact(false).unwrap();
    assert!(f.store.file_size().unwrap().bytes > 0);
}
