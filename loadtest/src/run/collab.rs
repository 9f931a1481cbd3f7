//! Collaboration: `documents × editors_per_document` sessions type one-character
//! edits into shared documents at `keystrokes_per_sec`, each through
//! [`tutti::client::collab::Document`] (the three-state OT client). When typing
//! stops and every editor's edits are acknowledged, the server's copy of each
//! document is read on a fresh session, every editor follows the operations up to
//! that revision, and a document whose copies differ from it is divergent.
//!
//! An operation refused with `RATE_LIMITED` (an editor typing faster than
//! `limits.rate.doc_submit`) is sent again after the server's `retry_after_ms`,
//! as a client would; the edits typed meanwhile wait behind it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{mpsc, watch};
use tutti::client::collab::Document;
use tutti::client::{Client, ClientError, Event};
use tutti::ot::TextOperation;
use tutti::protocol::ErrorCode;
use tutti::protocol::v1::{self, DocRole, StreamKind, doc_open_response, push, request, response};

use super::{Ctx, Rng, connect_all};
use crate::outcome::{CollabCounts, Outcome};
use crate::scenario::CollabParams;
use crate::stats::{Counter, Latencies, Lateness, live, now_us};

#[derive(Debug, Default)]
struct Shared {
    submitted: Counter,
    acked: Counter,
    rejected: Counter,
    limited: Counter,
    dropped: Counter,
    latency: Latencies,
}

/// The `collab` scenario.
pub async fn run(ctx: &Ctx) -> anyhow::Result<Outcome> {
    run_with(ctx, &ctx.scenario.collab, "collab").await
}

/// Collaboration with `p`.
pub async fn run_with(ctx: &Ctx, p: &CollabParams, tag: &str) -> anyhow::Result<Outcome> {
    let e = p.editors_per_document;
    let users: Vec<String> = (0..p.documents * e)
        .map(|i| ctx.user(&format!("{tag}d{}e", i / e), i % e))
        .collect();
    // The name each document is created with; the server answers with its id
    // (a chosen id is namespaced per creator: "<owner>~<name>").
    let doc_name = |d: usize| format!("{}-{tag}-doc{d}", ctx.run_id);
    live().set_phase(format!("{tag}: connecting {} editors", users.len()));
    let mut pool = connect_all(&ctx.target, &users, p.ramp_up, 64).await;

    live().set_phase(format!("{tag}: creating {} documents", p.documents));
    let mut doc_ids = Vec::with_capacity(p.documents);
    for d in 0..p.documents {
        let Some(owner) = pool.clients[d * e].clone() else {
            anyhow::bail!("the owner of document {d} could not connect");
        };
        let created = req(
            &owner,
            request::Body::DocCreate(v1::DocCreateRequest {
                doc_id: doc_name(d),
                text: "Tutti load test\n".into(),
            }),
        )
        .await?;
        let response::Body::DocCreate(created) = created else {
            anyhow::bail!("unexpected answer to DocCreate: {created:?}");
        };
        for i in 1..e {
            req(
                &owner,
                request::Body::DocShare(v1::DocShareRequest {
                    doc_id: created.doc_id.clone(),
                    user_id: users[d * e + i].clone(),
                    role: DocRole::Editor as i32,
                }),
            )
            .await?;
        }
        doc_ids.push(created.doc_id);
    }

    let doc_id = |d: usize| doc_ids[d].clone();
    let shared = Arc::new(Shared::default());
    let lateness = Arc::new(Lateness::default());
    lateness
        .threshold_us
        .add((ctx.scenario.slo.late_send_ms * 1000.0) as u64);
    let typing_end = tokio::time::Instant::now() + p.measure;
    let deadline = typing_end + p.settle;
    let (done_tx, mut done_rx) = mpsc::channel::<()>(users.len().max(1));
    let mut truths = Vec::new();
    let mut editors = Vec::new();
    for d in 0..p.documents {
        let (truth_tx, truth_rx) = watch::channel(None::<u64>);
        truths.push(truth_tx);
        for i in 0..e {
            let Some(client) = pool.clients[d * e + i].clone() else {
                continue;
            };
            let open = match req(
                &client,
                request::Body::DocOpen(v1::DocOpenRequest {
                    doc_id: doc_id(d),
                    known_revision: None,
                }),
            )
            .await?
            {
                response::Body::DocOpen(o) => o,
                other => anyhow::bail!("unexpected answer to DocOpen: {other:?}"),
            };
            let doc = Document::from_open(users[d * e + i].clone(), open)?;
            editors.push((
                d,
                tokio::spawn(editor(
                    client,
                    doc,
                    EditorPlan {
                        interval: Duration::from_secs_f64(1.0 / p.keystrokes_per_sec),
                        typing_end,
                        deadline,
                        seed: (d * e + i) as u64,
                    },
                    shared.clone(),
                    lateness.clone(),
                    done_tx.clone(),
                    truth_rx.clone(),
                    pool.closing.clone(),
                )),
            ));
        }
    }
    drop(done_tx);
    let editor_count = editors.len();
    live().set_phase(format!("{tag}: typing for {:?}", p.measure));
    let started = std::time::Instant::now();
    // Every editor reports once its typing is over and its edits are acknowledged.
    let mut synced = 0;
    while synced < editor_count {
        match tokio::time::timeout_at(deadline, done_rx.recv()).await {
            Ok(Some(())) => synced += 1,
            _ => break,
        }
    }
    let typing_secs = started.elapsed().as_secs_f64();
    live().set_phase(format!("{tag}: checking convergence"));
    let mut server_text = Vec::new();
    let mut final_revisions = 0;
    for (d, truth) in truths.iter().enumerate() {
        let (text, revision) = read_truth(ctx, &users[d * e], &doc_id(d)).await?;
        final_revisions += revision;
        server_text.push(text);
        let _ = truth.send(Some(revision));
    }
    let mut divergent = vec![false; p.documents];
    let mut unsettled = 0;
    for (d, h) in editors {
        match h.await {
            Ok(Some(text)) if text == server_text[d] => {}
            Ok(Some(_)) => divergent[d] = true,
            _ => {
                unsettled += 1;
                divergent[d] = true;
            }
        }
    }
    let mut o = Outcome {
        attempted: pool.attempted,
        established: pool.established,
        dropped: shared.dropped.get(),
        connect_secs: pool.connect_secs,
        measured_secs: typing_secs,
        late: lateness.snapshot(),
        ..Outcome::default()
    };
    o.collab = Some(CollabCounts {
        documents: p.documents as u64,
        editors: editor_count as u64,
        ops_submitted: shared.submitted.get(),
        ops_acked: shared.acked.get(),
        ops_rejected: shared.rejected.get(),
        ops_rate_limited: shared.limited.get(),
        divergent_documents: divergent.iter().filter(|d| **d).count() as u64,
        unsettled_editors: unsettled,
        final_revisions,
    });
    o.collab_latency = Some(shared.latency.merged());
    pool.close_all();
    Ok(o)
}

