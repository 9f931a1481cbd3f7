//! The bodies of the fuzz targets in `fuzz/` (cargo-fuzz, nightly) and of the
//! stable tests that run the same bodies over the seed corpus and random inputs
//! (`cargo test --lib fuzz_harness`). Compiled with the `fuzzing` feature (and in
//! tests); not part of Tutti's API.
//!
//! Each function takes arbitrary bytes and panics only when Tutti is wrong: a panic
//! in the code under test, a broken invariant (chunked decoding that differs from
//! whole decoding, a failed OT law, a request answered with `INTERNAL`, a buffer
//! that outgrows its limit) or a request that never finishes. The byte layouts
//! below are the harnesses' own, chosen so that small mutations stay meaningful;
//! [`seeds`] builds the committed seed corpus from real frames and operations.
//! docs/SECURITY.md (Fuzzing) lists the targets and how to run them.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use prost::Message;
use serde::Deserialize;

use crate::gateway::control::{self, Action, Control, HelloOutcome};
use crate::ot::{Authority, OtError, TextOperation};
use crate::protocol::ot_wire::{op_from_wire, op_to_wire};
use crate::protocol::v1::{self, ClientFrame, ServerFrame, request};
use crate::protocol::{ErrorCode, FrameDecoder, FrameError, encode_frame};
use crate::services::analytics::{AnalyticsConfig, AnalyticsService, METRICS_ROLE, NewEvent};
use crate::services::fakes::{FakeSession, Node};
use crate::services::{ServiceError, ServicesConfig, SessionCtx};

/// The fuzz targets, by name (the names of `fuzz/fuzz_targets/*.rs` and of the
/// corpus folders `fuzz/corpus/<target>/`).
pub const TARGETS: &[&str] = &["framing", "services", "ot", "ot_json", "analytics_query"];

/// Runs the target called `name` on `data`.
///
/// # Panics
/// On an unknown name, and wherever the target finds a bug.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "framing" => framing(data),
        "services" => services(data),
        "ot" => ot(data),
        "ot_json" => ot_json(data),
        "analytics_query" => analytics_query(data),
        other => panic!("no fuzz target {other}"),
    }
}

/// Reads the harnesses' input layouts; past the end it reads zeros.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn u8(&mut self) -> u8 {
        let Some((&b, rest)) = self.0.split_first() else {
            return 0;
        };
        self.0 = rest;
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.0.split_at(n.min(self.0.len()));
        self.0 = rest;
        head
    }

    fn rest(&mut self) -> &'a [u8] {
        self.take(usize::MAX)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

// ---- framing ----

/// The longest varint length prefix.
const MAX_PREFIX: usize = 10;

/// The frame decoder under arbitrary chunking.
///
/// Layout: `max_frame_size` (u16, +1), a byte whose low bit picks `ServerFrame`
/// over `ClientFrame`, a count `k` (mod 32) and `k` chunk sizes (bytes), then the
/// stream. The stream is fed in those chunks (the rest in one last chunk), and the
/// frames and errors must be exactly those of feeding it whole. Between reads the
/// decoder holds less than one prefix and one frame of the limit.
pub fn framing(data: &[u8]) {
    let mut r = Reader(data);
    let max = usize::from(r.u16()) + 1;
    let server = r.u8() & 1 == 1;
    let k = r.u8() % 32;
    let sizes: Vec<usize> = (0..k).map(|_| usize::from(r.u8())).collect();
    let stream = r.rest();
    if server {
        chunked_equals_whole::<ServerFrame>(stream, max, &sizes);
    } else {
        chunked_equals_whole::<ClientFrame>(stream, max, &sizes);
    }
}

type Decoded<M> = Vec<Result<M, FrameError>>;

/// Takes every frame the decoder can give; `true` once a fatal error ended the
/// stream.
fn drain_frames<M: Message + Default>(dec: &mut FrameDecoder, out: &mut Decoded<M>) -> bool {
    loop {
        let before = dec.buffered();
        match dec.decode::<M>() {
            Ok(None) => return false,
            Ok(Some(m)) => out.push(Ok(m)),
            Err(e) => {
                let fatal = e.is_fatal();
                out.push(Err(e));
                if fatal {
                    return true;
                }
            }
        }
        assert!(
            dec.buffered() < before,
            "a decoded frame or error consumed nothing"
        );
    }
}

