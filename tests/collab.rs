//! Collaborative editing through the real server: concurrent typing by clients on
//! mixed transports converging with the server and with the stored copy after a
//! restart; resends applied once; viewers refused; resync; presence and cursors;
//! each user's document list with their roles, kept live by `DocShared` pushes.

mod support;

use support::typing::{follow_until, submit, type_concurrently};

use std::collections::HashMap;
use std::time::Duration;

use support::{TestServer, test_config};
use tutti::client::collab::Document;
use tutti::client::{Client, ClientError, Event};
use tutti::ot::TextOperation;
use tutti::protocol::ErrorCode;
use tutti::protocol::v1::{self, DocRole, StreamKind, doc_open_response, push, request, response};
use tutti::transport::TransportKind;

async fn create(c: &Client, doc_id: &str, text: &str) {
    match c
        .request(request::Body::DocCreate(v1::DocCreateRequest {
            doc_id: doc_id.into(),
            text: text.into(),
        }))
        .await
        .unwrap()
    {
        // A chosen id is namespaced per creator.
        response::Body::DocCreate(r) => {
            assert_eq!(r.doc_id, format!("{}~{doc_id}", c.welcome().user_id))
        }
        other => panic!("{other:?}"),
    }
}

async fn share(c: &Client, doc_id: &str, user: &str, role: DocRole) {
    c.request(request::Body::DocShare(v1::DocShareRequest {
        doc_id: doc_id.into(),
        user_id: user.into(),
        role: role as i32,
    }))
    .await
    .unwrap();
}

async fn open(
    c: &Client,
    doc_id: &str,
    known: Option<u64>,
) -> Result<v1::DocOpenResponse, ClientError> {
    match c
        .request(request::Body::DocOpen(v1::DocOpenRequest {
            doc_id: doc_id.into(),
            known_revision: known,
        }))
        .await?
    {
        response::Body::DocOpen(r) => Ok(r),
        other => panic!("{other:?}"),
    }
}

async fn list(c: &Client) -> v1::DocListResponse {
    match c
        .request(request::Body::DocList(v1::DocListRequest {}))
        .await
        .unwrap()
    {
        response::Body::DocList(r) => r,
        other => panic!("{other:?}"),
    }
}

/// (doc id, owner, role, revision) of each listed document, in order.
fn summaries(r: &v1::DocListResponse) -> Vec<(&str, &str, DocRole, u64)> {
    r.docs
        .iter()
        .map(|d| (d.doc_id.as_str(), d.owner_id.as_str(), d.role(), d.revision))
        .collect()
}

/// Waits for the next `DocShared` push, skipping other events.
async fn next_shared(c: &Client) -> v1::DocShared {
    loop {
        match c.next_event().await {
            Some(Event::Push(StreamKind::Collab, p)) => {
                if let Some(push::Event::DocShared(s)) = p.event {
                    return s;
                }
            }
            Some(_) => {}
            None => panic!("session closed"),
        }
    }
}

