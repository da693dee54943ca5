//! The store layer: one trait, [`Store`], over the two databases a bridge
//! can live in, and [`Target`], what a `--db` value names.
//!
//! - SQLite ([`Bridge`]): a file on one host, byte-compatible with the
//!   Python MCP bridge server. The default.
//! - PostgreSQL ([`crate::pg::PgBridge`]): `postgres://` or
//!   `postgresql://` URLs, for agents and shards on several hosts.
//!
//! What must hold on both (a claim is a lease with an owner token; an
//! answer, the read flag and the claim's end commit together, only while
//! the caller still owns the claim; response texts and error answers are
//! the same) lives above the trait, in the shared types ([`crate::shard`],
//! [`crate::Claimer`], [`crate::ClaimBatch`]) and pure checks that both
//! stores call; each store is its SQL and its connection handling.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use crate::{
    Answer, Bridge, BridgeOptions, ClaimBatch, ClaimOptions, Claimer, CompactReport,
    ConversationInfo, DeadLettered, FileSize, Message, NewConversation, PartnerStatus, PruneReport,
    Pruner, Result, Sent, Session, SessionState, SessionStats, SessionStatus, UnseenDeadLetter,
};

/// Where a bridge lives, from a `--db` value.
#[derive(Clone, PartialEq, Eq)]
pub enum Target {
    /// A SQLite file.
    File(PathBuf),
    /// A PostgreSQL connection URL (`postgres://` or `postgresql://`).
    Postgres(String),
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.shown())
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown())
    }
}

impl Target {
    /// Read a `--db` value: a `postgres://` or `postgresql://` URL is
    /// PostgreSQL, anything else is a file path.
    pub fn parse(s: &str) -> Target {
        if is_postgres_url(s) {
            Target::Postgres(s.to_string())
        } else {
            Target::File(PathBuf::from(s))
        }
    }

    /// From a path argument that may hold a URL (clap gives paths).
    pub fn from_path(p: &Path) -> Target {
        match p.to_str() {
            Some(s) => Target::parse(s),
            None => Target::File(p.to_path_buf()),
        }
    }

    /// The file, for a SQLite target.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Target::File(p) => Some(p),
            Target::Postgres(_) => None,
        }
    }

    /// For messages and logs: the path, or the URL with any password
    /// replaced by `***`.
    pub fn shown(&self) -> String {
        match self {
            Target::File(p) => p.display().to_string(),
            Target::Postgres(url) => crate::pg::redact_url(url),
        }
    }

    /// Open the bridge this names.
    pub fn open(&self, opts: BridgeOptions) -> Result<Box<dyn Store>> {
        Ok(match self {
            Target::File(p) => Box::new(Bridge::open_with(p, opts)?),
            Target::Postgres(url) => Box::new(crate::pg::PgBridge::connect(url, opts)?),
        })
    }
}

/// True for the URL schemes PostgreSQL's own clients take.
pub fn is_postgres_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// Which database a [`Store`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL database.
    Postgres,
}

/// One connection to a bridge, whichever database holds it. Every method
/// is one transaction (or one read); see the SQLite [`Bridge`]'s methods of
/// the same names for what each does.
pub trait Store: Send {
    /// Which database this is.
    fn kind(&self) -> StoreKind;
    /// Where it is, for messages and logs (passwords hidden).
    fn location(&self) -> String;
    /// The options it was opened with.
    fn options(&self) -> &BridgeOptions;
    /// A counter that moves whenever another connection commits, where the
    /// store has one cheaply (SQLite's `PRAGMA data_version`); `None` on
    /// PostgreSQL, whose wake-ups come from `LISTEN` instead.
    fn data_version(&mut self) -> Result<Option<i64>>;
    /// The SQLite bridge, for what only a file has (journal mode, WAL).
    fn as_sqlite(&mut self) -> Option<&mut Bridge> {
        None
    }
    /// The PostgreSQL bridge, for what only it has (privileges, clock skew).
    fn as_postgres(&mut self) -> Option<&mut crate::pg::PgBridge> {
        None
    }
    /// The SQLite bridge by value, for what only a file has (WAL checkpoints).
    fn into_sqlite(self: Box<Self>) -> Option<Bridge> {
        None
    }