async fn req(c: &Client, body: request::Body) -> anyhow::Result<response::Body> {
    c.request(body)
        .await
        .map_err(|e| anyhow::anyhow!("collaboration setup: {e}"))
}

/// The server's text and revision of `doc`, read on a new session of `owner`.
async fn read_truth(ctx: &Ctx, owner: &str, doc: &str) -> anyhow::Result<(String, u64)> {
    let c = Client::connect(ctx.target.client_config(owner)?).await?;
    let open = match req(
        &c,
        request::Body::DocOpen(v1::DocOpenRequest {
            doc_id: doc.into(),
            known_revision: None,
        }),
    )
    .await?
    {
        response::Body::DocOpen(o) => o,
        other => anyhow::bail!("unexpected answer to DocOpen: {other:?}"),
    };
    c.close();
    match open.state {
        Some(doc_open_response::State::Snapshot(text)) => Ok((text, open.revision)),
        _ => anyhow::bail!("DocOpen without a snapshot"),
    }
}

#[derive(Debug, Clone, Copy)]
struct EditorPlan {
    interval: Duration,
    typing_end: tokio::time::Instant,
    deadline: tokio::time::Instant,
    seed: u64,
}

const LETTERS: &[&str] = &["a", "e", "t", " ", "é", "🎉", "\n", "o"];

fn random_edit(rng: &mut Rng, text: &str) -> TextOperation {
    let len = text.chars().count();
    let pos = rng.below(len as u64 + 1) as usize;
    if len > 0 && (rng.below(4) == 0 || len > 4000) {
        let pos = pos.min(len - 1);
        TextOperation::new()
            .retain(pos)
            .delete(1)
            .retain(len - pos - 1)
    } else {
        let s = LETTERS[rng.below(LETTERS.len() as u64) as usize];
        TextOperation::new().retain(pos).insert(s).retain(len - pos)
    }
}