fn server_error(r: Result<impl std::fmt::Debug, ClientError>) -> v1::Error {
    match r {
        Err(ClientError::Server(e)) => e,
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_editors_on_mixed_transports_converge_and_survive_a_restart() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let dir = tempfile::tempdir().unwrap();
        let server = tutti::start(test_config(dir.path())).await.unwrap();
        let s = support::TestServer {
            server: Some(server),
            dir,
        };
        let alice = s.connect(TransportKind::Quic, "alice").await;
        create(&alice, "notes", "héllo 🌍").await;
        for u in ["bob", "carol"] {
            share(&alice, "alice~notes", u, DocRole::Editor).await;
        }
        share(&alice, "alice~notes", "dave", DocRole::Viewer).await;
        let bob = s.connect(TransportKind::WebTransport, "bob").await;
        let carol = s.connect(TransportKind::Quic, "carol").await;
        let clients = [(&alice, "alice-1"), (&bob, "bob-1"), (&carol, "carol-1")];
        let mut docs = Vec::new();
        for (c, id) in clients {
            docs.push(
                Document::from_open(id, open(c, "alice~notes", None).await.unwrap()).unwrap(),
            );
        }
        let [da, db, dc] = &mut docs[..] else {
            unreachable!()
        };
        // One edit each on the same revision, all sent before anyone hears of the
        // others: at least two of them must be transformed.
        let first: Vec<_> = [&mut *da, &mut *db, &mut *dc]
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                let len = d.text().chars().count();
                let op = TextOperation::new()
                    .retain(len)
                    .insert(["α", "🎉", "e\u{301}"][i]);
                d.edit(op).unwrap().unwrap()
            })
            .collect();
        let (r1, r2, r3) = tokio::join!(
            submit(&alice, first[0].clone()),
            submit(&bob, first[1].clone()),
            submit(&carol, first[2].clone()),
        );
        for r in [r1, r2, r3] {
            r.unwrap();
        }
        let (last_a, _, last_c) = tokio::join!(
            type_concurrently(&alice, da, 150, 1),
            type_concurrently(&bob, db, 150, 2),
            type_concurrently(&carol, dc, 150, 3),
        );
        // Everyone has had every own edit acknowledged; fetch the server's copy.
        let check = s.connect(TransportKind::Quic, "alice").await;
        let truth = open(&check, "alice~notes", None).await.unwrap();
        let Some(doc_open_response::State::Snapshot(text)) = truth.state else {
            panic!()
        };
        // Edits made while one is in flight are composed: at most one revision each.
        assert!(
            truth.revision >= 6 && truth.revision <= 453,
            "{}",
            truth.revision
        );
        for (doc, (c, _)) in docs.iter_mut().zip(clients) {
            follow_until(c, doc, truth.revision).await;
            assert_eq!(doc.text(), text, "client {} diverged", doc.client_id());
        }
        let metrics = s.http_get("/metrics").await.1;
        assert!(
            metrics.contains(&format!(
                "tutti_collab_operations_applied_total {}",
                truth.revision
            )),
            "{metrics}"
        );
        let transformed: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("tutti_collab_operations_transformed_total "))
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            transformed >= 2,
            "concurrent edits were transformed: {transformed}"
        );

        // A resend of an applied operation is acknowledged again, not applied.
        let ack = submit(&alice, last_a.clone()).await.unwrap();
        assert!(ack.duplicate);
        assert!(ack.revision <= truth.revision);
        assert_eq!(
            open(&check, "alice~notes", None).await.unwrap().revision,
            truth.revision
        );

        // A viewer is refused.
        let dave = s.connect(TransportKind::WebTransport, "dave").await;
        let dave_doc =
            Document::from_open("dave-1", open(&dave, "alice~notes", None).await.unwrap()).unwrap();
        assert_eq!(dave_doc.role(), DocRole::Viewer);
        let refused = submit(
            &dave,
            v1::DocSubmitRequest {
                doc_id: "alice~notes".into(),
                base_revision: truth.revision,
                op: Some(tutti::protocol::ot_wire::op_to_wire(
                    &TextOperation::new()
                        .retain(text.chars().count())
                        .insert("!"),
                )),
                client_id: "dave-1".into(),
                seq: 1,
            },
        )
        .await;
        assert_eq!(
            server_error(refused).error_code(),
            Some(ErrorCode::PermissionDenied)
        );

        // Someone the document was not shared with cannot learn it exists.
        let eve = s.connect(TransportKind::Quic, "eve").await;
        let hidden = server_error(open(&eve, "alice~notes", None).await);
        let missing = server_error(open(&eve, "no-such-doc", None).await);
        assert_eq!(hidden.error_code(), Some(ErrorCode::NotFound));
        assert_eq!(hidden.message, missing.message);

        // Restart on the same data directory: the same text at the same revision.
        drop((alice, bob, carol, check, dave, eve));
        let mut s = s;
        s.shutdown().await;
        let server = tutti::start(test_config(s.dir.path())).await.unwrap();
        let s = support::TestServer {
            server: Some(server),
            dir: s.dir,
        };
        let reader = s.connect(TransportKind::WebTransport, "carol").await;
        let reopened = open(&reader, "alice~notes", None).await.unwrap();
        assert_eq!(reopened.revision, truth.revision);
        assert_eq!(
            reopened.state,
            Some(doc_open_response::State::Snapshot(text.clone()))
        );
        // The resend is still recognised after the restart.
        let again = last_c;
        assert!(submit(&reader, again).await.unwrap().duplicate);
    })
    .await
    .expect("test timed out");
}