fn chunked_equals_whole<M: Message + Default + PartialEq>(
    stream: &[u8],
    max: usize,
    sizes: &[usize],
) {
    let mut whole = FrameDecoder::new(max);
    whole.extend(stream);
    let mut expected = Vec::new();
    let whole_ended = drain_frames::<M>(&mut whole, &mut expected);

    let mut dec = FrameDecoder::new(max);
    let mut got = Vec::new();
    let mut ended = false;
    let mut rest = stream;
    let mut chunks = sizes.iter().copied().chain(std::iter::once(usize::MAX));
    while !ended && let Some(n) = chunks.next() {
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        rest = tail;
        dec.extend(chunk);
        assert!(
            dec.buffered() < max + MAX_PREFIX + chunk.len(),
            "holds {} bytes with a limit of {max} after a read of {}",
            dec.buffered(),
            chunk.len()
        );
        ended = drain_frames::<M>(&mut dec, &mut got);
        assert!(
            ended || dec.buffered() < max + MAX_PREFIX,
            "holds {} bytes between reads with a limit of {max}",
            dec.buffered()
        );
    }
    assert_eq!(ended, whole_ended);
    assert!(got == expected, "chunked decoding differs from whole");
    if !ended {
        assert_eq!(dec.buffered(), whole.buffered());
    }
}

// ---- services ----

/// The most a request may take before the harness calls it a hang.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests in flight per session, as in the default configuration.
const MAX_INFLIGHT: usize = 8;
/// The frame limit of the harness's control streams.
const MAX_FRAME: usize = 64 * 1024;
/// The datagram limit of the harness's sessions.
const MAX_DATAGRAM: usize = 1200;
/// The users of the two sessions.
const USERS: [&str; 2] = ["ann", "bob"];

/// A node on a fresh database, on the RAM disk `/dev/shm` where there is one:
/// every commit syncs, which costs ten times more on a real disk.
fn node() -> Node {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        Node::new_in(shm)
    } else {
        Node::new()
    }
}

/// A current-thread runtime with time (for the request timeout).
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
}

enum Stage {
    Hello(FrameDecoder),
    Open(Control),
    Closed,
}

struct FuzzSession {
    ctx: SessionCtx,
    pushes: tokio::sync::mpsc::Receiver<(v1::StreamKind, v1::Push)>,
    stage: Stage,
}

/// Control streams and datagrams of two sessions (users `ann` and `bob`) through
/// the sans-IO control stream and every service, on a fresh node.
///
/// Layout: a flags byte (bit `i`: session `i` has the `metrics` role), then records
/// `tag, len (u16), bytes`. In `tag`, bit 0 set: the bytes are one datagram; clear:
/// they are the next bytes of the control stream (which begins with a `Hello`).
/// Bit 1 picks the session; bit 2 then finishes its control stream. Every request
/// error must be typed and not `INTERNAL`, every request must finish.
pub fn services(data: &[u8]) {
    runtime().block_on(services_async(data));
}