    /// [`Bridge::create_conversation`].
    fn create_conversation(
        &mut self,
        role_a: &str,
        role_b: &str,
        ttl: Duration,
    ) -> Result<NewConversation>;
    /// [`Bridge::verify`].
    fn verify(&mut self, conversation: &str, session: Session, token: &str) -> Result<()>;
    /// [`Bridge::renew`].
    fn renew(&mut self, conversation: &str, token: &str, ttl: Duration) -> Result<String>;
    /// [`Bridge::list_conversations`].
    fn list_conversations(&mut self) -> Result<Vec<ConversationInfo>>;
    /// [`Bridge::conversation`].
    fn conversation(&mut self, conversation: &str) -> Result<ConversationInfo>;

    /// [`Bridge::send`].
    fn send(
        &mut self,
        conversation: &str,
        from: Session,
        token: &str,
        text: &str,
        metadata: Option<&Value>,
    ) -> Result<Sent>;
    /// [`Bridge::read_unread`].
    fn read_unread(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
    ) -> Result<Vec<Message>>;
    /// [`Bridge::peek_unread`].
    fn peek_unread(
        &mut self,
        conversation: &str,
        session: Session,
        after_id: i64,
        limit: usize,
    ) -> Result<Vec<Message>>;
    /// [`Bridge::mark_read`].
    fn mark_read(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
        ids: &[i64],
    ) -> Result<usize>;
    /// [`Bridge::unmark_read`].
    fn unmark_read(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
        ids: &[i64],
    ) -> Result<usize>;
    /// [`Bridge::message`].
    fn message(&mut self, id: i64) -> Result<Message>;

    /// [`Bridge::claim`].
    fn claim(
        &mut self,
        claimer: &Claimer,
        conversation: &str,
        session: Session,
        opts: &ClaimOptions,
    ) -> Result<ClaimBatch> {
        let mut v = self.claim_many(claimer, &[(conversation, opts.limit)], session, opts)?;
        Ok(v.pop().unwrap_or_default())
    }
    /// [`Bridge::claim_many`].
    fn claim_many(
        &mut self,
        claimer: &Claimer,
        wanted: &[(&str, usize)],
        session: Session,
        opts: &ClaimOptions,
    ) -> Result<Vec<ClaimBatch>>;
    /// [`Bridge::claimable`].
    fn claimable(&mut self, conversations: &[&str], session: Session) -> Result<Vec<String>>;
    /// [`Bridge::extend`].
    fn extend(&mut self, claimer: &Claimer, ids: &[i64], lease: Duration) -> Result<usize>;
    /// [`Bridge::release`].
    fn release(
        &mut self,
        claimer: &Claimer,
        ids: &[i64],
        error: Option<&str>,
        refund_attempt: bool,
    ) -> Result<usize>;
    /// [`Bridge::release_all`].
    fn release_all(&mut self, claimer: &Claimer, error: Option<&str>) -> Result<usize> {
        let ids = self.held_by(claimer)?;
        self.release(claimer, &ids, error, false)
    }
    /// [`Bridge::held_by`].
    fn held_by(&mut self, claimer: &Claimer) -> Result<Vec<i64>>;
    /// [`Bridge::complete`].
    fn complete(&mut self, claimer: &Claimer, answers: &[Answer]) -> Result<Vec<Option<i64>>>;
    /// [`Bridge::skip`].
    fn skip(&mut self, claimer: &Claimer, ids: &[i64], reason: &str) -> Result<usize>;
    /// [`Bridge::dead_letter`].
    fn dead_letter(
        &mut self,
        claimer: &Claimer,
        message_id: i64,
        error: &str,
    ) -> Result<Option<DeadLettered>>;
    /// [`Bridge::earlier_answer`].
    fn earlier_answer(
        &mut self,
        conversation: &str,
        session: Session,
        repeat_key: &str,
    ) -> Result<Option<(i64, String)>>;
    /// [`Store::earlier_answer`] for several repeat keys at once: those
    /// found, by key ([`Bridge::earlier_answers`]: one statement; the
    /// default asks key by key).
    fn earlier_answers(
        &mut self,
        conversation: &str,
        session: Session,
        keys: &[&str],
    ) -> Result<std::collections::HashMap<String, (i64, String)>> {
        let mut found = std::collections::HashMap::new();
        for k in keys {
            if let Some(a) = self.earlier_answer(conversation, session, k)? {
                found.insert((*k).to_string(), a);
            }
        }
        Ok(found)
    }
    /// [`Bridge::outcome`].
    fn outcome(&mut self, message_id: i64) -> Result<Option<(String, Option<i64>, u32)>>;

