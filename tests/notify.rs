//! Notifications and the server API through the real server: created by a backend
//! over HTTP with the API key, pushed live to every device, paginated, marked read
//! with an exact unread count (already-read and someone else's ids change nothing),
//! recovered by offset after a reconnect; and the room endpoints of the server API.

mod support;

use std::collections::HashMap;

use support::TestServer;
use tutti::client::{Client, ClientError, Event};
use tutti::protocol::ErrorCode;
use tutti::protocol::v1::{self, StreamKind, push, request, response};
use tutti::transport::TransportKind;

async fn notify(s: &TestServer, user: &str, title: &str) -> tutti::api::NotificationJson {
    let body = serde_json::json!({"user_id": user, "kind": "mention", "title": title, "body": "b", "data": "{\"k\":1}"});
    let (status, text) = s
        .api("POST", "/api/v1/notifications", Some(&body.to_string()))
        .await;
    assert_eq!(status, 201, "{text}");
    serde_json::from_str(&text).unwrap()
}

async fn list(c: &Client, before: u64, limit: u32) -> v1::NotifyListResponse {
    match c
        .request(request::Body::NotifyList(v1::NotifyListRequest {
            before_offset: before,
            limit,
        }))
        .await
        .unwrap()
    {
        response::Body::NotifyList(r) => r,
        other => panic!("{other:?}"),
    }
}

async fn mark(c: &Client, ids: &[&str]) -> v1::NotifyMarkReadResponse {
    match c
        .request(request::Body::NotifyMarkRead(v1::NotifyMarkReadRequest {
            notification_ids: ids.iter().map(|s| s.to_string()).collect(),
        }))
        .await
        .unwrap()
    {
        response::Body::NotifyMarkRead(r) => r,
        other => panic!("{other:?}"),
    }
}

fn server_code(r: Result<response::Body, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server(e)) => e.error_code().unwrap(),
        other => panic!("expected a server error, got {other:?}"),
    }
}

async fn next_notification(c: &Client) -> v1::Notification {
    loop {
        if let Some(Event::Push(StreamKind::Notifications, p)) = c.next_event().await
            && let Some(push::Event::Notification(n)) = p.event
        {
            assert_eq!((p.stream.as_str(), p.offset), ("notifications", n.offset));
            return n;
        }
    }
}

both_transports!(
    notifications_reach_every_device_and_count_exactly,
    reconnect_resumes_the_missed_notifications,
    resume_offsets_at_the_extremes,
    server_api_posts_to_rooms_and_lists_participants,
    a_burst_of_notifications_to_one_user_shares_commits,
    an_api_notification_finishes_after_its_caller_hangs_up,
);

/// A backend that hangs up while its notification's commit is in flight does not
/// cancel it: the notification is stored, pushed at once and counted, as one whose
/// caller waited (the request runs on a task of its own), and the next one follows
/// it.
async fn an_api_notification_finishes_after_its_caller_hangs_up(t: TransportKind) {
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;
    // No writes but the request's own while the writer is held.
    let s = TestServer::start_without_background_writes().await;
    let device = s.connect(t, "ann").await;
    let writer = s.server().writer().clone();
    let hold = writer.hold();
    let body = serde_json::json!({"user_id": "ann", "kind": "k", "title": "abandoned"}).to_string();
    let mut caller = tokio::net::TcpStream::connect(s.server().http_addr())
        .await
        .unwrap();
    let request = format!(
        "POST /api/v1/notifications HTTP/1.1\r\nHost: tutti\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        s.api_key(),
        body.len()
    );
    caller.write_all(request.as_bytes()).await.unwrap();
    while writer.in_flight() == 0 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // The backend hangs up, and the server sees its connection end.
    drop(caller);
    s.wait_http_closed().await;
    drop(hold);
    let pushed = tokio::time::timeout(Duration::from_secs(5), next_notification(&device))
        .await
        .expect("the abandoned notification is pushed without waiting for another");
    assert_eq!((pushed.offset, pushed.title.as_str()), (1, "abandoned"));
    let next = notify(&s, "ann", "next").await;
    assert_eq!(next.offset, 2);
    assert_eq!(next_notification(&device).await.offset, 2, "nothing twice");
    assert_eq!(list(&device, 0, 10).await.unread, 2);
}