/// What a `services` input did: requests answered, and error codes.
#[derive(Debug, Default)]
pub struct ServicesReport {
    /// Requests answered with a response.
    pub ok: Vec<&'static str>,
    /// Requests answered with an error, and its code.
    pub errors: Vec<(&'static str, ErrorCode)>,
}

async fn services_async(data: &[u8]) -> ServicesReport {
    let mut report = ServicesReport::default();
    let node = node();
    let (services, _background) =
        crate::services::Services::open(node.deps.clone(), ServicesConfig::default())
            .expect("services open on a fresh database");
    let mut r = Reader(data);
    let flags = r.u8();
    let mut sessions: Vec<FuzzSession> = USERS
        .iter()
        .enumerate()
        .map(|(i, user)| {
            let (sub, pushes) = FakeSession::new(user, &format!("s-{user}"), 4096);
            let roles: Vec<String> = if flags & (1 << i) != 0 {
                vec![METRICS_ROLE.to_owned()]
            } else {
                Vec::new()
            };
            FuzzSession {
                ctx: SessionCtx {
                    subscriber: sub,
                    roles: Arc::from(roles),
                },
                pushes,
                stage: Stage::Hello(FrameDecoder::new(MAX_FRAME)),
            }
        })
        .collect();
    while !r.is_empty() {
        let tag = r.u8();
        let len = usize::from(r.u16());
        let bytes = r.take(len);
        let s = &mut sessions[usize::from((tag >> 1) & 1)];
        if tag & 1 == 1 {
            if bytes.len() <= MAX_DATAGRAM
                && matches!(s.stage, Stage::Open(_))
                && let Ok(v1::Datagram {
                    kind: Some(kind), ..
                }) = v1::Datagram::decode(bytes)
                && !matches!(
                    kind,
                    v1::datagram::Kind::Ping(_) | v1::datagram::Kind::Pong(_)
                )
            {
                services.datagram(&s.ctx, kind);
            }
        } else {
            stream_bytes(&services, s, bytes, tag & 4 != 0, &mut report).await;
        }
        for s in &mut sessions {
            while s.pushes.try_recv().is_ok() {}
        }
    }
    for s in &mut sessions {
        if matches!(s.stage, Stage::Open(_)) {
            services.disconnected(&s.ctx).await;
        }
    }
    report
}

async fn stream_bytes(
    services: &crate::services::Services,
    s: &mut FuzzSession,
    bytes: &[u8],
    finish: bool,
    report: &mut ServicesReport,
) {
    match std::mem::replace(&mut s.stage, Stage::Closed) {
        Stage::Closed => {}
        Stage::Hello(mut dec) => {
            dec.extend(bytes);
            match control::read_hello(&mut dec) {
                HelloOutcome::NeedMore => s.stage = Stage::Hello(dec),
                HelloOutcome::Refuse(..) => {}
                HelloOutcome::Hello(hello) => {
                    // Storage works here: a failure to connect is a finding.
                    services
                        .connected(&s.ctx, &hello.resume)
                        .await
                        .expect("a session connects on working storage");
                    s.stage = Stage::Open(Control::new(dec, MAX_INFLIGHT));
                    drive(services, s, finish, report).await;
                }
            }
        }
        Stage::Open(mut c) => {
            c.received(bytes);
            s.stage = Stage::Open(c);
            drive(services, s, finish, report).await;
        }
    }
}

/// Carries out the control stream's actions, as the gateway's I/O loop does.
async fn drive(
    services: &crate::services::Services,
    s: &mut FuzzSession,
    finish: bool,
    report: &mut ServicesReport,
) {
    let Stage::Open(c) = &mut s.stage else {
        return;
    };
    let mut closed = false;
    while let Some(action) = c.poll_action(1) {
        match action {
            Action::Dispatch(req) => {
                let id = req.id;
                answer(services, &s.ctx, req, report).await;
                let _ = c.completed(id, ServerFrame::default());
            }
            Action::Send(frame) => {
                if let Some(v1::server_frame::Kind::Error(e)) = &frame.kind {
                    assert!(e.error_code().is_some(), "an error frame without a code");
                }
            }
            Action::Close(..) => {
                closed = true;
                break;
            }
        }
        while s.pushes.try_recv().is_ok() {}
    }
    if finish && !closed {
        let _ = c.finished();
        closed = true;
    }
    if closed {
        s.stage = Stage::Closed;
        services.disconnected(&s.ctx).await;
    }
}

async fn answer(
    services: &crate::services::Services,
    ctx: &SessionCtx,
    req: v1::Request,
    report: &mut ServicesReport,
) {
    let Some(body) = req.body else { return };
    if matches!(body, request::Body::Echo(_)) {
        return;
    }
    let name = body.name();
    let outcome = tokio::time::timeout(REQUEST_TIMEOUT, services.handle(ctx, body))
        .await
        .unwrap_or_else(|_| panic!("{name} did not finish within {REQUEST_TIMEOUT:?}"));
    match outcome {
        Some(Ok(_)) => report.ok.push(name),
        Some(Err(e)) => {
            assert_typed(name, &e);
            report.errors.push((name, e.code));
        }
        None => {}
    }
}

fn assert_typed(what: &str, e: &ServiceError) {
    assert!(
        e.code != ErrorCode::Internal,
        "{what} failed with INTERNAL: {}",
        e.message
    );
}

// ---- OT ----

/// Text pieces for documents and inserts: multi-byte Latin, a combining mark, CJK,
/// a ZWJ sequence, an astral emoji, a newline.
const PIECES: &[&str] = &[
    "a",
    "Z",
    "é",
    "e\u{301}",
    "中文",
    "👩\u{200d}👩\u{200d}👧",
    "😀",
    "\n",
    " ",
];

fn piece(b: u8) -> &'static str {
    PIECES[usize::from(b) % PIECES.len()]
}

fn chars(s: &str) -> usize {
    s.chars().count()
}

/// A document of up to 15 pieces.
fn doc(r: &mut Reader<'_>) -> String {
    let n = r.u8() % 16;
    (0..n).map(|_| piece(r.u8())).collect()
}

/// An operation of up to 8 steps fitted to a document of `len` chars: retains and
/// deletes stop at its end, and the rest is retained.
fn fitted(r: &mut Reader<'_>, len: usize) -> TextOperation {
    let mut op = TextOperation::new();
    let mut left = len;
    for _ in 0..r.u8() % 9 {
        let b = r.u8();
        let n = usize::from(b >> 2).min(left);
        op = match b & 3 {
            0 => op.retain(n),
            1 => op.delete(n),
            _ => op.insert(piece(b >> 2)),
        };
        if b & 3 < 2 {
            left -= n;
        }
    }
    op.retain(left)
}