both_transports!(
    reconnect_catches_up_and_resends_once,
    stale_base_revision_gets_a_resync_snapshot,
    presence_and_cursors_reach_the_others,
    malformed_operations_are_refused_with_codes,
    doc_list_shows_each_users_documents_and_roles,
    another_editor_cannot_reuse_a_client_id,
    a_revoked_editor_stops_receiving_the_document,
    a_burst_of_edits_into_one_document_shares_commits,
);

/// Operations that arrive while a document's commit is paced share the next
/// commit: a burst from every editor at once, each made on the same revision,
/// is stored in a few writes, each answered with its own revision, and every
/// editor follows all of them to the text the server stores.
async fn a_burst_of_edits_into_one_document_shares_commits(t: TransportKind) {
    const USERS: usize = 6;
    const EACH: usize = 8;
    // The longest pacing: an operation that waited for a commit of its own
    // would take a tenth of a second each.
    let s = TestServer::start_with(|c| c.commit_interval = Duration::from_millis(100)).await;
    let mut clients = Vec::new();
    for u in 0..USERS {
        clients.push(s.connect(t, &format!("u{u}")).await);
    }
    create(&clients[0], "busy", "").await;
    let mut docs = Vec::new();
    for (u, c) in clients.iter().enumerate() {
        if u > 0 {
            share(&clients[0], "u0~busy", &format!("u{u}"), DocRole::Editor).await;
        }
        let opened = open(c, "u0~busy", None).await.unwrap();
        docs.push(Document::from_open(format!("follow-{u}"), opened).unwrap());
    }
    let before = s.server().metrics().value("writes.committed").unwrap();
    // Each from a client of its own, all made on revision 0.
    let burst = clients.iter().enumerate().flat_map(|(u, c)| {
        (0..EACH).map(move |i| {
            let req = v1::DocSubmitRequest {
                doc_id: "u0~busy".into(),
                client_id: format!("c{u}-{i}"),
                seq: 1,
                base_revision: 0,
                op: Some(tutti::protocol::ot_wire::op_to_wire(
                    &TextOperation::new().insert(&format!("<{u}.{i}>")),
                )),
            };
            submit(c, req)
        })
    });
    let answers = futures_util::future::join_all(burst).await;
    let writes = s.server().metrics().value("writes.committed").unwrap() - before;
    let mut revisions: Vec<u64> = answers
        .into_iter()
        .map(|r| {
            let r = r.expect("every operation is applied");
            assert!(!r.duplicate);
            r.revision
        })
        .collect();
    revisions.sort_unstable();
    let total = (USERS * EACH) as u64;
    assert_eq!(revisions, (1..=total).collect::<Vec<_>>());
    assert!(
        writes <= (total / 4) as f64,
        "{total} operations took {writes} writes"
    );
    let stored = match open(&clients[0], "u0~busy", None).await.unwrap().state {
        Some(doc_open_response::State::Snapshot(text)) => text,
        other => panic!("{other:?}"),
    };
    for u in 0..USERS {
        for i in 0..EACH {
            assert!(stored.contains(&format!("<{u}.{i}>")), "{stored}");
        }
    }
    for (c, doc) in clients.iter().zip(&mut docs) {
        follow_until(c, doc, total).await;
        assert_eq!(doc.text(), stored, "converged on the stored text");
    }
}