/// Notifications to one user that arrive while a commit for them is paced share
/// the next commit: a burst of API requests is stored in a few writes, each
/// answered with its own offset, and the user's device receives all of them once,
/// in offset order, with the unread count exact.
async fn a_burst_of_notifications_to_one_user_shares_commits(t: TransportKind) {
    const BURST: u64 = 48;
    // The longest pacing: a notification that waited for a commit of its own
    // would take a tenth of a second each.
    let s =
        TestServer::start_with(|c| c.commit_interval = std::time::Duration::from_millis(100)).await;
    let device = s.connect(t, "ann").await;
    let before = s.server().metrics().value("writes.committed").unwrap();
    let titles: Vec<String> = (0..BURST).map(|i| format!("n{i}")).collect();
    let created = futures_util::future::join_all(titles.iter().map(|t| notify(&s, "ann", t))).await;
    let writes = s.server().metrics().value("writes.committed").unwrap() - before;
    let mut offsets: Vec<u64> = created
        .iter()
        .enumerate()
        .map(|(i, n)| {
            assert_eq!(n.title, format!("n{i}"));
            n.offset
        })
        .collect();
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=BURST).collect::<Vec<_>>());
    assert!(
        writes <= (BURST / 4) as f64,
        "{BURST} notifications took {writes} writes"
    );
    for offset in 1..=BURST {
        assert_eq!(next_notification(&device).await.offset, offset);
    }
    assert_eq!(list(&device, 0, 1).await.unread, BURST);
}

