//! Write rate limits, presence fan-out bounds and retention through the real
//! server: per-user token buckets answered `RATE_LIMITED` with a retry hint, a
//! presence change pushed to at most `presence.max_fanout` users, analytics caps
//! per user, and the retention task removing old messages, notifications, empty
//! rooms and collaboration bookkeeping, with a client that resumes from a removed
//! offset told so (`HistoryTruncated`) instead of seeing a silent gap.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use redb::TableDefinition;
use support::TestServer;
use tutti::client::{Client, ClientError, Event};
use tutti::clock::Clock;
use tutti::ot::TextOperation;
use tutti::protocol::ErrorCode;
use tutti::protocol::v1::{self, DocRole, PresenceStatus, StreamKind, push, request, response};
use tutti::services::rate::Rate;
use tutti::transport::TransportKind;

const T0: u64 = 1_800_000_000_000;
const HOUR: u64 = 3_600_000;

async fn req(c: &Client, body: request::Body) -> Result<response::Body, ClientError> {
    c.request(body).await
}

fn server_error(r: Result<impl std::fmt::Debug, ClientError>) -> v1::Error {
    match r {
        Err(ClientError::Server(e)) => e,
        other => panic!("expected a server error, got {other:?}"),
    }
}

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    server_error(r).error_code().expect("a known code")
}

async fn create_room(c: &Client, id: &str, others: &[&str]) -> Result<v1::Room, ClientError> {
    match req(
        c,
        request::Body::RoomCreate(v1::RoomCreateRequest {
            room_id: id.into(),
            name: id.into(),
            participants: others.iter().map(|s| s.to_string()).collect(),
        }),
    )
    .await?
    {
        response::Body::RoomCreate(r) => Ok(r.room.unwrap()),
        other => panic!("{other:?}"),
    }
}

async fn send(c: &Client, room: &str, text: &str) -> Result<v1::ChatMessage, ClientError> {
    match req(
        c,
        request::Body::ChatSend(v1::ChatSendRequest {
            room_id: room.into(),
            text: text.into(),
            ..Default::default()
        }),
    )
    .await?
    {
        response::Body::ChatSend(r) => Ok(r.message.unwrap()),
        other => panic!("{other:?}"),
    }
}

async fn history(c: &Client, room: &str, before: u64) -> v1::ChatHistoryResponse {
    match req(
        c,
        request::Body::ChatHistory(v1::ChatHistoryRequest {
            room_id: room.into(),
            before_offset: before,
            limit: 100,
        }),
    )
    .await
    .unwrap()
    {
        response::Body::ChatHistory(r) => r,
        other => panic!("{other:?}"),
    }
}

async fn set_presence(c: &Client, status: PresenceStatus) -> Result<(), ClientError> {
    req(
        c,
        request::Body::PresenceSet(v1::PresenceSetRequest {
            status: status as i32,
        }),
    )
    .await
    .map(drop)
}

fn offsets(messages: &[v1::ChatMessage]) -> Vec<u64> {
    messages.iter().map(|m| m.offset).collect()
}

/// Pushes of `kind` until `stop` says the last one was the last wanted.
async fn pushes_until(
    c: &Client,
    kind: StreamKind,
    mut stop: impl FnMut(&v1::Push) -> bool,
) -> Vec<v1::Push> {
    let mut out = Vec::new();
    loop {
        match c.next_event().await.expect("session open") {
            Event::Push(k, p) if k == kind => {
                let done = stop(&p);
                out.push(p);
                if done {
                    return out;
                }
            }
            _ => {}
        }
    }
}

both_transports!(
    chat_sends_are_limited_per_user_with_a_retry_hint,
    a_resume_from_a_removed_offset_is_told_the_first_kept_one,
);