/// An operation of up to 8 components with any lengths (rarely fits a document).
fn unfitted(r: &mut Reader<'_>) -> TextOperation {
    let mut op = TextOperation::new();
    for _ in 0..r.u8() % 9 {
        let b = r.u8();
        let n = usize::from(r.u8());
        op = match b & 3 {
            0 => op.retain(n),
            1 => op.delete(n),
            _ => op.insert(piece(b >> 2)),
        };
    }
    op
}

/// The operation after a trip through the protocol (encoded and decoded with prost).
fn through_wire(op: &TextOperation) -> TextOperation {
    let bytes = op_to_wire(op).encode_to_vec();
    let back = v1::TextOp::decode(bytes.as_slice()).expect("our own encoding decodes");
    let back = op_from_wire(Some(back)).expect("our own operation is valid");
    assert_eq!(&back, op, "an operation changed on the wire");
    back
}

/// The OT laws, the wire form and the authority.
///
/// Layout: a mode byte. Mode bit 0 set: the rest is a protobuf `TextOp` from a
/// peer, which must decode to a valid operation or a typed error, and apply to a
/// document or fail typed. Otherwise: a document, two operations `a` and `b` fitted
/// to it, an operation fitted after `a`, then up to 32 submissions to an
/// [`Authority`] (each: a byte choosing how far behind its base revision is,
/// whether the operation fits, and a sender and sequence number).
pub fn ot(data: &[u8]) {
    let mut r = Reader(data);
    let mode = r.u8();
    if mode & 1 == 1 {
        return peer_op(&doc(&mut r), r.rest());
    }
    let d = doc(&mut r);
    let n = chars(&d);
    let a = through_wire(&fitted(&mut r, n));
    let b = through_wire(&fitted(&mut r, n));
    let ad = a.apply(&d).expect("a fits d");
    assert_eq!(chars(&ad), a.target_len());
    // compose: (a∘c)(d) == c(a(d))
    let c = fitted(&mut r, chars(&ad));
    let cad = c.apply(&ad).expect("c fits a(d)");
    assert_eq!(
        a.compose(&c).expect("c follows a").apply(&d).as_ref(),
        Ok(&cad)
    );
    assert_eq!(a.compose(&b).is_ok(), a.target_len() == b.base_len());
    // transform (TP1)
    let (a2, b2) = TextOperation::transform(&a, &b).expect("a and b are concurrent");
    let bd = b.apply(&d).expect("b fits d");
    assert_eq!(b2.apply(&ad), a2.apply(&bd), "transform does not converge");
    // invert
    let inv = a.invert(&d).expect("a fits d");
    assert_eq!(inv.apply(&ad).as_deref(), Ok(d.as_str()), "invert");
    // The authority: the documents at every revision, to fit operations to them.
    let mut auth = Authority::new(d.clone()).with_max_history(usize::from(r.u8() % 8));
    let mut docs = vec![d];
    for _ in 0..32 {
        if r.is_empty() {
            break;
        }
        let m = r.u8();
        let behind = u64::from(m >> 4);
        let base = if m & 0x08 != 0 {
            auth.revision() + behind
        } else {
            auth.revision().saturating_sub(behind)
        };
        let op = match docs.get(base as usize) {
            Some(at_base) if m & 1 == 0 => fitted(&mut r, chars(at_base)),
            _ => unfitted(&mut r),
        };
        let op = through_wire(&op);
        let client = ["c1", "c2"][usize::from((m >> 2) & 1)];
        let origin = (m & 2 != 0).then(|| (client, u64::from(r.u8() % 4)));
        let before = (auth.doc().to_owned(), auth.revision());
        match auth.receive(base, op, origin) {
            Ok(applied) if applied.duplicate => {
                assert_eq!((auth.doc(), auth.revision()), (before.0.as_str(), before.1));
            }
            Ok(applied) => {
                assert_eq!(applied.revision, before.1 + 1);
                assert_eq!(applied.op.apply(&before.0).as_deref(), Ok(auth.doc()));
                assert_eq!(auth.doc_len(), chars(auth.doc()));
                docs.push(auth.doc().to_owned());
            }
            Err(e) => {
                assert!(
                    matches!(
                        e,
                        OtError::FutureRevision { .. }
                            | OtError::TooOld { .. }
                            | OtError::TransformBaseMismatch { .. }
                            | OtError::BaseLengthMismatch { .. }
                            | OtError::StaleSequence { .. }
                    ),
                    "unexpected {e:?}"
                );
                assert_eq!((auth.doc(), auth.revision()), (before.0.as_str(), before.1));
            }
        }
    }
}