    /// [`Bridge::heartbeat`].
    fn heartbeat(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
        state: SessionState,
    ) -> Result<()>;
    /// [`Bridge::update_status`].
    fn update_status(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
        state: SessionState,
    ) -> Result<String>;
    /// [`Bridge::session_status`].
    fn session_status(
        &mut self,
        conversation: &str,
        session: Session,
    ) -> Result<Option<SessionStatus>>;
    /// [`Bridge::partner_status`].
    fn partner_status(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
    ) -> Result<PartnerStatus> {
        self.verify(conversation, session, token)?;
        Ok(crate::status::partner_of(
            self.session_status(conversation, session.other())?,
        ))
    }
    /// [`Bridge::last_response_at`].
    fn last_response_at(&mut self, conversation: &str, from: Session) -> Result<Option<String>>;
    /// [`Bridge::stats`].
    fn stats(&mut self, conversation: Option<&str>) -> Result<Vec<SessionStats>>;
    /// [`Bridge::unseen_dead_letters`].
    fn unseen_dead_letters(
        &mut self,
        conversation: &str,
        session: Session,
    ) -> Result<Vec<UnseenDeadLetter>>;
    /// [`Bridge::prune_step`]: one step (one short transaction) of a pass.
    fn prune_step(&mut self, pruner: &mut Pruner) -> Result<bool>;
    /// [`Bridge::prune`]: a whole pass.
    fn prune(&mut self, older_than: Duration, batch: usize) -> Result<PruneReport> {
        let mut p = Pruner::new(older_than, batch, false);
        while !self.prune_step(&mut p)? {}
        Ok(p.report().clone())
    }
    /// What [`Store::prune`] would remove now, writing nothing.
    fn prune_dry_run(&mut self, older_than: Duration) -> Result<PruneReport>;
    /// [`Bridge::compact`]: give freed space back after a prune.
    fn compact(&mut self, full: bool) -> Result<CompactReport>;
    /// [`Bridge::file_size`]: bytes the bridge takes on disk.
    fn file_size(&mut self) -> Result<FileSize>;
    /// The host of the last heartbeat of `session`, where the store keeps
    /// it (PostgreSQL; a SQLite bridge is on one host and keeps none).
    fn heartbeat_host(&mut self, conversation: &str, session: Session) -> Result<Option<String>> {
        let _ = (conversation, session);
        Ok(None)
    }
}