async fn chat_sends_are_limited_per_user_with_a_retry_hint(t: TransportKind) {
    let clock = Clock::manual(T0);
    let s = TestServer::start_with_clock(clock.clone(), |c| {
        c.limits.rate.chat_send = Rate::new(3, 2.0);
    })
    .await;
    let ann = s.connect(t, "ann").await;
    let ann_phone = s.connect(t, "ann").await;
    let bob = s.connect(t, "bob").await;
    create_room(&ann, "r", &["bob"]).await.unwrap();
    for i in 0..3 {
        send(&ann, "ann~r", &format!("m{i}")).await.unwrap();
    }
    let refused = server_error(send(&ann, "ann~r", "one too many").await);
    assert_eq!(refused.error_code(), Some(ErrorCode::RateLimited));
    assert_eq!(refused.retry_after_ms, 500, "one token every 500 ms");
    // The limit is the user's, whichever device sends.
    assert_eq!(
        code(send(&ann_phone, "ann~r", "from the phone").await),
        ErrorCode::RateLimited
    );
    // Others are not held back.
    send(&bob, "ann~r", "hi").await.unwrap();
    // Refused sends stored nothing: the next offsets follow the accepted ones.
    clock.advance(500);
    let next = send(&ann_phone, "ann~r", "later").await.unwrap();
    assert_eq!(next.offset, 5);
    assert_eq!(
        offsets(&history(&bob, "ann~r", 0).await.messages),
        [1, 2, 3, 4, 5]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_limited_write_answers_rate_limited() {
    tokio::time::timeout(support::TEST_TIMEOUT, async {
        let clock = Clock::manual(T0);
        let one = Rate::new(1, 0.001);
        let s = TestServer::start_with_clock(clock.clone(), |c| {
            c.limits.rate.room_create = one;
            c.limits.rate.contact_request = one;
            c.limits.rate.presence_set = one;
            c.limits.rate.doc_submit = one;
        })
        .await;
        let ann = s.connect(TransportKind::Quic, "ann").await;
        create_room(&ann, "a", &[]).await.unwrap();
        let e = server_error(create_room(&ann, "b", &[]).await);
        assert_eq!(e.error_code(), Some(ErrorCode::RateLimited));
        assert!(e.retry_after_ms > 0);

        let contact = |user: &str| {
            request::Body::ContactRequest(v1::ContactRequestRequest {
                user_id: user.into(),
            })
        };
        req(&ann, contact("bob")).await.unwrap();
        assert_eq!(
            code(req(&ann, contact("cat")).await),
            ErrorCode::RateLimited
        );
        // A bad request is refused as such, and costs nothing.
        assert_eq!(code(req(&ann, contact("ann")).await), ErrorCode::BadRequest);

        set_presence(&ann, PresenceStatus::Away).await.unwrap();
        assert_eq!(
            code(set_presence(&ann, PresenceStatus::Online).await),
            ErrorCode::RateLimited
        );

        req(
            &ann,
            request::Body::DocCreate(v1::DocCreateRequest {
                doc_id: "d".into(),
                text: "ab".into(),
            }),
        )
        .await
        .unwrap();
        req(
            &ann,
            request::Body::DocOpen(v1::DocOpenRequest {
                doc_id: "ann~d".into(),
                known_revision: None,
            }),
        )
        .await
        .unwrap();
        let edit = |seq: u64, base: u64, len: usize| {
            request::Body::DocSubmit(v1::DocSubmitRequest {
                doc_id: "ann~d".into(),
                base_revision: base,
                op: Some(tutti::protocol::ot_wire::op_to_wire(
                    &TextOperation::new().retain(len).insert("!"),
                )),
                client_id: "ann-1".into(),
                seq,
            })
        };
        req(&ann, edit(1, 0, 2)).await.unwrap();
        assert_eq!(code(req(&ann, edit(2, 1, 3)).await), ErrorCode::RateLimited);
        // Refilled: the same operation goes through.
        clock.advance(1_000_000);
        req(&ann, edit(2, 1, 3)).await.unwrap();
        create_room(&ann, "b", &[]).await.unwrap();
    })
    .await
    .expect("test timed out");
}

/// Ann's room has Bob, Cat and Dan; with `max_fanout = 2` her status reaches Bob
/// and Cat (first by user id) and not Dan, who reads it with `PresenceGet`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_presence_change_reaches_at_most_max_fanout_users() {
    tokio::time::timeout(support::TEST_TIMEOUT, async {
        let s = TestServer::start_with(|c| c.presence.max_fanout = 2).await;
        let t = TransportKind::Quic;
        let ann = s.connect(t, "ann").await;
        let bob = s.connect(t, "bob").await;
        let cat = s.connect(t, "cat").await;
        let dan = s.connect(t, "dan").await;
        let eve = s.connect(t, "eve").await;
        create_room(&ann, "big", &["bob", "cat", "dan"])
            .await
            .unwrap();
        create_room(&eve, "side", &["dan"]).await.unwrap();
        set_presence(&ann, PresenceStatus::Away).await.unwrap();
        let ann_away = |p: &v1::Push| {
            matches!(&p.event, Some(push::Event::Presence(s))
                if s.user_id == "ann" && s.status == PresenceStatus::Away as i32)
        };
        for watcher in [&bob, &cat] {
            pushes_until(watcher, StreamKind::Presence, ann_away).await;
        }
        // Eve's change reaches Dan on the same ordered stream: had Ann's reached
        // him, it would have come first.
        set_presence(&eve, PresenceStatus::DoNotDisturb)
            .await
            .unwrap();
        let got = pushes_until(
            &dan,
            StreamKind::Presence,
            |p| matches!(&p.event, Some(push::Event::Presence(s)) if s.user_id == "eve"),
        )
        .await;
        assert!(!got.iter().any(ann_away), "{got:?}");
        match req(
            &dan,
            request::Body::PresenceGet(v1::PresenceGetRequest {
                user_ids: vec!["ann".into()],
            }),
        )
        .await
        .unwrap()
        {
            response::Body::PresenceGet(r) => {
                assert_eq!(r.states[0].status, PresenceStatus::Away as i32)
            }
            other => panic!("{other:?}"),
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_caps_apply_per_user_with_an_allowlist() {
    tokio::time::timeout(support::TEST_TIMEOUT, async {
        let s = TestServer::start_with_clock(Clock::manual(T0), |c| {
            c.analytics.max_series_per_user = 2;
            c.analytics.events_per_sec_per_user = 5;
            c.analytics.max_count = 5;
            c.analytics.unlimited_users = vec!["backend".into()];
        })
        .await;
        let t = TransportKind::Quic;
        let ann = s.connect(t, "ann").await;
        let ann_phone = s.connect(t, "ann").await;
        let backend = s.connect(t, "backend").await;
        let event = |kind: &str, count: u32| v1::AnalyticsEvent {
            r#type: kind.into(),
            dimensions: Default::default(),
            count,
        };
        ann.track(vec![event("a", 1), event("b", 1)]).await.unwrap();
        assert_eq!(
            code(ann.track(vec![event("c", 1)]).await),
            ErrorCode::LimitExceeded,
            "two new series per user"
        );
        // Known series are still counted; the allowlisted user is not capped.
        ann.track(vec![event("a", 1)]).await.unwrap();
        backend
            .track(vec![event("c", 1), event("d", 1), event("e", 1)])
            .await
            .unwrap();
        // Ten occurrences at once per user (twice the rate), over both devices.
        ann_phone.track(vec![event("a", 5)]).await.unwrap();
        let e = server_error(ann_phone.track(vec![event("a", 5)]).await);
        assert_eq!(e.error_code(), Some(ErrorCode::RateLimited));
        assert!(e.retry_after_ms > 0);
        backend.track(vec![event("a", 5)]).await.unwrap();
        backend.track(vec![event("a", 5)]).await.unwrap();
    })
    .await
    .expect("test timed out");
}

/// A room keeps its last 3 messages: history starts at the first kept offset,
/// a session resuming from before it gets `HistoryTruncated` then the rest, and
/// new messages take new offsets.
async fn a_resume_from_a_removed_offset_is_told_the_first_kept_one(t: TransportKind) {
    let s = TestServer::start_with(|c| c.retention.room_messages = 3).await;
    let ann = s.connect(t, "ann").await;
    create_room(&ann, "r", &["bob"]).await.unwrap();
    for i in 1..=6 {
        send(&ann, "ann~r", &format!("m{i}")).await.unwrap();
    }
    let pruned = s.server().services().retention.run_once().await.unwrap();
    assert_eq!(pruned.messages, 3);
    let page = history(&ann, "ann~r", 0).await;
    assert_eq!(offsets(&page.messages), [4, 5, 6]);
    assert_eq!(page.first_offset, 4);
    assert!(!page.more);
    let older = history(&ann, "ann~r", 4).await;
    assert!(older.messages.is_empty() && !older.more);

    let mut config = s.client_config(t, &s.token("bob"));
    config.resume = HashMap::from([("room/ann~r".to_string(), 1)]);
    let bob = Client::connect(config).await.unwrap();
    let got = pushes_until(&bob, StreamKind::Chat, |p| p.offset == 6).await;
    match &got[0].event {
        Some(push::Event::HistoryTruncated(h)) => {
            assert_eq!((h.stream.as_str(), h.first_offset), ("room/ann~r", 4));
        }
        other => panic!("expected the truncation first, got {other:?}"),
    }
    let messages: Vec<u64> = got[1..].iter().map(|p| p.offset).collect();
    assert_eq!(messages, [4, 5, 6]);
    // Bob has read nothing: his unread count is what the room still keeps.
    match req(
        &bob,
        request::Body::RoomList(v1::RoomListRequest::default()),
    )
    .await
    .unwrap()
    {
        response::Body::RoomList(r) => {
            assert_eq!((r.rooms[0].unread, r.rooms[0].read_offset), (3, 0));
        }
        other => panic!("{other:?}"),
    }
    // Offsets are never reused.
    assert_eq!(send(&ann, "ann~r", "m7").await.unwrap().offset, 7);
    let again = s.server().services().retention.run_once().await.unwrap();
    assert_eq!(again.messages, 1);
    // A resume within what is kept is not told anything.
    let mut config = s.client_config(t, &s.token("bob"));
    config.resume = HashMap::from([("room/ann~r".to_string(), 5)]);
    let bob = Client::connect(config).await.unwrap();
    let got = pushes_until(&bob, StreamKind::Chat, |p| p.offset == 7).await;
    assert!(
        got.iter()
            .all(|p| matches!(p.event, Some(push::Event::ChatMessage(_)))),
        "{got:?}"
    );
    assert_eq!(got[0].offset, 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_messages_and_notifications_go_by_age_and_unread_counts_follow() {
    tokio::time::timeout(support::TEST_TIMEOUT, async {
        let clock = Clock::manual(T0);
        let s = TestServer::start_with_clock(clock.clone(), |c| {
            c.retention.room_message_age = Some(Duration::from_secs(3600));
            c.retention.notification_age = Some(Duration::from_secs(3600));
            c.retention.user_notifications = 0;
        })
        .await;
        let ann = s.connect(TransportKind::Quic, "ann").await;
        create_room(&ann, "r", &[]).await.unwrap();
        send(&ann, "ann~r", "old 1").await.unwrap();
        send(&ann, "ann~r", "old 2").await.unwrap();
        let notify = |title: &str| {
            let body = serde_json::json!({"user_id": "ann", "kind": "k", "title": title});
            let s = &s;
            async move {
                let (status, _) = s
                    .api("POST", "/api/v1/notifications", Some(&body.to_string()))
                    .await;
                assert_eq!(status, 201);
            }
        };
        notify("old 1").await;
        notify("old 2").await;
        notify("old 3").await;
        clock.advance(2 * HOUR);
        send(&ann, "ann~r", "new").await.unwrap();
        notify("new").await;
        let pruned = s.server().services().retention.run_once().await.unwrap();
        assert_eq!((pruned.messages, pruned.notifications), (2, 3));
        assert_eq!(offsets(&history(&ann, "ann~r", 0).await.messages), [3]);
        match req(
            &ann,
            request::Body::NotifyList(v1::NotifyListRequest {
                before_offset: 0,
                limit: 10,
            }),
        )
        .await
        .unwrap()
        {
            response::Body::NotifyList(r) => {
                assert_eq!(r.notifications.len(), 1);
                assert_eq!(r.first_offset, 4);
                assert_eq!(r.unread, 1, "removed unread ones no longer count");
                assert!(!r.more);
            }
            other => panic!("{other:?}"),
        }
        // Resuming notifications from the start: told, then the one kept.
        let mut config = s.client_config(TransportKind::Quic, &s.token("ann"));
        config.resume = HashMap::from([("notifications".to_string(), 0)]);
        let phone = Client::connect(config).await.unwrap();
        let got = pushes_until(&phone, StreamKind::Notifications, |p| p.offset == 4).await;
        assert!(matches!(
            &got[0].event,
            Some(push::Event::HistoryTruncated(h)) if h.first_offset == 4
        ));
        assert_eq!(got.len(), 2);
        // Nothing left to remove: the newest entries always stay.
        clock.advance(10 * HOUR);
        let pruned = s.server().services().retention.run_once().await.unwrap();
        assert_eq!((pruned.messages, pruned.notifications), (0, 0));
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_room_is_removed_with_its_messages_and_its_id_not_reused() {
    tokio::time::timeout(support::TEST_TIMEOUT, async {
        let s = TestServer::start().await;
        let ann = s.connect(TransportKind::Quic, "ann").await;
        create_room(&ann, "gone", &[]).await.unwrap();
        create_room(&ann, "kept", &[]).await.unwrap();
        for i in 0..3 {
            send(&ann, "ann~gone", &format!("m{i}")).await.unwrap();
        }
        req(
            &ann,
            request::Body::RoomLeave(v1::RoomLeaveRequest {
                room_id: "ann~gone".into(),
            }),
        )
        .await
        .unwrap();
        let pruned = s.server().services().retention.run_once().await.unwrap();
        assert_eq!((pruned.rooms, pruned.messages), (1, 3));
        // The same answer as any taken id: the old offsets can never resume
        // into a new room.
        assert_eq!(
            code(create_room(&ann, "gone", &[]).await),
            ErrorCode::Conflict
        );
        assert_eq!(
            code(
                req(
                    &ann,
                    request::Body::ChatHistory(v1::ChatHistoryRequest {
                        room_id: "ann~gone".into(),
                        before_offset: 0,
                        limit: 10,
                    })
                )
                .await
            ),
            ErrorCode::NotFound
        );
        let again = s.server().services().retention.run_once().await.unwrap();
        assert_eq!(again.rooms, 0, "the room with a participant stays");
    })
    .await
    .expect("test timed out");
}

/// The collaboration tables, as stored (`src/services/collab.rs`).
const CLIENTS: TableDefinition<(&str, &str), (u64, u64)> = TableDefinition::new("collab_clients");
const USER_DOCS: TableDefinition<(&str, &str), (i32, &str)> =
    TableDefinition::new("collab_user_docs");

/// With `collab.history = 2`, a client's duplicate-detection row goes once its
/// last operation is more than two revisions old; a resend that old is answered
/// `RESYNC_REQUIRED` (as it would be anyway), never applied twice; rows of a
/// document that no longer exists go too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_collab_dedup_rows_are_removed_and_old_resends_resync() {
    tokio::time::timeout(support::TEST_TIMEOUT, async {
        let tweak = |c: &mut tutti::config::Config| {
            c.collab.history = 2;
            c.collab.snapshot_every = 1;
        };
        let mut s = TestServer::start_with(tweak).await;
        let ann = s.connect(TransportKind::Quic, "ann").await;
        req(
            &ann,
            request::Body::DocCreate(v1::DocCreateRequest {
                doc_id: "d".into(),
                text: String::new(),
            }),
        )
        .await
        .unwrap();
        req(
            &ann,
            request::Body::DocOpen(v1::DocOpenRequest {
                doc_id: "ann~d".into(),
                known_revision: None,
            }),
        )
        .await
        .unwrap();
        let edit = |client: &str, seq: u64, base: u64| {
            request::Body::DocSubmit(v1::DocSubmitRequest {
                doc_id: "ann~d".into(),
                base_revision: base,
                op: Some(tutti::protocol::ot_wire::op_to_wire(
                    &TextOperation::new().retain(base as usize).insert("x"),
                )),
                client_id: client.into(),
                seq,
            })
        };
        req(&ann, edit("old-tab", 1, 0)).await.unwrap();
        for rev in 1..5 {
            req(&ann, edit("new-tab", rev, rev)).await.unwrap();
        }
        // Rows of a document that no longer exists (as a deletion leaves them).
        s.server()
            .writer()
            .write(|txn| {
                txn.open_table(CLIENTS)?
                    .insert(("ghost", "ann/t"), (1, 1))?;
                txn.open_table(USER_DOCS)?
                    .insert(("ann", "ghost"), (DocRole::Owner as i32, "ann"))?;
                Ok(())
            })
            .await
            .unwrap();
        let pruned = s.server().services().retention.run_once().await.unwrap();
        assert_eq!(
            (pruned.dedup_rows, pruned.access_rows),
            (2, 1),
            "the old tab's row and the ghost's rows"
        );
        // Restarted on the same data directory: the document is read from storage.
        drop(ann);
        s.shutdown().await;
        let mut config = support::test_config(s.dir.path());
        tweak(&mut config);
        let s = TestServer {
            server: Some(tutti::start(config).await.unwrap()),
            dir: s.dir,
        };
        let ann = s.connect(TransportKind::Quic, "ann").await;
        req(
            &ann,
            request::Body::DocOpen(v1::DocOpenRequest {
                doc_id: "ann~d".into(),
                known_revision: None,
            }),
        )
        .await
        .unwrap();
        assert_eq!(
            code(req(&ann, edit("old-tab", 1, 0)).await),
            ErrorCode::ResyncRequired
        );
        match req(&ann, edit("new-tab", 4, 4)).await.unwrap() {
            response::Body::DocSubmit(r) => assert!(r.duplicate, "a recent resend is known"),
            other => panic!("{other:?}"),
        }
    })
    .await
    .expect("test timed out");
}

/// Each run removes at most `retention.batch` rows per kind and the next one goes
/// on: 10 messages over a limit of 1 go in runs of 4, 4 and 1, with the history
/// always starting at the first kept offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_runs_in_bounded_batches() {
    tokio::time::timeout(support::TEST_TIMEOUT, async {
        let clock = Clock::manual(T0);
        let s = TestServer::start_with_clock(clock.clone(), |c| {
            c.retention.batch = 4;
            c.retention.room_message_age = Some(Duration::from_secs(60));
        })
        .await;
        let ann = s.connect(TransportKind::Quic, "ann").await;
        create_room(&ann, "r", &[]).await.unwrap();
        for i in 1..=10 {
            send(&ann, "ann~r", &format!("m{i}")).await.unwrap();
        }
        clock.advance(HOUR);
        let mut removed = Vec::new();
        loop {
            let pruned = s.server().services().retention.run_once().await.unwrap();
            if pruned.messages == 0 {
                break;
            }
            removed.push(pruned.messages);
            let page = history(&ann, "ann~r", 0).await;
            assert_eq!(page.first_offset, 1 + removed.iter().sum::<u64>());
            assert!(removed.len() < 10, "runs end");
        }
        assert_eq!(removed, [4, 4, 1], "the newest message stays");
        assert_eq!(offsets(&history(&ann, "ann~r", 0).await.messages), [10]);
    })
    .await
    .expect("test timed out");
}