/// An operation as a peer may send it: arbitrary protobuf bytes.
fn peer_op(d: &str, bytes: &[u8]) {
    let Ok(wire) = v1::TextOp::decode(bytes) else {
        return;
    };
    let op = match op_from_wire(Some(wire)) {
        Ok(op) => op,
        Err(e) => {
            assert!(
                matches!(
                    e,
                    OtError::InvalidComponent { .. }
                        | OtError::EmptyComponent { .. }
                        | OtError::LengthOverflow
                ),
                "unexpected {e:?}"
            );
            return;
        }
    };
    assert_eq!(through_wire(&op), op);
    match op.apply(d) {
        Ok(out) => assert_eq!(chars(&out), op.target_len()),
        Err(e) => assert!(matches!(e, OtError::BaseLengthMismatch { .. }), "{e:?}"),
    }
    let _ = op.invert(d);
    let _ = op.compose(&op);
    let _ = TextOperation::transform(&op, &op);
}

// ---- stored OT JSON ----

/// The shape operations are stored in (an object with the operation under `op`).
#[derive(Deserialize)]
struct Stored {
    op: TextOperation,
}

/// The ot.js JSON form of operations, as clients of ot.js and the database hold
/// them: `TextOperation::from_json` and the serde path must agree, a decoded
/// operation must survive JSON and the wire unchanged, and apply to a document of
/// its base length.
pub fn ot_json(data: &[u8]) {
    // The stored form is parsed from bytes, which need not be UTF-8 (serde_json
    // checks UTF-8 only in the strings it keeps, not in fields it skips).
    let stored = serde_json::from_slice::<Stored>(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let direct = TextOperation::from_json(text);
    let serde = serde_json::from_str::<TextOperation>(text);
    match (&direct, &serde) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(_), Err(_)) => {}
        _ => panic!("from_json and serde disagree: {direct:?} / {serde:?}"),
    }
    if let Ok(s) = &stored {
        let value = serde_json::to_value(&s.op).expect("a decoded operation has a JSON form");
        let again: Stored = serde_json::from_value(serde_json::json!({ "op": value }))
            .expect("a stored operation decodes again");
        assert_eq!(
            again.op, s.op,
            "a stored operation changed when stored again"
        );
    }
    let Ok(op) = direct else { return };
    assert_eq!(TextOperation::from_json(&op.to_json()).as_ref(), Ok(&op));
    assert_eq!(op_from_wire(Some(op_to_wire(&op))).as_ref(), Ok(&op));
    if op.base_len() <= 4096 {
        let d = "é".repeat(op.base_len());
        let out = op.apply(&d).expect("fits its base length");
        assert_eq!(chars(&out), op.target_len());
    }
}

// ---- analytics query ----

/// The analytics HTTP queries: a selector byte (series, top, distinct users), then
/// the query string as a client sends it in the URL. The query is decoded with the
/// extractor the API uses, and what decodes is run against an analytics service
/// holding events. Errors must be typed and not `INTERNAL`; a series holds at most
/// its point limit, its total is the sum of its points.
pub fn analytics_query(data: &[u8]) {
    let mut r = Reader(data);
    let which = r.u8() % 3;
    let Ok(query) = std::str::from_utf8(r.rest()) else {
        return;
    };
    // What a URL cannot carry never reaches the handler.
    let Ok(uri) = format!("/api/v1/analytics?{query}").parse::<axum::http::Uri>() else {
        return;
    };
    runtime().block_on(async {
        let node = node();
        let (svc, _background) =
            AnalyticsService::open(node.deps.clone(), AnalyticsConfig::default())
                .expect("analytics opens on a fresh database");
        track_some(&node, &svc).await;
        use crate::api::{SeriesQuery, WindowQuery, millis};
        use axum::extract::Query;
        match which {
            0 => {
                let Ok(Query(q)) = Query::<SeriesQuery>::try_from_uri(&uri) else {
                    return;
                };
                let resolution = q.resolution.map_or(0, millis);
                match svc
                    .series(&q.kind, &q.dimension, millis(q.duration), resolution)
                    .await
                {
                    Ok(s) => {
                        assert!(s.resolution_ms > 0);
                        // At most analytics' point limit.
                        assert!(s.points.len() <= 10_000);
                        assert_eq!(s.total, s.points.iter().map(|p| p.1).sum::<u64>());
                        assert!(
                            s.points
                                .windows(2)
                                .all(|w| w[1].0 - w[0].0 == s.resolution_ms)
                        );
                    }
                    Err(e) => assert_typed("series", &e),
                }
            }
            1 => {
                let Ok(Query(q)) = Query::<WindowQuery>::try_from_uri(&uri) else {
                    return;
                };
                let limit = q.limit.unwrap_or(10).clamp(1, 100);
                match svc.top(millis(q.window), limit).await {
                    Ok(types) => assert!(types.len() <= limit),
                    Err(e) => assert_typed("top", &e),
                }
            }
            _ => {
                let Ok(Query(q)) = Query::<WindowQuery>::try_from_uri(&uri) else {
                    return;
                };
                if let Err(e) = svc.distinct_users(millis(q.window)).await {
                    assert_typed("distinct users", &e);
                }
            }
        }
    });
}