async fn notifications_reach_every_device_and_count_exactly(t: TransportKind) {
    let s = TestServer::start().await;
    let phone = s.connect(t, "alice").await;
    let laptop = s.connect(t, "alice").await;
    let bob = s.connect(t, "bob").await;
    let n1 = notify(&s, "alice", "one").await;
    assert_eq!((n1.offset, n1.notification_id.as_str()), (1, "alice:1"));
    for c in [&phone, &laptop] {
        let got = next_notification(c).await;
        assert_eq!(
            (got.title.as_str(), got.data.as_str(), got.read),
            ("one", "{\"k\":1}", false)
        );
    }
    for i in 2..=5 {
        notify(&s, "alice", &format!("n{i}")).await;
    }
    let b1 = notify(&s, "bob", "for bob").await;
    let page = list(&phone, 0, 2).await;
    assert_eq!(page.unread, 5);
    assert_eq!(
        page.notifications
            .iter()
            .map(|n| n.offset)
            .collect::<Vec<_>>(),
        [4, 5]
    );
    assert!(page.more);
    assert_eq!(list(&phone, 4, 100).await.notifications.len(), 3);

    // Marking: exact counts; double marks and someone else's ids change nothing.
    let r = mark(&phone, &["alice:1", "alice:2"]).await;
    assert_eq!((r.marked, r.unread), (2, 3));
    let r = mark(&phone, &["alice:1", "alice:2"]).await;
    assert_eq!((r.marked, r.unread), (0, 3));
    let r = mark(&phone, &["alice:99"]).await;
    assert_eq!(
        (r.marked, r.unread),
        (0, 3),
        "an unknown id changes nothing"
    );
    // Someone else's id, or a malformed one: a typed error, and nothing changes.
    let others = phone
        .request(request::Body::NotifyMarkRead(v1::NotifyMarkReadRequest {
            notification_ids: vec!["alice:3".into(), b1.notification_id.clone()],
        }))
        .await;
    assert_eq!(server_code(others), ErrorCode::PermissionDenied);
    let garbage = phone
        .request(request::Body::NotifyMarkRead(v1::NotifyMarkReadRequest {
            notification_ids: vec!["garbage".into()],
        }))
        .await;
    assert_eq!(server_code(garbage), ErrorCode::BadRequest);
    assert_eq!(list(&phone, 0, 10).await.unread, 3);
    assert_eq!(list(&bob, 0, 10).await.unread, 1, "Bob's stays unread");
    // The other device hears about it.
    loop {
        if let Some(Event::Push(_, p)) = laptop.next_event().await
            && let Some(push::Event::NotificationsRead(r)) = p.event
        {
            assert_eq!(r.notification_ids, ["alice:1", "alice:2"]);
            assert_eq!(r.unread, 3);
            break;
        }
    }
    let all = match laptop
        .request(request::Body::NotifyMarkAllRead(
            v1::NotifyMarkAllReadRequest {},
        ))
        .await
        .unwrap()
    {
        response::Body::NotifyMarkAllRead(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!((all.marked, all.unread), (3, 0));
    assert!(
        list(&phone, 0, 10)
            .await
            .notifications
            .iter()
            .all(|n| n.read)
    );

    // Bad input over HTTP: typed errors, nothing stored.
    let (status, text) = s
        .api(
            "POST",
            "/api/v1/notifications",
            Some(r#"{"user_id":"alice","kind":""}"#),
        )
        .await;
    assert_eq!(status, 400, "{text}");
    let err: tutti::api::ApiError = serde_json::from_str(&text).unwrap();
    assert_eq!(err.name, "BAD_REQUEST");
    let big = serde_json::json!({"user_id": "alice", "kind": "k", "body": "x".repeat(5000)});
    assert_eq!(
        s.api("POST", "/api/v1/notifications", Some(&big.to_string()))
            .await
            .0,
        413
    );
    let bad_data = serde_json::json!({"user_id": "alice", "kind": "k", "data": "{not json"});
    assert_eq!(
        s.api("POST", "/api/v1/notifications", Some(&bad_data.to_string()))
            .await
            .0,
        400
    );
    assert_eq!(
        s.api("POST", "/api/v1/notifications", Some("nope")).await.0,
        400
    );
    let (status, _) = support::http_with(
        s.server().http_addr(),
        "POST",
        "/api/v1/notifications",
        Some(r#"{"user_id":"alice","kind":"k"}"#),
        Some("wrong-key"),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(
        list(&phone, 0, 100).await.notifications.len(),
        5,
        "nothing stored"
    );
}

async fn reconnect_resumes_the_missed_notifications(t: TransportKind) {
    let s = TestServer::start().await;
    let c = s.connect(t, "alice").await;
    notify(&s, "alice", "seen").await;
    assert_eq!(next_notification(&c).await.offset, 1);
    drop(c);
    for i in 2..=4 {
        notify(&s, "alice", &format!("missed {i}")).await;
    }
    let mut config = s.client_config(t, &s.token("alice"));
    config.resume = HashMap::from([("notifications".to_string(), 1)]);
    let c = Client::connect(config).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(next_notification(&c).await.offset);
    }
    assert_eq!(got, [2, 3, 4]);
    notify(&s, "alice", "live").await;
    assert_eq!(next_notification(&c).await.offset, 5);
}

/// Resuming from 0 replays every notification; resuming from 2^64-1 (beyond the
/// end) replays none, and the live ones still follow. `before_offset` 2^64-1 lists
/// the newest page.
async fn resume_offsets_at_the_extremes(t: TransportKind) {
    let s = TestServer::start().await;
    for i in 1..=3 {
        notify(&s, "alice", &format!("n{i}")).await;
    }
    let resume = |offset: u64| {
        let mut config = s.client_config(t, &s.token("alice"));
        config.resume = HashMap::from([("notifications".to_string(), offset)]);
        Client::connect(config)
    };
    let c = resume(0).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(next_notification(&c).await.offset);
    }
    assert_eq!(got, [1, 2, 3]);
    drop(c);
    let c = resume(u64::MAX).await.unwrap();
    // A response proves the catch-up is queued; then a live one.
    let page = list(&c, u64::MAX, 100).await;
    assert_eq!(
        page.notifications
            .iter()
            .map(|n| n.offset)
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(!page.more);
    notify(&s, "alice", "live").await;
    assert_eq!(
        next_notification(&c).await.offset,
        4,
        "nothing replayed before the live one"
    );
}

async fn server_api_posts_to_rooms_and_lists_participants(t: TransportKind) {
    let s = TestServer::start().await;
    let a = s.connect(t, "alice").await;
    a.request(request::Body::RoomCreate(v1::RoomCreateRequest {
        room_id: "ops".into(),
        name: "ops".into(),
        participants: vec!["bob".into()],
    }))
    .await
    .unwrap();
    let (status, text) = s
        .api(
            "POST",
            "/api/v1/rooms/alice~ops/messages",
            Some(r#"{"text":"deploy done"}"#),
        )
        .await;
    assert_eq!(status, 201, "{text}");
    let m: tutti::api::MessageJson = serde_json::from_str(&text).unwrap();
    assert!(m.system);
    assert_eq!((m.offset, m.sender_id.as_str()), (1, ""));
    loop {
        if let Some(Event::Push(StreamKind::Chat, p)) = a.next_event().await
            && let Some(push::Event::ChatMessage(got)) = p.event
        {
            assert_eq!((got.text.as_str(), got.system), ("deploy done", true));
            break;
        }
    }
    let (status, text) = s
        .api("GET", "/api/v1/rooms/alice~ops/participants", None)
        .await;
    assert_eq!(status, 200);
    let p: tutti::api::ParticipantsJson = serde_json::from_str(&text).unwrap();
    assert_eq!(p.participants, ["alice", "bob"]);
    // Same validation and codes as the protocol.
    let (status, text) = s
        .api(
            "POST",
            "/api/v1/rooms/nope/messages",
            Some(r#"{"text":"x"}"#),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(
        serde_json::from_str::<tutti::api::ApiError>(&text)
            .unwrap()
            .code,
        ErrorCode::NotFound as u32
    );
    let long = serde_json::json!({"text": "x".repeat(5000)});
    assert_eq!(
        s.api(
            "POST",
            "/api/v1/rooms/alice~ops/messages",
            Some(&long.to_string())
        )
        .await
        .0,
        413
    );
    assert_eq!(
        support::http(
            s.server().http_addr(),
            "GET",
            "/api/v1/rooms/alice~ops/participants",
            None
        )
        .await
        .0,
        401
    );
}