/// Revoking a share closes the document for the user's open sessions: they get the
/// `DocShared` push with no role, then none of its operations; the others see them
/// leave; their edits are refused.
async fn a_revoked_editor_stops_receiving_the_document(t: TransportKind) {
    let s = TestServer::start().await;
    let ann = s.connect(t, "ann").await;
    create(&ann, "d", "ab").await;
    create(&ann, "marker", "").await;
    share(&ann, "ann~d", "bob", DocRole::Editor).await;
    let bob = s.connect(t, "bob").await;
    let opened = open(&bob, "ann~d", None).await.unwrap();
    let mut doc = Document::from_open("ann-1", open(&ann, "ann~d", None).await.unwrap()).unwrap();
    share(&ann, "ann~d", "bob", DocRole::Unspecified).await;
    // Ann sees Bob leave.
    loop {
        if let Some(Event::Push(
            _,
            v1::Push {
                event: Some(push::Event::DocPresence(p)),
                ..
            },
        )) = ann.next_event().await
            && p.user_id == "bob"
            && !p.joined
        {
            break;
        }
    }
    // An edit after the revoke, then a marker share: Bob's collaboration stream is
    // ordered, so whatever reached him about `d` came before the marker.
    let req = doc
        .edit(TextOperation::new().retain(2).insert("!"))
        .unwrap()
        .unwrap();
    submit(&ann, req).await.unwrap();
    share(&ann, "ann~marker", "bob", DocRole::Viewer).await;
    let mut revoked = false;
    loop {
        match bob.next_event().await.expect("session open") {
            Event::Push(
                _,
                v1::Push {
                    event: Some(push::Event::DocShared(sh)),
                    ..
                },
            ) => {
                if sh.doc_id == "ann~d" {
                    assert_eq!(sh.role, DocRole::Unspecified as i32);
                    revoked = true;
                } else {
                    assert_eq!(sh.doc_id, "ann~marker");
                    break;
                }
            }
            Event::Push(
                _,
                v1::Push {
                    event: Some(push::Event::DocOperation(op)),
                    ..
                },
            ) => panic!("a revoked editor received {op:?}"),
            _ => {}
        }
    }
    assert!(revoked, "Bob was told");
    // His edits are refused like an outsider's.
    let forged = v1::DocSubmitRequest {
        doc_id: "ann~d".into(),
        base_revision: opened.revision,
        op: Some(tutti::protocol::ot_wire::op_to_wire(
            &TextOperation::new().retain(2).insert("?"),
        )),
        client_id: "bob-1".into(),
        seq: 1,
    };
    assert_eq!(server_error(submit(&bob, forged).await).name, "NOT_FOUND");
}

/// Client ids are broadcast to every editor. Another editor who submits under a
/// victim's client id neither makes the victim's next edit count as a duplicate
/// (silently dropped) nor blocks it as an old seq: deduplication is per user.
async fn another_editor_cannot_reuse_a_client_id(t: TransportKind) {
    let s = TestServer::start().await;
    let ann = s.connect(t, "ann").await;
    create(&ann, "d", "ab").await;
    share(&ann, "ann~d", "bob", DocRole::Editor).await;
    let bob = s.connect(t, "bob").await;
    let mut doc =
        Document::from_open("ann-laptop", open(&ann, "ann~d", None).await.unwrap()).unwrap();
    let base = open(&bob, "ann~d", None).await.unwrap().revision;
    // Bob forges Ann's client id with her next seq, and with a far later one.
    for seq in [1, 100] {
        let forged = v1::DocSubmitRequest {
            doc_id: "ann~d".into(),
            base_revision: base,
            op: Some(tutti::protocol::ot_wire::op_to_wire(
                &TextOperation::new().retain(2).insert("X"),
            )),
            client_id: "ann-laptop".into(),
            seq,
        };
        let r = submit(&bob, forged).await.unwrap();
        assert!(!r.duplicate, "Bob's own edit {seq} is applied");
    }
    // Ann's first edit is applied, not taken for a duplicate or an old seq.
    let req = doc
        .edit(TextOperation::new().insert("A").retain(2))
        .unwrap()
        .unwrap();
    assert_eq!(req.seq, 1);
    let r = submit(&ann, req.clone()).await.unwrap();
    assert!(!r.duplicate, "Ann's edit was taken for Bob's");
    assert_eq!(r.revision, base + 3);
    // Her own resend is still recognised.
    assert!(submit(&ann, req).await.unwrap().duplicate);
    match open(&ann, "ann~d", None).await.unwrap().state {
        Some(doc_open_response::State::Snapshot(text)) => assert_eq!(text, "AabXX"),
        other => panic!("{other:?}"),
    }
}