/// Events over the last two hours, flushed, so that queries read memory and redb.
async fn track_some(node: &Node, svc: &AnalyticsService) {
    let now = node.clock.now_ms();
    for (i, minutes_ago) in [130u64, 61, 5, 0].into_iter().enumerate() {
        node.clock.set(now - minutes_ago * 60_000);
        let event = NewEvent {
            kind: if i % 2 == 0 { "click" } else { "view" }.into(),
            dimensions: [("page".to_owned(), "home".to_owned())].into(),
            count: 1 + i as u32,
            user: Some(USERS[i % 2].to_owned()),
        };
        svc.track(None, None, &[event]).expect("a valid event");
        svc.flush().await.expect("flushes");
    }
    node.clock.set(now);
}

// ---- seeds ----

fn client_frames(frames: &[ClientFrame]) -> Vec<u8> {
    let mut buf = BytesMut::new();
    for f in frames {
        encode_frame(f, &mut buf);
    }
    buf.to_vec()
}

fn hello() -> ClientFrame {
    ClientFrame {
        kind: Some(v1::client_frame::Kind::Hello(v1::Hello {
            token: "token".into(),
            protocol_version: crate::protocol::PROTOCOL_VERSION,
            ..Default::default()
        })),
    }
}

fn req(id: u64, body: request::Body) -> ClientFrame {
    ClientFrame {
        kind: Some(v1::client_frame::Kind::Request(v1::Request {
            id,
            body: Some(body),
        })),
    }
}

/// One record of the `services` layout.
fn record(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    out.extend(
        u16::try_from(bytes.len())
            .expect("a short record")
            .to_le_bytes(),
    );
    out.extend(bytes);
}

fn op_wire(op: &TextOperation) -> Option<v1::TextOp> {
    Some(op_to_wire(op))
}

