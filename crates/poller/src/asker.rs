//! Asker threads: each keeps one connection to the server and asks the
//! questions the main loop hands it, one at a time, reconnecting after any
//! failure. Results go back on the main loop's event channel.

use std::time::Duration;

use autopoll_protocol::{Answer, Client, ClientError, ClientOptions, ServerPaths};
use crossbeam_channel::{Receiver, Sender};

use crate::Event;

/// A question for an asker.
pub struct AskJob {
    /// The bridge connection it was claimed on (handed back in the result).
    pub generation: u64,
    /// The bridge message it came from.
    pub message_id: i64,
    /// The question text.
    pub question: String,
    /// The server's deadline for it.
    pub server_timeout: Duration,
}

/// What an asker got.
pub struct AskResult {
    /// The job's [`AskJob::generation`].
    pub generation: u64,
    /// The bridge message.
    pub message_id: i64,
    /// The answer, or why not.
    pub outcome: Result<Answer, ClientError>,
}

/// Extra time we wait beyond the server's deadline before calling the server silent.
const MARGIN: Duration = Duration::from_secs(2);

fn ask(
    client: &mut Option<Client>,
    paths: &ServerPaths,
    opts: &ClientOptions,
    job: &AskJob,
) -> Result<Answer, ClientError> {
    let c = match client.as_mut() {
        Some(c) => c,
        None => client.insert(Client::connect(paths, opts)?),
    };
    let id = c.send_ask(&job.question, job.server_timeout)?;
    crate::fault::point("after_send");
    c.wait_answer(id, job.server_timeout + MARGIN)
}

/// Run one asker until `jobs` closes.
pub fn run(
    jobs: Receiver<AskJob>,
    events: Sender<Event>,
    paths: ServerPaths,
    connect_timeout: Duration,
) {
    let opts = ClientOptions {
        connect_timeout,
        client_name: "autopoll-poller".into(),
        ..ClientOptions::default()
    };
    let mut client: Option<Client> = None;
    for job in jobs.iter() {
        let mut outcome = ask(&mut client, &paths, &opts, &job);
        // A connection that sat idle may belong to a server that has since
        // been restarted: the request could not even be delivered. One fresh
        // try before calling the server down. (A server that died after
        // taking the request is `Lost`, and is not asked again here.)
        if let Err(ClientError::ServerGone) = &outcome {
            client = None;
            outcome = ask(&mut client, &paths, &opts, &job);
        }
        // After anything but a clean reply (or an error reply, which leaves
        // the session intact), start over with a fresh connection.
        if matches!(&outcome, Err(e) if !matches!(e, ClientError::Server(_))) {
            client = None;
        }
        let r = AskResult {
            generation: job.generation,
            message_id: job.message_id,
            outcome,
        };
        if events.send(Event::Result(Box::new(r))).is_err() {
            return;
        }
    }
}