async fn reconnect_catches_up_and_resends_once(t: TransportKind) {
    let s = TestServer::start().await;
    let alice = s.connect(t, "alice").await;
    create(&alice, "d", "abc").await;
    share(&alice, "alice~d", "bob", DocRole::Editor).await;
    let bob = s.connect(t, "bob").await;
    let mut doc =
        Document::from_open("bob-phone", open(&bob, "alice~d", None).await.unwrap()).unwrap();
    // Bob's edit is sent, but the session drops before he sees the acknowledgement.
    let req = doc
        .edit(TextOperation::new().retain(3).insert("!"))
        .unwrap()
        .unwrap();
    submit(&bob, req).await.unwrap();
    drop(bob);
    // Alice edits meanwhile.
    let mut adoc =
        Document::from_open("alice-1", open(&alice, "alice~d", None).await.unwrap()).unwrap();
    follow_until(&alice, &mut adoc, 1).await;
    let req = adoc
        .edit(TextOperation::new().insert(">").retain(4))
        .unwrap()
        .unwrap();
    submit(&alice, req).await.unwrap();

    // Bob reconnects with his last revision: he receives what he missed, his own
    // operation among it, and has nothing left to resend.
    let bob = s.connect(t, "bob").await;
    let caught = open(&bob, "alice~d", Some(doc.revision())).await.unwrap();
    assert!(matches!(
        caught.state,
        Some(doc_open_response::State::CatchUp(_))
    ));
    let resend = doc.catch_up(caught).unwrap();
    assert!(resend.is_none(), "the operation was applied once already");
    assert_eq!(doc.text(), ">abc!");
    assert_eq!(doc.revision(), 2);

    // An operation sent twice (the reply lost) is applied once.
    let req = doc
        .edit(TextOperation::new().retain(5).insert("?"))
        .unwrap()
        .unwrap();
    let first = submit(&bob, req.clone()).await.unwrap();
    let second = submit(&bob, req).await.unwrap();
    assert_eq!((first.duplicate, second.duplicate), (false, true));
    assert_eq!(first.revision, second.revision);
    let fresh = open(&alice, "alice~d", None).await.unwrap();
    assert_eq!(
        fresh.state,
        Some(doc_open_response::State::Snapshot(">abc!?".into()))
    );
}

async fn stale_base_revision_gets_a_resync_snapshot(t: TransportKind) {
    let s = TestServer::start_with(|c| c.collab.history = 3).await;
    let alice = s.connect(t, "alice").await;
    create(&alice, "d", "").await;
    let mut doc = Document::from_open("a", open(&alice, "alice~d", None).await.unwrap()).unwrap();
    for i in 0..5 {
        let len = doc.text().chars().count();
        let req = doc
            .edit(TextOperation::new().retain(len).insert("x"))
            .unwrap()
            .unwrap();
        submit(&alice, req).await.unwrap();
        follow_until(&alice, &mut doc, i + 1).await;
    }
    let stale = v1::DocSubmitRequest {
        doc_id: "alice~d".into(),
        base_revision: 0,
        op: Some(tutti::protocol::ot_wire::op_to_wire(
            &TextOperation::new().insert("y"),
        )),
        client_id: "old".into(),
        seq: 1,
    };
    let err = server_error(submit(&alice, stale).await);
    assert_eq!(err.error_code(), Some(ErrorCode::ResyncRequired));
    match err.detail {
        Some(v1::error::Detail::Resync(snap)) => {
            assert_eq!((snap.revision, snap.text.as_str()), (5, "xxxxx"));
        }
        other => panic!("{other:?}"),
    }
    // Too far behind for a catch-up: reopening gives the snapshot.
    let reopened = open(&alice, "alice~d", Some(1)).await.unwrap();
    assert!(matches!(
        reopened.state,
        Some(doc_open_response::State::Snapshot(_))
    ));
    assert!(
        s.http_get("/metrics")
            .await
            .1
            .contains("tutti_collab_resyncs_total 1")
    );
}