/// Types until `typing_end`, then waits for its edits' acknowledgements, reports,
/// waits for the server's final revision and follows the operations up to it.
/// Returns the final text, or `None` when it could not get there in time.
#[allow(clippy::too_many_arguments)]
async fn editor(
    client: Arc<Client>,
    mut doc: Document,
    plan: EditorPlan,
    shared: Arc<Shared>,
    lateness: Arc<Lateness>,
    done: mpsc::Sender<()>,
    mut truth: watch::Receiver<Option<u64>>,
    closing: Arc<AtomicBool>,
) -> Option<String> {
    let mut rng = Rng::new(plan.seed);
    let start =
        tokio::time::Instant::now() + plan.interval.mul_f64(rng.below(1000) as f64 / 1000.0);
    let start_us = now_us() + (start - tokio::time::Instant::now()).as_micros() as u64;
    let mut keys = tokio::time::interval_at(start, plan.interval);
    keys.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut ticks = 0u64;
    let mut inflight = FuturesUnordered::new();
    // `fresh`: not a resend of a refused operation.
    let submit = |req: v1::DocSubmitRequest, fresh: bool| {
        if fresh {
            shared.submitted.inc();
        }
        live().sends.inc();
        let c = client.clone();
        async move {
            let t = now_us();
            let r = c.request(request::Body::DocSubmit(req)).await;
            (t, r)
        }
    };
    let mut reported = false;
    let mut target: Option<u64> = None;
    let mut broken = false;
    // When to send the operation refused with `RATE_LIMITED` again.
    let mut resend_at: Option<tokio::time::Instant> = None;
    loop {
        let now = tokio::time::Instant::now();
        let typing = now < plan.typing_end && !broken;
        let synced = !typing && inflight.is_empty() && doc.is_synchronized();
        if synced && !reported {
            reported = true;
            let _ = done.send(()).await;
        }
        if target.is_none() {
            target = *truth.borrow();
        }
        if let Some(t) = target
            && doc.revision() >= t
            && synced
        {
            return (!broken).then(|| doc.text().to_owned());
        }
        if now >= plan.deadline || (broken && reported) {
            if !reported {
                let _ = done.send(()).await;
            }
            return None;
        }
        tokio::select! {
            ev = client.next_event() => match ev {
                Some(Event::Push(StreamKind::Collab, p)) => {
                    live().deliveries.inc();
                    if let Some(push::Event::DocOperation(op)) = p.event {
                        match doc.on_operation(op) {
                            Ok(Some(req)) => inflight.push(submit(req, true)),
                            Ok(None) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "the document could not follow the server");
                                broken = true;
                            }
                        }
                    }
                }
                Some(_) => {}
                None => {
                    if !closing.load(Ordering::SeqCst) {
                        shared.dropped.inc();
                        live().errors.inc();
                    }
                    if !reported {
                        let _ = done.send(()).await;
                    }
                    return None;
                }
            },
            Some((t, r)) = inflight.next(), if !inflight.is_empty() => {
                match r {
                    Ok(_) => {
                        shared.acked.inc();
                        shared.latency.record(plan.seed as usize, now_us().saturating_sub(t));
                    }
                    Err(ClientError::Server(e)) if e.error_code() == Some(ErrorCode::RateLimited) => {
                        shared.limited.inc();
                        let wait = Duration::from_millis(e.retry_after_ms.max(1));
                        resend_at = Some(tokio::time::Instant::now() + wait);
                    }
                    Err(e) => {
                        shared.rejected.inc();
                        live().errors.inc();
                        if !matches!(e, ClientError::Server(_)) {
                            broken = true;
                        }
                        tracing::debug!(error = %e, "an operation failed");
                    }
                }
            }
            _ = keys.tick(), if typing => {
                lateness.note(start_us + ticks * plan.interval.as_micros() as u64, now_us());
                ticks += 1;
                let op = random_edit(&mut rng, doc.text());
                match doc.edit(op) {
                    Ok(Some(req)) => inflight.push(submit(req, true)),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "a local edit failed");
                        broken = true;
                    }
                }
            }
            _ = tokio::time::sleep_until(resend_at.unwrap_or(now)), if resend_at.is_some() => {
                resend_at = None;
                if let Some(req) = doc.pending() {
                    inflight.push(submit(req, false));
                }
            }
            _ = truth.changed(), if target.is_none() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}