/// The seed corpus: `(target, name, bytes)`, from real frames and operations.
// Requests gain optional fields over time; the seeds set the ones they need.
#[allow(clippy::needless_update)]
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    use request::Body as B;
    let mut out = Vec::new();

    // framing: a session's first frames, in a few chunkings and limits.
    let session = client_frames(&[
        hello(),
        req(
            1,
            B::Echo(v1::EchoRequest {
                payload: vec![7; 300].into(),
                push: false,
            }),
        ),
        ClientFrame {
            kind: Some(v1::client_frame::Kind::Ping(v1::Ping { nonce: 9 })),
        },
    ]);
    let mut f = vec![0xff, 0x0f, 0, 4, 1, 2, 3, 200];
    f.extend(&session);
    out.push(("framing", "session_chunked", f));
    let mut f = vec![63, 0, 0, 2, 5, 100];
    f.extend(&session);
    out.push(("framing", "oversize_echo", f));
    let mut f = vec![255, 255, 0, 0];
    f.extend([3, 0x00, 0xff, 0xff]);
    f.extend(&session);
    f.extend([0xff; 11]);
    out.push(("framing", "malformed_then_bad_prefix", f));
    let server = {
        let mut buf = BytesMut::new();
        encode_frame(
            &control::error_response(3, ErrorCode::NotFound, "no such room"),
            &mut buf,
        );
        buf.to_vec()
    };
    let mut f = vec![0, 4, 1, 1, 1];
    f.extend(server);
    out.push(("framing", "server_error_response", f));

    // services: ann creates a room with bob, chats, edits a document; bob answers.
    let op = TextOperation::new().retain(5).insert(", world");
    let ann = client_frames(&[
        hello(),
        req(
            1,
            B::RoomCreate(v1::RoomCreateRequest {
                room_id: "r1".into(),
                name: "Room".into(),
                participants: vec!["bob".into()],
            }),
        ),
        req(
            2,
            B::ChatSend(v1::ChatSendRequest {
                room_id: "ann~r1".into(),
                text: "hi bob".into(),
                ..Default::default()
            }),
        ),
        req(
            3,
            B::ChatHistory(v1::ChatHistoryRequest {
                room_id: "ann~r1".into(),
                before_offset: 0,
                limit: 10,
            }),
        ),
        req(
            4,
            B::DocCreate(v1::DocCreateRequest {
                doc_id: "d1".into(),
                text: "hello".into(),
            }),
        ),
        req(
            5,
            B::DocShare(v1::DocShareRequest {
                doc_id: "ann~d1".into(),
                user_id: "bob".into(),
                role: v1::DocRole::Editor as i32,
            }),
        ),
        req(
            6,
            B::DocOpen(v1::DocOpenRequest {
                doc_id: "ann~d1".into(),
                ..Default::default()
            }),
        ),
        req(
            7,
            B::DocSubmit(v1::DocSubmitRequest {
                doc_id: "ann~d1".into(),
                base_revision: 0,
                op: op_wire(&op),
                client_id: "c1".into(),
                seq: 1,
            }),
        ),
        req(
            8,
            B::PresenceSet(v1::PresenceSetRequest {
                status: v1::PresenceStatus::Away as i32,
            }),
        ),
        req(
            9,
            B::AnalyticsTrack(v1::AnalyticsTrackRequest {
                events: vec![v1::AnalyticsEvent {
                    r#type: "click".into(),
                    dimensions: [("page".to_owned(), "home".to_owned())].into(),
                    count: 2,
                }],
            }),
        ),
        req(
            10,
            B::AnalyticsSeries(v1::AnalyticsSeriesRequest {
                r#type: "click".into(),
                dimension: "page=home".into(),
                duration_ms: 3_600_000,
                resolution_ms: 60_000,
                by_node: false,
            }),
        ),
        req(
            11,
            B::AnalyticsTop(v1::AnalyticsTopRequest {
                window_ms: 3_600_000,
                limit: 5,
            }),
        ),
    ]);
    let bob = client_frames(&[
        hello(),
        req(1, B::RoomList(v1::RoomListRequest::default())),
        req(
            2,
            B::DocOpen(v1::DocOpenRequest {
                doc_id: "ann~d1".into(),
                known_revision: Some(0),
                ..Default::default()
            }),
        ),
        req(
            3,
            B::DocSubmit(v1::DocSubmitRequest {
                doc_id: "ann~d1".into(),
                base_revision: 0,
                op: op_wire(&TextOperation::new().insert("¡").retain(5)),
                client_id: "c2".into(),
                seq: 1,
            }),
        ),
        req(
            4,
            B::RoomInviteAccept(v1::RoomInviteAcceptRequest {
                room_id: "ann~r1".into(),
            }),
        ),
        req(
            5,
            B::ChatMarkRead(v1::ChatMarkReadRequest {
                room_id: "ann~r1".into(),
                offset: 1,
            }),
        ),
        req(
            6,
            B::ContactRequest(v1::ContactRequestRequest {
                user_id: "ann".into(),
            }),
        ),
    ]);
    let cursor = v1::Datagram {
        kind: Some(v1::datagram::Kind::Cursor(v1::DocCursor {
            doc_id: "ann~d1".into(),
            revision: 1,
            anchor: 2,
            head: 4,
            ..Default::default()
        })),
    }
    .encode_to_vec();
    let typing = v1::Datagram {
        kind: Some(v1::datagram::Kind::Typing(v1::ChatTyping {
            room_id: "ann~r1".into(),
            typing: true,
            ..Default::default()
        })),
    }
    .encode_to_vec();
    let mut s = vec![0b01];
    let (ann_a, ann_b) = ann.split_at(ann.len() / 2);
    record(&mut s, 0, ann_a);
    record(&mut s, 0, ann_b);
    record(&mut s, 2, &bob);
    record(&mut s, 3, &cursor);
    record(&mut s, 1, &typing);
    record(&mut s, 4, &[]);
    out.push(("services", "ann_and_bob", s));
    let mut s = vec![0];
    record(&mut s, 0, &client_frames(&[hello()]));
    record(&mut s, 0, &[3, 0x00, 0xff, 0xff]);
    record(
        &mut s,
        0,
        &client_frames(&[req(0, B::RoomList(Default::default()))]),
    );
    record(&mut s, 0, &[0xff; 11]);
    out.push(("services", "bad_frames", s));

    // ot: a document, laws, then submissions (fitted, behind, with senders).
    let mut o = vec![0, 6, 0, 2, 4, 5, 8, 3];
    o.extend([3, 0x10, 0x0e, 0x09]); // a: retain 4, insert, delete 2
    o.extend([2, 0x05, 0x12]); // b: delete 1, insert
    o.extend([1, 0x0a]); // c: insert
    o.push(4); // history 4
    o.extend([0x02, 2, 0x0c, 0x16, 1]); // at the head, from c1 seq 1
    o.extend([0x12, 1, 0x07]); // one behind
    o.extend([0x02, 0, 1]); // c1 again: a duplicate
    o.extend([0x09, 1, 0x00, 9]); // a future revision
    out.push(("ot", "laws_and_authority", o));
    let mut o = vec![1, 3, 0, 1, 2];
    o.extend(op_to_wire(&TextOperation::new().retain(1).insert("x").delete(2)).encode_to_vec());
    out.push(("ot", "peer_op", o));

    // ot_json: operations as ot.js and the database write them.
    out.push(("ot_json", "op", br#"[3,"h\u00e9llo",-2,1]"#.to_vec()));
    out.push((
        "ot_json",
        "stored",
        br#"{"op":[5,", world"],"user":"ann","client_id":"c1","seq":1}"#.to_vec(),
    ));
    out.push(("ot_json", "bad", br#"[0,"",1.5,true,null,-0]"#.to_vec()));

    // analytics_query: the API's queries.
    out.push((
        "analytics_query",
        "series",
        b"\x00type=click&dimension=page%3Dhome&duration=2h&resolution=5m".to_vec(),
    ));
    out.push(("analytics_query", "top", b"\x01window=1h&limit=3".to_vec()));
    out.push(("analytics_query", "users", b"\x02window=1day".to_vec()));
    out
}

#[cfg(test)]
mod tests {
    //! The fuzz targets on stable: every committed corpus file, then random and
    //! mutated inputs from a fixed seed. `TUTTI_FUZZ_CASES` sets the random inputs
    //! per target (default 200); `TUTTI_WRITE_FUZZ_SEEDS=1` rewrites the seeds in
    //! `fuzz/corpus/` from [`seeds`].

    use super::*;
    use std::path::PathBuf;

    fn corpus(target: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target)
    }

    fn cases() -> usize {
        std::env::var("TUTTI_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200)
    }

    /// A xorshift generator: the same inputs on every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// A corpus file with a few bytes flipped, inserted or dropped, or random bytes.
    fn mutate(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
        let mut v = base.to_vec();
        if v.is_empty() || rng.below(4) == 0 {
            return (0..rng.below(300)).map(|_| rng.next() as u8).collect();
        }
        for _ in 0..1 + rng.below(4) {
            let i = rng.below(v.len().max(1));
            match rng.below(3) {
                0 if i < v.len() => v[i] = rng.next() as u8,
                1 => v.insert(i.min(v.len()), rng.next() as u8),
                _ if i < v.len() => {
                    v.remove(i);
                }
                _ => {}
            }
        }
        v
    }

    fn files(target: &str) -> Vec<Vec<u8>> {
        let dir = corpus(target);
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            // The committed seeds and crashes (inputs a local fuzzing run adds to
            // the folder are not read).
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
            })
            .collect();
        names.sort();
        names.iter().map(|p| std::fs::read(p).unwrap()).collect()
    }

    fn check(target: &str, random_share: usize) {
        let inputs = files(target);
        assert!(!inputs.is_empty(), "no corpus for {target}");
        for input in &inputs {
            run(target, input);
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ target.len() as u64);
        for _ in 0..cases() / random_share {
            let base = &inputs[rng.below(inputs.len())];
            run(target, &mutate(&mut rng, base));
        }
    }

    #[test]
    fn seeds_are_committed() {
        let write = std::env::var_os("TUTTI_WRITE_FUZZ_SEEDS").is_some();
        for (target, name, bytes) in seeds() {
            let path = corpus(target).join(format!("seed-{name}"));
            if write {
                std::fs::create_dir_all(corpus(target)).unwrap();
                std::fs::write(&path, &bytes).unwrap();
            } else {
                let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
                    panic!("{}: {e} (TUTTI_WRITE_FUZZ_SEEDS=1)", path.display())
                });
                assert_eq!(on_disk, bytes, "{} is stale", path.display());
            }
        }
    }

    #[test]
    fn every_target_has_a_corpus() {
        for t in TARGETS {
            assert!(!files(t).is_empty(), "{t}");
        }
    }

    #[test]
    fn fuzz_framing() {
        check("framing", 1);
    }

    #[test]
    fn fuzz_services() {
        // Each input opens a database: fewer of them.
        check("services", 4);
    }

    #[test]
    fn the_services_seeds_reach_the_services() {
        let seed = |name: &str| seeds().into_iter().find(|s| s.1 == name).expect("a seed").2;
        let report = runtime().block_on(services_async(&seed("ann_and_bob")));
        assert!(report.errors.is_empty(), "{report:?}");
        assert_eq!(report.ok.len(), 17, "{report:?}");
        let report = runtime().block_on(services_async(&seed("bad_frames")));
        assert!(
            report.ok.is_empty() && report.errors.is_empty(),
            "{report:?}"
        );
    }

    #[test]
    fn fuzz_ot() {
        check("ot", 1);
    }

    #[test]
    fn fuzz_ot_json() {
        check("ot_json", 1);
    }

    #[test]
    fn fuzz_analytics_query() {
        check("analytics_query", 4);
    }
}