async fn presence_and_cursors_reach_the_others(t: TransportKind) {
    let s = TestServer::start_with(|c| c.collab.cursor_settle = Duration::from_millis(50)).await;
    let alice = s.connect(t, "alice").await;
    create(&alice, "d", "hello").await;
    share(&alice, "alice~d", "bob", DocRole::Editor).await;
    open(&alice, "alice~d", None).await.unwrap();
    let bob = s.connect(t, "bob").await;
    let opened = open(&bob, "alice~d", None).await.unwrap();
    assert_eq!(opened.participants.len(), 1);
    assert_eq!(opened.participants[0].user_id, "alice");

    let mut seen = HashMap::new();
    // Alice sees Bob join, then his cursor (a datagram, then reliably once it stops).
    let cursor = v1::datagram::Kind::Cursor(v1::DocCursor {
        doc_id: "alice~d".into(),
        revision: 0,
        anchor: 1,
        head: 3,
        ..Default::default()
    });
    // Datagrams may be lost: Bob repeats his (unchanged) cursor until Alice has it.
    let mut resend = tokio::time::interval(Duration::from_millis(100));
    while !(seen.contains_key("joined") && seen.contains_key("settled")) {
        let ev = tokio::select! {
            _ = resend.tick() => {
                bob.send_datagram(cursor.clone()).unwrap();
                continue;
            }
            ev = alice.next_event() => ev.expect("open session"),
        };
        match ev {
            Event::Push(StreamKind::Collab, p) => match p.event {
                Some(push::Event::DocPresence(pr)) if pr.joined && pr.user_id == "bob" => {
                    seen.insert("joined", ());
                }
                Some(push::Event::DocCursor(c)) => {
                    assert_eq!((c.user_id.as_str(), c.anchor, c.head), ("bob", 1, 3));
                    seen.insert("settled", ());
                }
                _ => {}
            },
            Event::Datagram(v1::datagram::Kind::Cursor(c)) => {
                assert_eq!(c.user_id, "bob");
            }
            _ => {}
        }
    }
    // Bob's session ends: Alice sees him leave.
    drop(bob);
    loop {
        if let Some(Event::Push(_, p)) = alice.next_event().await
            && let Some(push::Event::DocPresence(pr)) = p.event
            && !pr.joined
        {
            assert_eq!(pr.user_id, "bob");
            break;
        }
    }
}

async fn malformed_operations_are_refused_with_codes(t: TransportKind) {
    let s = TestServer::start().await;
    let alice = s.connect(t, "alice").await;
    create(&alice, "d", "abc").await;
    // Not opened in this session.
    let req = |op: Option<v1::TextOp>, seq| v1::DocSubmitRequest {
        doc_id: "alice~d".into(),
        base_revision: 0,
        op,
        client_id: "c".into(),
        seq,
    };
    let op = tutti::protocol::ot_wire::op_to_wire(&TextOperation::new().retain(3).insert("x"));
    assert_eq!(
        server_error(submit(&alice, req(Some(op.clone()), 1)).await).error_code(),
        Some(ErrorCode::NotFound)
    );
    open(&alice, "alice~d", None).await.unwrap();
    // Wrong length for the document.
    let long = tutti::protocol::ot_wire::op_to_wire(&TextOperation::new().retain(10));
    assert_eq!(
        server_error(submit(&alice, req(Some(long), 1)).await).error_code(),
        Some(ErrorCode::InvalidOperation)
    );
    // An empty component.
    let empty = v1::TextOp {
        components: vec![v1::OpComponent { kind: None }],
    };
    assert_eq!(
        server_error(submit(&alice, req(Some(empty), 1)).await).error_code(),
        Some(ErrorCode::InvalidOperation)
    );
    // seq 0 and a base revision from the future.
    assert_eq!(
        server_error(submit(&alice, req(Some(op.clone()), 0)).await).error_code(),
        Some(ErrorCode::BadRequest)
    );
    let mut future = req(Some(op), 1);
    future.base_revision = 99;
    assert_eq!(
        server_error(submit(&alice, future).await).error_code(),
        Some(ErrorCode::BadRequest)
    );
    // Bad ids.
    let bad = server_error(
        alice
            .request(request::Body::DocCreate(v1::DocCreateRequest {
                doc_id: "no spaces".into(),
                text: String::new(),
            }))
            .await,
    );
    assert_eq!(bad.error_code(), Some(ErrorCode::BadRequest));
    let taken = server_error(
        alice
            .request(request::Body::DocCreate(v1::DocCreateRequest {
                doc_id: "d".into(),
                text: String::new(),
            }))
            .await,
    );
    assert_eq!(taken.error_code(), Some(ErrorCode::Conflict));
    assert!(
        s.http_get("/metrics")
            .await
            .1
            .contains("tutti_collab_operations_rejected_total 5")
    );
}