macro_rules! delegate {
    ($($name:ident(&mut self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        $(fn $name(&mut self $(, $arg: $ty)*) -> $ret { Bridge::$name(self $(, $arg)*) })*
    };
}

impl Store for Bridge {
    fn kind(&self) -> StoreKind {
        StoreKind::Sqlite
    }
    fn location(&self) -> String {
        self.path().display().to_string()
    }
    fn options(&self) -> &BridgeOptions {
        Bridge::options(self)
    }
    fn data_version(&mut self) -> Result<Option<i64>> {
        Bridge::data_version(self).map(Some)
    }
    fn as_sqlite(&mut self) -> Option<&mut Bridge> {
        Some(self)
    }
    fn into_sqlite(self: Box<Self>) -> Option<Bridge> {
        Some(*self)
    }
    fn claim(
        &mut self,
        claimer: &Claimer,
        conversation: &str,
        session: Session,
        opts: &ClaimOptions,
    ) -> Result<ClaimBatch> {
        Bridge::claim(self, claimer, conversation, session, opts)
    }
    fn release_all(&mut self, claimer: &Claimer, error: Option<&str>) -> Result<usize> {
        Bridge::release_all(self, claimer, error)
    }
    fn prune(&mut self, older_than: Duration, batch: usize) -> Result<PruneReport> {
        Bridge::prune(self, older_than, batch)
    }
    fn prune_dry_run(&mut self, older_than: Duration) -> Result<PruneReport> {
        crate::prune::dry_run(self.path(), older_than)
    }
    fn file_size(&mut self) -> Result<FileSize> {
        Bridge::file_size(self)
    }
    fn partner_status(
        &mut self,
        conversation: &str,
        session: Session,
        token: &str,
    ) -> Result<PartnerStatus> {
        Bridge::partner_status(self, conversation, session, token)
    }
    delegate! {
        create_conversation(&mut self, role_a: &str, role_b: &str, ttl: Duration) -> Result<NewConversation>;
        verify(&mut self, conversation: &str, session: Session, token: &str) -> Result<()>;
        renew(&mut self, conversation: &str, token: &str, ttl: Duration) -> Result<String>;
        list_conversations(&mut self) -> Result<Vec<ConversationInfo>>;
        conversation(&mut self, conversation: &str) -> Result<ConversationInfo>;
        send(&mut self, conversation: &str, from: Session, token: &str, text: &str, metadata: Option<&Value>) -> Result<Sent>;
        read_unread(&mut self, conversation: &str, session: Session, token: &str) -> Result<Vec<Message>>;
        peek_unread(&mut self, conversation: &str, session: Session, after_id: i64, limit: usize) -> Result<Vec<Message>>;
        mark_read(&mut self, conversation: &str, session: Session, token: &str, ids: &[i64]) -> Result<usize>;
        unmark_read(&mut self, conversation: &str, session: Session, token: &str, ids: &[i64]) -> Result<usize>;
        message(&mut self, id: i64) -> Result<Message>;
        claim_many(&mut self, claimer: &Claimer, wanted: &[(&str, usize)], session: Session, opts: &ClaimOptions) -> Result<Vec<ClaimBatch>>;
        claimable(&mut self, conversations: &[&str], session: Session) -> Result<Vec<String>>;
        extend(&mut self, claimer: &Claimer, ids: &[i64], lease: Duration) -> Result<usize>;
        release(&mut self, claimer: &Claimer, ids: &[i64], error: Option<&str>, refund_attempt: bool) -> Result<usize>;
        held_by(&mut self, claimer: &Claimer) -> Result<Vec<i64>>;
        complete(&mut self, claimer: &Claimer, answers: &[Answer]) -> Result<Vec<Option<i64>>>;
        skip(&mut self, claimer: &Claimer, ids: &[i64], reason: &str) -> Result<usize>;
        dead_letter(&mut self, claimer: &Claimer, message_id: i64, error: &str) -> Result<Option<DeadLettered>>;
        earlier_answer(&mut self, conversation: &str, session: Session, repeat_key: &str) -> Result<Option<(i64, String)>>;
        earlier_answers(&mut self, conversation: &str, session: Session, keys: &[&str]) -> Result<std::collections::HashMap<String, (i64, String)>>;
        outcome(&mut self, message_id: i64) -> Result<Option<(String, Option<i64>, u32)>>;
        heartbeat(&mut self, conversation: &str, session: Session, token: &str, state: SessionState) -> Result<()>;
        update_status(&mut self, conversation: &str, session: Session, token: &str, state: SessionState) -> Result<String>;
        session_status(&mut self, conversation: &str, session: Session) -> Result<Option<SessionStatus>>;
        stats(&mut self, conversation: Option<&str>) -> Result<Vec<SessionStats>>;
        last_response_at(&mut self, conversation: &str, from: Session) -> Result<Option<String>>;
        unseen_dead_letters(&mut self, conversation: &str, session: Session) -> Result<Vec<UnseenDeadLetter>>;
        prune_step(&mut self, pruner: &mut Pruner) -> Result<bool>;
        compact(&mut self, full: bool) -> Result<CompactReport>;
    }
}
