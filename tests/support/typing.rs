//! Typing into a collaborative document the way an editor does: random edits with
//! emoji and combining marks at a typing rate, applying what the others type, and
//! following the document to a revision. Shared by the collaboration and cluster
//! tests.

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tutti::client::collab::Document;
use tutti::client::{Client, ClientError, Event};
use tutti::ot::TextOperation;
use tutti::protocol::v1::{self, StreamKind, push, request, response};

/// Submits an operation.
pub async fn submit(
    c: &Client,
    req: v1::DocSubmitRequest,
) -> Result<v1::DocSubmitResponse, ClientError> {
    match c.request(request::Body::DocSubmit(req)).await? {
        response::Body::DocSubmit(r) => Ok(r),
        other => panic!("{other:?}"),
    }
}

/// A tiny deterministic generator (no randomness in tests without a seed).
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

pub const SNIPPETS: &[&str] = &["a", "é", "🎉", "👩‍👩‍👧", "e\u{301}", "漢字", " ", "xyz", "\n"];

pub fn random_edit(rng: &mut Rng, text: &str) -> TextOperation {
    let len = text.chars().count();
    let pos = rng.below(len + 1);
    if len > 0 && rng.below(3) == 0 {
        let n = 1 + rng.below((len - pos.min(len - 1)).min(3));
        let pos = pos.min(len - n);
        TextOperation::new()
            .retain(pos)
            .delete(n)
            .retain(len - pos - n)
    } else {
        let s = SNIPPETS[rng.below(SNIPPETS.len())];
        TextOperation::new().retain(pos).insert(s).retain(len - pos)
    }
}

/// Types `edits` random edits while applying what the others type, until every
/// local edit is acknowledged.
/// Returns the last request sent.
pub async fn type_concurrently(
    client: &Client,
    doc: &mut Document,
    edits: usize,
    seed: u64,
) -> v1::DocSubmitRequest {
    let mut rng = Rng(seed);
    let mut last = None;
    let mut left = edits;
    let mut inflight = FuturesUnordered::new();
    // Keystrokes at a typing rate (a fast typist's 1,000 per second), so edits and
    // other people's operations interleave; correctness does not depend on it.
    let mut keys = tokio::time::interval(Duration::from_millis(1));
    keys.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if left == 0 && inflight.is_empty() && doc.is_synchronized() {
            return last.expect("at least one edit was sent");
        }
        tokio::select! {
            ev = client.next_event() => match ev {
                Some(Event::Push(StreamKind::Collab, p)) => {
                    if let Some(push::Event::DocOperation(op)) = p.event
                        && let Some(req) = doc.on_operation(op).unwrap()
                    {
                        last = Some(req.clone());
                        inflight.push(submit(client, req));
                    }
                }
                Some(_) => {}
                None => panic!("session closed"),
            },
            Some(r) = inflight.next(), if !inflight.is_empty() => {
                r.unwrap();
            }
            _ = keys.tick(), if left > 0 => {
                left -= 1;
                let op = random_edit(&mut rng, doc.text());
                if let Some(req) = doc.edit(op).unwrap() {
                    last = Some(req.clone());
                    inflight.push(submit(client, req));
                }
            }
        }
    }
}

/// Applies pushed operations until the document reaches `revision`.
pub async fn follow_until(client: &Client, doc: &mut Document, revision: u64) {
    while doc.revision() < revision {
        match client.next_event().await {
            Some(Event::Push(_, p)) => {
                if let Some(push::Event::DocOperation(op)) = p.event {
                    assert!(doc.on_operation(op).unwrap().is_none());
                }
            }
            Some(_) => {}
            None => panic!("session closed"),
        }
    }
}