async fn doc_list_shows_each_users_documents_and_roles(t: TransportKind) {
    use DocRole::{Editor, Owner, Unspecified, Viewer};
    let s = TestServer::start_with(|c| c.collab.max_list_docs = 2).await;
    let alice = s.connect(t, "alice").await;
    let bob = s.connect(t, "bob").await;
    let carol = s.connect(t, "carol").await;
    let dave = s.connect(t, "dave").await;
    create(&alice, "b-notes", "").await;
    create(&alice, "a-plan", "abc").await;
    create(&bob, "c-bob", "").await;
    // Nothing shared yet: each sees only their own.
    assert_eq!(
        summaries(&list(&alice).await),
        [
            ("alice~a-plan", "alice", Owner, 0),
            ("alice~b-notes", "alice", Owner, 0)
        ]
    );
    assert!(list(&carol).await.docs.is_empty());

    share(&alice, "alice~a-plan", "bob", Editor).await;
    share(&alice, "alice~a-plan", "carol", Viewer).await;
    share(&alice, "alice~b-notes", "carol", Editor).await;
    // Bob and Carol hear of it live, on every session.
    let pushed = next_shared(&bob).await;
    assert_eq!(
        (
            pushed.doc_id.as_str(),
            pushed.owner_id.as_str(),
            pushed.role()
        ),
        ("alice~a-plan", "alice", Editor)
    );
    let pushed = next_shared(&carol).await;
    assert_eq!(
        (pushed.doc_id.as_str(), pushed.role()),
        ("alice~a-plan", Viewer)
    );
    let pushed = next_shared(&carol).await;
    assert_eq!(
        (pushed.doc_id.as_str(), pushed.role()),
        ("alice~b-notes", Editor)
    );

    // An edit moves the listed revision.
    let mut doc =
        Document::from_open("a", open(&alice, "alice~a-plan", None).await.unwrap()).unwrap();
    let req = doc
        .edit(TextOperation::new().retain(3).insert("!"))
        .unwrap()
        .unwrap();
    assert_eq!(submit(&alice, req).await.unwrap().revision, 1);

    let mine = list(&alice).await;
    assert_eq!(
        summaries(&mine),
        [
            ("alice~a-plan", "alice", Owner, 1),
            ("alice~b-notes", "alice", Owner, 0)
        ]
    );
    assert!(!mine.more);
    assert_eq!(
        summaries(&list(&bob).await),
        [
            ("alice~a-plan", "alice", Editor, 1),
            ("bob~c-bob", "bob", Owner, 0)
        ]
    );
    assert_eq!(
        summaries(&list(&carol).await),
        [
            ("alice~a-plan", "alice", Viewer, 1),
            ("alice~b-notes", "alice", Editor, 0)
        ]
    );
    let outsider = list(&dave).await;
    assert!(outsider.docs.is_empty() && !outsider.more);

    // Bounded: the first `max_list_docs` by id, and `more` says there are others.
    create(&alice, "0-first", "").await;
    let capped = list(&alice).await;
    assert_eq!(
        summaries(&capped),
        [
            ("alice~0-first", "alice", Owner, 0),
            ("alice~a-plan", "alice", Owner, 1)
        ]
    );
    assert!(capped.more);

    // A role change and a revoke show at once, and are pushed.
    share(&alice, "alice~a-plan", "bob", Viewer).await;
    assert_eq!(next_shared(&bob).await.role(), Viewer);
    share(&alice, "alice~a-plan", "carol", Unspecified).await;
    let revoked = next_shared(&carol).await;
    assert_eq!(
        (revoked.doc_id.as_str(), revoked.role()),
        ("alice~a-plan", Unspecified)
    );
    assert_eq!(
        summaries(&list(&bob).await),
        [
            ("alice~a-plan", "alice", Viewer, 1),
            ("bob~c-bob", "bob", Owner, 0)
        ]
    );
    assert_eq!(
        summaries(&list(&carol).await),
        [("alice~b-notes", "alice", Editor, 0)]
    );
    // Revoking someone who has no access changes nothing.
    share(&alice, "alice~a-plan", "dave", Unspecified).await;
    assert!(list(&dave).await.docs.is_empty());
}

/// A database written before the user → document index was kept: the index is
/// built from the documents when the node opens it, so nobody's list is empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doc_list_covers_documents_stored_before_the_index() {
    tokio::time::timeout(support::TEST_TIMEOUT, async {
        let mut s = TestServer::start().await;
        let alice = s.connect(TransportKind::Quic, "alice").await;
        create(&alice, "old", "text").await;
        share(&alice, "alice~old", "bob", DocRole::Viewer).await;
        let db_file = s.server().config().data_dir.join(tutti::store::DB_FILE);
        drop(alice);
        s.shutdown().await;
        {
            let db = redb::Database::open(&db_file).unwrap();
            let txn = db.begin_write().unwrap();
            let index: redb::TableDefinition<(&str, &str), (i32, &str)> =
                redb::TableDefinition::new("collab_user_docs");
            assert!(txn.delete_table(index).unwrap(), "the index existed");
            txn.commit().unwrap();
        }
        let server = tutti::start(test_config(s.dir.path())).await.unwrap();
        let s = TestServer {
            server: Some(server),
            dir: s.dir,
        };
        let bob = s.connect(TransportKind::WebTransport, "bob").await;
        assert_eq!(
            summaries(&list(&bob).await),
            [("alice~old", "alice", DocRole::Viewer, 0)]
        );
        let alice = s.connect(TransportKind::Quic, "alice").await;
        assert_eq!(
            summaries(&list(&alice).await),
            [("alice~old", "alice", DocRole::Owner, 0)]
        );
    })
    .await
    .expect("test timed out");
}

// ---- Ids: chosen document ids are namespaced per creator -------------------------

both_transports!(chosen_doc_ids_are_namespaced_per_creator);

/// Two users choosing the same document name get two documents; only the creator's
/// own earlier one conflicts; a generated id is plain. An outsider asking about
/// someone else's document gets the answer it would get for a missing one.
async fn chosen_doc_ids_are_namespaced_per_creator(t: TransportKind) {
    let s = TestServer::start().await;
    let alice = s.connect(t, "alice").await;
    let eve = s.connect(t, "eve").await;
    create(&alice, "notes", "alice's").await;
    create(&eve, "notes", "eve's").await;
    let again = alice
        .request(request::Body::DocCreate(v1::DocCreateRequest {
            doc_id: "notes".into(),
            text: String::new(),
        }))
        .await;
    assert_eq!(server_error(again).error_code(), Some(ErrorCode::Conflict));
    for bad in ["alice~notes", "x~y"] {
        let r = eve
            .request(request::Body::DocCreate(v1::DocCreateRequest {
                doc_id: bad.into(),
                text: String::new(),
            }))
            .await;
        assert_eq!(server_error(r).error_code(), Some(ErrorCode::BadRequest));
    }
    match eve
        .request(request::Body::DocCreate(v1::DocCreateRequest::default()))
        .await
        .unwrap()
    {
        response::Body::DocCreate(r) => assert!(!r.doc_id.contains('~')),
        other => panic!("{other:?}"),
    }
    match open(&eve, "eve~notes", None).await.unwrap().state {
        Some(doc_open_response::State::Snapshot(text)) => assert_eq!(text, "eve's"),
        other => panic!("{other:?}"),
    }
    let there = server_error(open(&eve, "alice~notes", None).await);
    let absent = server_error(open(&eve, "alice~absent", None).await);
    assert_eq!(there, absent);
    assert_eq!(there.error_code(), Some(ErrorCode::NotFound));
}
