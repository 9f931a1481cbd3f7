//! Chat through the real server: rooms and admins, live delivery to every device,
//! history pages, read marks and unread counts (exact, durable), typing, the
//! limits, permissions, and recovery by offset after a dropped connection and
//! after the server process is killed with SIGKILL.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use support::TestServer;
use tutti::client::{Client, ClientError, Event, Trust};
use tutti::protocol::ErrorCode;
use tutti::protocol::v1::{self, StreamKind, push, request, response, room_event};
use tutti::services::chat::JoinPolicy;
use tutti::transport::TransportKind;

async fn req(c: &Client, body: request::Body) -> Result<response::Body, ClientError> {
    c.request(body).await
}

async fn create_room(c: &Client, id: &str, others: &[&str]) -> v1::Room {
    match req(
        c,
        request::Body::RoomCreate(v1::RoomCreateRequest {
            room_id: id.into(),
            name: format!("room {id}"),
            participants: others.iter().map(|s| s.to_string()).collect(),
        }),
    )
    .await
    .unwrap()
    {
        response::Body::RoomCreate(r) => r.room.unwrap(),
        other => panic!("{other:?}"),
    }
}

async fn send(c: &Client, room: &str, text: &str) -> Result<v1::ChatMessage, ClientError> {
    match req(
        c,
        request::Body::ChatSend(v1::ChatSendRequest {
            room_id: room.into(),
            text: text.into(),
            client_message_id: String::new(),
        }),
    )
    .await?
    {
        response::Body::ChatSend(r) => Ok(r.message.unwrap()),
        other => panic!("{other:?}"),
    }
}

async fn history(
    c: &Client,
    room: &str,
    before: u64,
    limit: u32,
) -> Result<v1::ChatHistoryResponse, ClientError> {
    match req(
        c,
        request::Body::ChatHistory(v1::ChatHistoryRequest {
            room_id: room.into(),
            before_offset: before,
            limit,
        }),
    )
    .await?
    {
        response::Body::ChatHistory(r) => Ok(r),
        other => panic!("{other:?}"),
    }
}

async fn mark_read(
    c: &Client,
    room: &str,
    offset: u64,
) -> Result<v1::ChatMarkReadResponse, ClientError> {
    match req(
        c,
        request::Body::ChatMarkRead(v1::ChatMarkReadRequest {
            room_id: room.into(),
            offset,
        }),
    )
    .await?
    {
        response::Body::ChatMarkRead(r) => Ok(r),
        other => panic!("{other:?}"),
    }
}

async fn list(c: &Client) -> HashMap<String, v1::RoomSummary> {
    match req(c, request::Body::RoomList(v1::RoomListRequest::default()))
        .await
        .unwrap()
    {
        response::Body::RoomList(r) => r
            .rooms
            .into_iter()
            .map(|s| (s.room.as_ref().unwrap().room_id.clone(), s))
            .collect(),
        other => panic!("{other:?}"),
    }
}

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server(e)) => e.error_code().expect("a known code"),
        other => panic!("expected a server error, got {other:?}"),
    }
}

/// The next chat message pushed to `c` (skipping other events).
async fn next_message(c: &Client) -> v1::ChatMessage {
    loop {
        match c.next_event().await.expect("session open") {
            Event::Push(StreamKind::Chat, p) => {
                if let Some(push::Event::ChatMessage(m)) = p.event {
                    assert_eq!(p.stream, format!("room/{}", m.room_id));
                    assert_eq!(p.offset, m.offset);
                    return m;
                }
            }
            _ => continue,
        }
    }
}

/// The next room invitation pushed to `c` (skipping other events).
async fn next_invite(c: &Client) -> v1::RoomInvite {
    loop {
        match c.next_event().await.expect("session open") {
            Event::Push(StreamKind::Chat, p) => {
                if let Some(push::Event::RoomInvite(i)) = p.event {
                    assert_eq!((p.stream.as_str(), p.offset), ("", 0));
                    return i;
                }
            }
            _ => continue,
        }
    }
}

/// The next room event of `kind` pushed to `c` (skipping other events).
async fn next_room_event(c: &Client, kind: room_event::Kind) -> v1::RoomEvent {
    loop {
        match c.next_event().await.expect("session open") {
            Event::Push(StreamKind::Chat, p) => {
                if let Some(push::Event::RoomEvent(e)) = p.event
                    && e.kind == kind as i32
                {
                    return e;
                }
            }
            _ => continue,
        }
    }
}

both_transports!(
    every_device_of_every_participant_receives_messages,
    history_pages_are_stable_while_messages_arrive,
    read_marks_and_unread_counts_are_exact,
    outsiders_cannot_see_or_touch_a_room,
    admins_manage_participants,
    limits_refuse_and_store_nothing,
    typing_reaches_participants_only,
    reconnect_resumes_exactly_the_missed_messages,
    resuming_from_zero_in_a_large_room_does_not_stall_it,
    resume_and_history_offsets_at_the_extremes,
    a_burst_of_sends_into_one_room_shares_commits,
);

async fn every_device_of_every_participant_receives_messages(t: TransportKind) {
    // The default join policy: Bob is invited and is in only once he accepts.
    let s = TestServer::start_with(|c| c.rooms.join_policy = JoinPolicy::Invite).await;
    let phone = s.connect(t, "alice").await;
    let laptop = s.connect(t, "alice").await;
    let bob = s.connect(t, "bob").await;
    let room = create_room(&phone, "r", &["bob"]).await;
    assert_eq!(
        (room.participants, room.invitees),
        (vec!["alice".to_string()], vec!["bob".to_string()])
    );
    assert_eq!(next_invite(&bob).await.room_id, "alice~r");
    assert_eq!(
        code(send(&bob, "alice~r", "early").await),
        ErrorCode::NotFound
    );
    let joined = bob.accept_invite("alice~r").await.unwrap();
    assert_eq!(joined.participants, ["alice", "bob"]);
    assert!(joined.invitees.is_empty());
    let m1 = send(&phone, "alice~r", "hi bob").await.unwrap();
    assert_eq!((m1.offset, m1.sender_id.as_str()), (1, "alice"));
    assert_eq!(m1.message_id, "alice~r:1");
    for c in [&phone, &laptop, &bob] {
        assert_eq!(next_message(c).await, m1);
    }
    // One of Alice's devices goes away; the other still gets everything.
    drop(phone);
    let m2 = send(&bob, "alice~r", "hi alice 👋").await.unwrap();
    assert_eq!(m2.offset, 2);
    assert_eq!(next_message(&laptop).await, m2);
    assert_eq!(next_message(&bob).await, m2);
}

/// Sends that arrive while a room's commit is paced share the next commit: a
/// burst from every participant at once is stored in a few writes, each send
/// answered with its own offset, and every participant receives all of them
/// once, in offset order.
async fn a_burst_of_sends_into_one_room_shares_commits(t: TransportKind) {
    const USERS: usize = 6;
    const EACH: usize = 8;
    // The longest pacing: a send that waited for a commit of its own would
    // take a tenth of a second each.
    let s = TestServer::start_with(|c| c.commit_interval = Duration::from_millis(100)).await;
    let names: Vec<String> = (0..USERS).map(|i| format!("u{i}")).collect();
    let mut clients = Vec::new();
    for n in &names {
        clients.push(s.connect(t, n).await);
    }
    let others: Vec<&str> = names[1..].iter().map(String::as_str).collect();
    create_room(&clients[0], "busy", &others).await;
    let before = s.server().metrics().value("writes.committed").unwrap();
    let burst = clients.iter().enumerate().flat_map(|(u, c)| {
        (0..EACH).map(move |i| async move { (u, i, send(c, "u0~busy", &format!("{u}/{i}")).await) })
    });
    let sent = futures_util::future::join_all(burst).await;
    let writes = s.server().metrics().value("writes.committed").unwrap() - before;
    let mut offsets: Vec<u64> = sent
        .iter()
        .map(|(u, i, r)| {
            let m = r.as_ref().expect("every send is stored");
            assert_eq!(m.text, format!("{u}/{i}"));
            m.offset
        })
        .collect();
    offsets.sort_unstable();
    let total = (USERS * EACH) as u64;
    assert_eq!(offsets, (1..=total).collect::<Vec<_>>());
    assert!(
        writes <= (total / 4) as f64,
        "{total} sends took {writes} writes"
    );
    for c in &clients {
        for offset in 1..=total {
            assert_eq!(next_message(c).await.offset, offset);
        }
    }
}

async fn history_pages_are_stable_while_messages_arrive(t: TransportKind) {
    let s = TestServer::start_with(|c| c.chat.max_history_page = 4).await;
    let a = s.connect(t, "alice").await;
    create_room(&a, "r", &[]).await;
    for i in 1..=10 {
        send(&a, "alice~r", &format!("m{i}")).await.unwrap();
    }
    let newest = history(&a, "alice~r", 0, 3).await.unwrap();
    let offsets: Vec<u64> = newest.messages.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, [8, 9, 10]);
    assert!(newest.more);
    // New messages arrive between pages: the next page is unaffected.
    send(&a, "alice~r", "late").await.unwrap();
    let older = history(&a, "alice~r", 8, 100).await.unwrap();
    let offsets: Vec<u64> = older.messages.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, [4, 5, 6, 7], "limit capped at max_history_page");
    let oldest = history(&a, "alice~r", 2, 10).await.unwrap();
    assert_eq!(oldest.messages.len(), 1);
    assert!(!oldest.more);
    assert!(
        history(&a, "alice~r", 1, 10)
            .await
            .unwrap()
            .messages
            .is_empty()
    );
}

async fn read_marks_and_unread_counts_are_exact(t: TransportKind) {
    let dir = tempfile::tempdir().unwrap();
    let config = support::test_config(dir.path());
    let mut s = TestServer {
        server: Some(tutti::start(config.clone()).await.unwrap()),
        dir,
    };
    let a = s.connect(t, "alice").await;
    let b = s.connect(t, "bob").await;
    create_room(&a, "r", &["bob"]).await;
    for i in 0..5 {
        send(&a, "alice~r", &format!("{i}")).await.unwrap();
    }
    assert_eq!(list(&b).await["alice~r"].unread, 5);
    assert_eq!(list(&a).await["alice~r"].unread, 0, "sending marks read");
    let r = mark_read(&b, "alice~r", 3).await.unwrap();
    assert_eq!((r.read_offset, r.unread), (3, 2));
    // Marking again, or behind the mark, changes nothing.
    assert_eq!(mark_read(&b, "alice~r", 3).await.unwrap().unread, 2);
    assert_eq!(mark_read(&b, "alice~r", 1).await.unwrap().read_offset, 3);
    // Beyond the last message: capped.
    assert_eq!(mark_read(&b, "alice~r", 99).await.unwrap().read_offset, 5);
    // Alice got read receipts for 3 then 5, once each.
    let mut receipts = Vec::new();
    while receipts.len() < 2 {
        if let Some(Event::Push(_, p)) = a.next_event().await
            && let Some(push::Event::ChatReadReceipt(r)) = p.event
        {
            receipts.push((r.user_id, r.offset));
        }
    }
    assert_eq!(receipts, [("bob".to_string(), 3), ("bob".to_string(), 5)]);
    send(&a, "alice~r", "one more").await.unwrap();
    let summary = &list(&b).await["alice~r"];
    assert_eq!((summary.unread, summary.read_offset), (1, 5));
    assert_eq!(summary.last_message.as_ref().unwrap().text, "one more");
    // Alice's mark was read (and cached) by her list above: the send moved it.
    assert_eq!(
        list(&a).await["alice~r"].unread,
        0,
        "a send moves a cached mark"
    );
    // After a restart the counts are the same.
    drop((a, b));
    s.shutdown().await;
    s.server = Some(tutti::start(config).await.unwrap());
    let b = s.connect(t, "bob").await;
    let summary = &list(&b).await["alice~r"];
    assert_eq!((summary.unread, summary.read_offset), (1, 5));
    let a = s.connect(t, "alice").await;
    assert_eq!(list(&a).await["alice~r"].unread, 0);
}

async fn outsiders_cannot_see_or_touch_a_room(t: TransportKind) {
    let s = TestServer::start().await;
    let a = s.connect(t, "alice").await;
    let eve = s.connect(t, "eve").await;
    create_room(&a, "secret", &[]).await;
    send(&a, "alice~secret", "psst").await.unwrap();
    // Every answer is the same as for a room that does not exist.
    for room in ["alice~secret", "nothing-here"] {
        assert_eq!(code(send(&eve, room, "hello?").await), ErrorCode::NotFound);
        assert_eq!(code(history(&eve, room, 0, 10).await), ErrorCode::NotFound);
        assert_eq!(code(mark_read(&eve, room, 1).await), ErrorCode::NotFound);
        let add = req(
            &eve,
            request::Body::RoomAdd(v1::RoomAddRequest {
                room_id: room.into(),
                user_id: "eve".into(),
                admin: true,
            }),
        )
        .await;
        assert_eq!(code(add), ErrorCode::NotFound);
    }
    assert!(list(&eve).await.is_empty());
    // Nothing was pushed to Eve.
    send(&a, "alice~secret", "still secret").await.unwrap();
    eve.echo(b"sync".to_vec(), true).await.unwrap();
    loop {
        match eve.next_event().await {
            Some(Event::Push(StreamKind::System, _)) => break,
            Some(Event::Push(StreamKind::Chat, p)) => panic!("eve saw {p:?}"),
            Some(_) => {}
            None => panic!("session closed"),
        }
    }
    assert_eq!(
        history(&a, "alice~secret", 0, 10)
            .await
            .unwrap()
            .messages
            .len(),
        2
    );
}

async fn admins_manage_participants(t: TransportKind) {
    let s = TestServer::start().await;
    let a = s.connect(t, "alice").await;
    let b = s.connect(t, "bob").await;
    create_room(&a, "r", &["bob"]).await;
    // Bob is not an admin.
    let r = req(
        &b,
        request::Body::RoomAdd(v1::RoomAddRequest {
            room_id: "alice~r".into(),
            user_id: "carol".into(),
            admin: false,
        }),
    )
    .await;
    assert_eq!(code(r), ErrorCode::PermissionDenied);
    let r = req(
        &b,
        request::Body::RoomRemove(v1::RoomRemoveRequest {
            room_id: "alice~r".into(),
            user_id: "alice".into(),
        }),
    )
    .await;
    assert_eq!(code(r), ErrorCode::PermissionDenied);
    // Alice adds Carol, who is online: she hears the room from then on.
    let carol = s.connect(t, "carol").await;
    req(
        &a,
        request::Body::RoomAdd(v1::RoomAddRequest {
            room_id: "alice~r".into(),
            user_id: "carol".into(),
            admin: false,
        }),
    )
    .await
    .unwrap();
    let m = send(&a, "alice~r", "welcome carol").await.unwrap();
    assert_eq!(next_message(&carol).await, m);
    // Alice removes Bob: he is told, then hears nothing more and cannot send.
    req(
        &a,
        request::Body::RoomRemove(v1::RoomRemoveRequest {
            room_id: "alice~r".into(),
            user_id: "bob".into(),
        }),
    )
    .await
    .unwrap();
    loop {
        if let Some(Event::Push(_, p)) = b.next_event().await
            && let Some(push::Event::RoomEvent(e)) = p.event
            && e.kind == room_event::Kind::Removed as i32
        {
            assert_eq!(e.user_id, "bob");
            break;
        }
    }
    assert_eq!(
        code(send(&b, "alice~r", "let me in").await),
        ErrorCode::NotFound
    );
    assert!(!list(&b).await.contains_key("alice~r"));
    // Carol leaves.
    req(
        &carol,
        request::Body::RoomLeave(v1::RoomLeaveRequest {
            room_id: "alice~r".into(),
        }),
    )
    .await
    .unwrap();
    let room = list(&a).await["alice~r"].room.clone().unwrap();
    assert_eq!(room.participants, ["alice"]);
}

async fn limits_refuse_and_store_nothing(t: TransportKind) {
    let s = TestServer::start_with(|c| {
        c.chat.max_message_bytes = 16;
        c.chat.max_participants = 3;
        c.chat.max_rooms_per_user = 2;
    })
    .await;
    let a = s.connect(t, "alice").await;
    create_room(&a, "r", &["bob"]).await;
    assert_eq!(
        code(send(&a, "alice~r", &"x".repeat(17)).await),
        ErrorCode::LimitExceeded
    );
    assert_eq!(code(send(&a, "alice~r", "").await), ErrorCode::BadRequest);
    assert!(
        history(&a, "alice~r", 0, 10)
            .await
            .unwrap()
            .messages
            .is_empty(),
        "nothing stored"
    );
    let too_many = req(
        &a,
        request::Body::RoomCreate(v1::RoomCreateRequest {
            room_id: "big".into(),
            name: String::new(),
            participants: vec!["b".into(), "c".into(), "d".into()],
        }),
    )
    .await;
    assert_eq!(code(too_many), ErrorCode::LimitExceeded);
    create_room(&a, "second", &[]).await;
    let third = req(
        &a,
        request::Body::RoomCreate(v1::RoomCreateRequest {
            room_id: "third".into(),
            name: String::new(),
            participants: vec![],
        }),
    )
    .await;
    assert_eq!(code(third), ErrorCode::LimitExceeded);
    assert_eq!(list(&a).await.len(), 2);
    let bad = req(
        &a,
        request::Body::RoomCreate(v1::RoomCreateRequest {
            room_id: "bad id!".into(),
            name: String::new(),
            participants: vec![],
        }),
    )
    .await;
    assert_eq!(code(bad), ErrorCode::BadRequest);
}

async fn typing_reaches_participants_only(t: TransportKind) {
    let s = TestServer::start_with(|c| c.chat.typing_per_second = 2).await;
    let a = s.connect(t, "alice").await;
    let b = s.connect(t, "bob").await;
    let eve = s.connect(t, "eve").await;
    create_room(&a, "r", &["bob"]).await;
    // Make sure Bob's session is subscribed (his connect-time subscription or the
    // create event) before typing.
    let m = send(&a, "alice~r", "x").await.unwrap();
    assert_eq!(next_message(&b).await, m);
    let typing = v1::datagram::Kind::Typing(v1::ChatTyping {
        room_id: "alice~r".into(),
        user_id: "spoofed".into(),
        typing: true,
    });
    eve.send_datagram(v1::datagram::Kind::Typing(v1::ChatTyping {
        room_id: "alice~r".into(),
        user_id: String::new(),
        typing: true,
    }))
    .unwrap();
    // Datagrams may be lost: bursts of 5, a few times if need be. Bob gets at most
    // the rate limit (2 a second) per burst, all from Alice (the server sets the
    // user id), none from Eve.
    let mut got = 0;
    for _ in 0..3 {
        for _ in 0..5 {
            a.send_datagram(typing.clone()).unwrap();
        }
        let deadline = tokio::time::Instant::now() + Duration::from_millis(900);
        while let Ok(Some(ev)) = tokio::time::timeout_at(deadline, b.next_event()).await {
            if let Event::Datagram(v1::datagram::Kind::Typing(t)) = ev {
                assert_eq!(t.user_id, "alice");
                got += 1;
            }
        }
        assert!(got <= 2, "rate limit exceeded: {got}");
        if got > 0 {
            break;
        }
    }
    assert!(got >= 1, "no typing indicator arrived in 3 bursts");
}

async fn reconnect_resumes_exactly_the_missed_messages(t: TransportKind) {
    let s = TestServer::start().await;
    let a = s.connect(t, "alice").await;
    let b = s.connect(t, "bob").await;
    create_room(&a, "r", &["bob"]).await;
    create_room(&a, "quiet", &["bob"]).await;
    for i in 1..=3 {
        send(&a, "alice~r", &format!("seen {i}")).await.unwrap();
    }
    let mut last = 0;
    while last < 3 {
        last = next_message(&b).await.offset;
    }
    // Bob's connection drops; messages arrive meanwhile.
    drop(b);
    for i in 4..=8 {
        send(&a, "alice~r", &format!("missed {i}")).await.unwrap();
    }
    let mut config = s.client_config(t, &s.token("bob"));
    config.resume = HashMap::from([
        ("room/alice~r".to_string(), 3),
        ("room/alice~quiet".to_string(), 0),
    ]);
    let b = Client::connect(config).await.unwrap();
    let live = async {
        // Sent while Bob may still be catching up: it must come after the missed ones.
        send(&a, "alice~r", "live 9").await.unwrap()
    };
    let (live, got) = tokio::join!(live, async {
        let mut got = Vec::new();
        while got.len() < 6 {
            got.push(next_message(&b).await);
        }
        got
    });
    let offsets: Vec<u64> = got.iter().map(|m| m.offset).collect();
    assert_eq!(
        offsets,
        [4, 5, 6, 7, 8, 9],
        "exactly the missed ones, in order, then live"
    );
    assert_eq!(got[5], live);
    // Nothing twice afterwards.
    b.echo(b"sync".to_vec(), true).await.unwrap();
    loop {
        match b.next_event().await.unwrap() {
            Event::Push(StreamKind::System, _) => break,
            Event::Push(StreamKind::Chat, p) => {
                assert!(
                    !matches!(p.event, Some(push::Event::ChatMessage(_))),
                    "duplicate {p:?}"
                )
            }
            _ => {}
        }
    }
}

/// Resuming a room from 0 replays every message; from 2^64-1 (beyond the end) none,
/// and the live ones still follow. `before_offset` 2^64-1 pages from the newest;
/// marking read at 2^64-1 is capped at the last message.
async fn resume_and_history_offsets_at_the_extremes(t: TransportKind) {
    let s = TestServer::start().await;
    let a = s.connect(t, "alice").await;
    create_room(&a, "r", &["bob"]).await;
    let mut sent = Vec::new();
    for i in 1..=3 {
        sent.push(send(&a, "alice~r", &format!("m{i}")).await.unwrap());
    }
    let resume = |offset: u64| {
        let mut config = s.client_config(t, &s.token("bob"));
        config.resume = HashMap::from([("room/alice~r".to_string(), offset)]);
        Client::connect(config)
    };
    let b = resume(0).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(next_message(&b).await);
    }
    assert_eq!(got, sent);
    drop(b);
    let b = resume(u64::MAX).await.unwrap();
    let page = history(&b, "alice~r", u64::MAX, 2).await.unwrap();
    assert_eq!(page.messages, sent[1..]);
    assert!(page.more);
    let live = send(&a, "alice~r", "live").await.unwrap();
    assert_eq!(next_message(&b).await, live, "nothing replayed before it");
    let r = mark_read(&b, "alice~r", u64::MAX).await.unwrap();
    assert_eq!((r.read_offset, r.unread), (4, 0));
}

/// Messages in the room the large-room test seeds.
const LARGE_ROOM: u64 = 50_000;
/// The p99 of a participant's sends while another catches up from offset 0 of that
/// room stays under this (a debug build on a shared two-core machine, where such
/// sends take 30-60 ms and a catch-up of the whole room takes 400-600 ms).
const CATCH_UP_SEND_P99: Duration = Duration::from_millis(250);

/// Bob reconnects resuming from offset 0 of a room with 50,000 messages: he receives
/// all of them exactly once and in order, then the live ones, while Alice's sends in
/// that room go on meanwhile, their p99 under [`CATCH_UP_SEND_P99`].
async fn resuming_from_zero_in_a_large_room_does_not_stall_it(t: TransportKind) {
    use std::sync::atomic::{AtomicBool, Ordering};
    // Alice sends as fast as she can while Bob catches up: the point is the stall,
    // not her rate, so the per-user chat limit is off.
    let s = TestServer::start_with(|c| {
        c.limits.rate.chat_send = tutti::services::rate::Rate::OFF;
    })
    .await;
    let a = s.connect(t, "alice").await;
    create_room(&a, "big", &["bob"]).await;
    let chat = &s.server().services().chat;
    let mut seeded = 0;
    while seeded < LARGE_ROOM {
        let texts = (seeded + 1..=(seeded + 5_000).min(LARGE_ROOM))
            .map(|i| format!("seeded {i}"))
            .collect::<Vec<_>>();
        seeded += texts.len() as u64;
        chat.post_many(
            &tutti::ids::RoomId::parse("alice~big").unwrap(),
            tutti::services::chat::Sender::System,
            texts,
        )
        .await
        .unwrap();
    }
    // A new session for Alice: the seeded messages were pushed live to the old one.
    drop(a);
    let a = s.connect(t, "alice").await;
    let mut config = s.client_config(t, &s.token("bob"));
    config.resume = HashMap::from([("room/alice~big".to_string(), 0)]);
    let b = Client::connect(config).await.unwrap();
    let caught_up = AtomicBool::new(false);
    // Alice keeps sending while Bob catches up, timing each send; a few more after.
    let alice = async {
        let mut during = Vec::new();
        let mut sent = 0u64;
        let mut after = 0;
        while after < 5 {
            let busy = !caught_up.load(Ordering::Acquire);
            let started = std::time::Instant::now();
            send(&a, "alice~big", &format!("live {sent}"))
                .await
                .unwrap();
            sent += 1;
            if busy {
                during.push(started.elapsed());
            } else {
                after += 1;
            }
        }
        (during, sent)
    };
    let bob = async {
        let mut next = 1;
        while next <= LARGE_ROOM {
            let m = next_message(&b).await;
            assert_eq!(m.offset, next, "in order, each once");
            assert_eq!(m.text, format!("seeded {next}"));
            next += 1;
        }
        caught_up.store(true, Ordering::Release);
        next
    };
    let ((mut during, sent), mut next) = tokio::join!(alice, bob);
    // Then exactly Alice's live messages, in order.
    while next <= LARGE_ROOM + sent {
        let m = next_message(&b).await;
        assert_eq!(m.offset, next, "live ones follow in order, each once");
        assert_eq!(m.text, format!("live {}", next - LARGE_ROOM - 1));
        next += 1;
    }
    b.echo(b"sync".to_vec(), true).await.unwrap();
    loop {
        match b.next_event().await.unwrap() {
            Event::Push(StreamKind::System, _) => break,
            Event::Push(StreamKind::Chat, p) => assert!(
                !matches!(p.event, Some(push::Event::ChatMessage(_))),
                "duplicate {p:?}"
            ),
            _ => {}
        }
    }
    during.sort();
    let p99 = during[(during.len() * 99).div_ceil(100) - 1];
    eprintln!(
        "{t:?}: {} sends during the catch-up, p99 {p99:?}, max {:?}",
        during.len(),
        during.last().unwrap()
    );
    assert!(
        during.len() >= 10,
        "only {} sends completed while Bob caught up: the room stalled",
        during.len()
    );
    assert!(
        p99 < CATCH_UP_SEND_P99,
        "p99 of sends during a catch-up {p99:?} (bound {CATCH_UP_SEND_P99:?})"
    );
}

/// The server process is killed with SIGKILL; everything acknowledged before is
/// there after a restart on the same data directory, and a client resumes from its
/// offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let certs = dir.path().join("certs");
        let spawn = || {
            let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_tutti"))
                .args([
                    "serve",
                    "--dev",
                    "--listen",
                    "127.0.0.1:0",
                    "--http",
                    "127.0.0.1:0",
                ])
                .arg("--data-dir")
                .arg(&data)
                .arg("--cert-dir")
                .arg(&certs)
                .env_remove("TUTTI_JWT_SECRET")
                .env("TUTTI_LOG", "warn")
                .stdout(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            (child, stdout)
        };
        /// (UDP address, HTTP address) from the server's banner.
        async fn addrs(
            stdout: tokio::process::ChildStdout,
        ) -> (std::net::SocketAddr, std::net::SocketAddr) {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            let mut http = None;
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(rest) = line.trim().strip_prefix("page:") {
                    let url = rest
                        .trim()
                        .trim_start_matches("http://")
                        .trim_end_matches('/');
                    http = Some(url.parse().unwrap());
                }
                if let Some(rest) = line.trim().strip_prefix("raw quic:") {
                    // Keep draining the server's output.
                    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                    let quic = rest.split_whitespace().next().unwrap().parse().unwrap();
                    return (quic, http.expect("page line first"));
                }
            }
            panic!("the server printed no address");
        }
        let (mut child, stdout) = spawn();
        let (addr, http) = addrs(stdout).await;
        let auth = tutti::auth::Auth::from_config(&Default::default(), true, &data).unwrap();
        let tls = tutti::config::TlsConfig {
            cert_dir: certs.clone(),
            ..Default::default()
        };
        let pin = tutti::tls::CertStore::from_config(&tls).unwrap().pin();
        let connect = |addr, user: &str, resume: HashMap<String, u64>| {
            let mut c = tutti::client::ClientConfig::new(
                addr,
                TransportKind::Quic,
                Trust::Pinned(vec![pin]),
                auth.mint(user, Duration::from_secs(600), &[]).unwrap(),
            );
            c.resume = resume;
            Client::connect(c)
        };
        let a = connect(addr, "alice", HashMap::new()).await.unwrap();
        create_room(&a, "r", &["bob"]).await;
        // The server runs with the default join policy: Bob accepts.
        let b = connect(addr, "bob", HashMap::new()).await.unwrap();
        b.accept_invite("alice~r").await.unwrap();
        drop(b);
        let mut acked = Vec::new();
        for i in 1..=20 {
            acked.push(send(&a, "alice~r", &format!("durable {i}")).await.unwrap());
        }
        let key = std::fs::read_to_string(data.join("dev-api-key")).unwrap();
        for i in 1..=3 {
            let body = format!(r#"{{"user_id":"bob","kind":"k","title":"n{i}"}}"#);
            let (status, _) = support::http_with(
                http,
                "POST",
                "/api/v1/notifications",
                Some(&body),
                Some(key.trim()),
            )
            .await;
            assert_eq!(status, 201);
        }
        child.kill().await.unwrap(); // SIGKILL: no shutdown, no flush
        drop(a);

        let (_child, stdout) = spawn();
        let (addr, _) = addrs(stdout).await;
        let resume = HashMap::from([
            ("room/alice~r".to_string(), 5),
            ("notifications".to_string(), 1),
        ]);
        let b = connect(addr, "bob", resume).await.unwrap();
        let mut got = Vec::new();
        let mut notes = Vec::new();
        while got.len() < 15 || notes.len() < 2 {
            match b.next_event().await.expect("session open") {
                Event::Push(StreamKind::Chat, p) => {
                    if let Some(push::Event::ChatMessage(m)) = p.event {
                        got.push(m);
                    }
                }
                Event::Push(StreamKind::Notifications, p) => {
                    if let Some(push::Event::Notification(n)) = p.event {
                        notes.push(n.title);
                    }
                }
                _ => {}
            }
        }
        assert_eq!(got, acked[5..]);
        assert_eq!(notes, ["n2", "n3"]);
        assert_eq!(
            history(&b, "alice~r", 0, 100).await.unwrap().messages,
            acked
        );
        assert_eq!(list(&b).await["alice~r"].unread, 20);
        // The room's offsets go on from its stored log.
        assert_eq!(send(&b, "alice~r", "after").await.unwrap().offset, 21);
    })
    .await
    .expect("test timed out");
}

// ---- Consent: invitations, join policies, ids namespaced per creator ----------

both_transports!(
    invitees_are_not_participants_until_they_accept,
    declines_and_withdrawn_invitations,
    the_contacts_policy_adds_contacts_and_invites_others,
    chosen_room_ids_are_namespaced_per_creator,
    the_server_api_adds_participants_directly,
);

async fn presence_get(c: &Client, user: &str) -> Result<response::Body, ClientError> {
    req(
        c,
        request::Body::PresenceGet(v1::PresenceGetRequest {
            user_ids: vec![user.into()],
        }),
    )
    .await
}

/// An invitee gets no room messages, does not count toward their room limit, and
/// is not a co-participant for presence until they accept.
async fn invitees_are_not_participants_until_they_accept(t: TransportKind) {
    let s = TestServer::start_with(|c| {
        c.rooms.join_policy = JoinPolicy::Invite;
        c.chat.max_rooms_per_user = 1;
    })
    .await;
    let a = s.connect(t, "alice").await;
    let b = s.connect(t, "bob").await;
    create_room(&b, "own", &[]).await;
    // Bob is in his limit of rooms; an invitation does not count.
    let room = create_room(&a, "r", &["bob"]).await;
    assert_eq!(room.invitees, ["bob"]);
    let invite = next_invite(&b).await;
    assert_eq!(
        (
            invite.room_id.as_str(),
            invite.name.as_str(),
            invite.inviter_id.as_str()
        ),
        ("alice~r", "room r", "alice")
    );
    assert_eq!(b.room_invites().await.unwrap(), [invite]);
    send(&a, "alice~r", "before bob").await.unwrap();
    assert!(!list(&b).await.contains_key("alice~r"));
    for c in [&a, &b] {
        let other = if std::ptr::eq(c, &a) { "bob" } else { "alice" };
        assert_eq!(
            code(presence_get(c, other).await),
            ErrorCode::PermissionDenied
        );
    }
    assert_eq!(
        code(history(&b, "alice~r", 0, 10).await),
        ErrorCode::NotFound
    );
    assert_eq!(code(mark_read(&b, "alice~r", 1).await), ErrorCode::NotFound);
    // Accepting counts: over the limit, refused, and the invitation stays.
    assert_eq!(
        code(b.accept_invite("alice~r").await),
        ErrorCode::LimitExceeded
    );
    assert_eq!(b.room_invites().await.unwrap().len(), 1);
    req(
        &b,
        request::Body::RoomLeave(v1::RoomLeaveRequest {
            room_id: "bob~own".into(),
        }),
    )
    .await
    .unwrap();
    b.accept_invite("alice~r").await.unwrap();
    assert!(b.room_invites().await.unwrap().is_empty());
    assert_eq!(
        next_room_event(&a, room_event::Kind::Added).await.user_id,
        "bob"
    );
    // Now a participant: history (with what came before), live messages, presence.
    assert_eq!(
        history(&b, "alice~r", 0, 10).await.unwrap().messages.len(),
        1
    );
    let m = send(&a, "alice~r", "hi bob").await.unwrap();
    assert_eq!(next_message(&b).await, m);
    presence_get(&a, "bob").await.unwrap();
    presence_get(&b, "alice").await.unwrap();
    // Accepting twice: there is no invitation any more.
    assert_eq!(code(b.accept_invite("alice~r").await), ErrorCode::NotFound);
}

async fn declines_and_withdrawn_invitations(t: TransportKind) {
    let s = TestServer::start_with(|c| {
        c.rooms.join_policy = JoinPolicy::Invite;
        c.rooms.max_invites_per_user = 1;
    })
    .await;
    let a = s.connect(t, "alice").await;
    let b = s.connect(t, "bob").await;
    let carol = s.connect(t, "carol").await;
    create_room(&a, "r", &["bob"]).await;
    // Bob has his one pending invitation: Carol's is refused, and her room is not made.
    let full = req(
        &carol,
        request::Body::RoomCreate(v1::RoomCreateRequest {
            room_id: "c".into(),
            name: String::new(),
            participants: vec!["bob".into()],
        }),
    )
    .await;
    assert_eq!(code(full), ErrorCode::LimitExceeded);
    assert!(list(&carol).await.is_empty());
    b.decline_invite("alice~r").await.unwrap();
    let declined = next_room_event(&a, room_event::Kind::Declined).await;
    assert_eq!(declined.user_id, "bob");
    assert!(declined.room.unwrap().invitees.is_empty());
    assert_eq!(code(b.accept_invite("alice~r").await), ErrorCode::NotFound);
    assert_eq!(code(b.decline_invite("alice~r").await), ErrorCode::NotFound);
    // Invited again with RoomAdd (as an admin), then withdrawn with RoomRemove.
    let add = |admin| {
        req(
            &a,
            request::Body::RoomAdd(v1::RoomAddRequest {
                room_id: "alice~r".into(),
                user_id: "bob".into(),
                admin,
            }),
        )
    };
    match add(true).await.unwrap() {
        response::Body::RoomAdd(r) => {
            let room = r.room.unwrap();
            assert_eq!(
                (room.participants, room.invitees),
                (vec!["alice".to_string()], vec!["bob".to_string()])
            );
        }
        other => panic!("{other:?}"),
    }
    let invites = b.room_invites().await.unwrap();
    assert_eq!(invites.len(), 1);
    assert!(invites[0].admin);
    req(
        &a,
        request::Body::RoomRemove(v1::RoomRemoveRequest {
            room_id: "alice~r".into(),
            user_id: "bob".into(),
        }),
    )
    .await
    .unwrap();
    assert!(b.room_invites().await.unwrap().is_empty());
    assert_eq!(code(b.accept_invite("alice~r").await), ErrorCode::NotFound);
    // Invited and accepted as an admin.
    add(true).await.unwrap();
    let room = b.accept_invite("alice~r").await.unwrap();
    assert_eq!(room.admins, ["alice", "bob"]);
}

async fn the_contacts_policy_adds_contacts_and_invites_others(t: TransportKind) {
    let s = TestServer::start_with(|c| c.rooms.join_policy = JoinPolicy::Contacts).await;
    let a = s.connect(t, "alice").await;
    let b = s.connect(t, "bob").await;
    req(
        &a,
        request::Body::ContactRequest(v1::ContactRequestRequest {
            user_id: "bob".into(),
        }),
    )
    .await
    .unwrap();
    req(
        &b,
        request::Body::ContactAccept(v1::ContactAcceptRequest {
            user_id: "alice".into(),
        }),
    )
    .await
    .unwrap();
    let room = create_room(&a, "r", &["bob", "carol"]).await;
    assert_eq!(room.participants, ["alice", "bob"]);
    assert_eq!(room.invitees, ["carol"]);
    let m = send(&a, "alice~r", "hi").await.unwrap();
    assert_eq!(next_message(&b).await, m);
}

/// A chosen id is "<creator>~<name>": two users' never collide, so creating one
/// tells nobody whether someone else's exists.
async fn chosen_room_ids_are_namespaced_per_creator(t: TransportKind) {
    let s = TestServer::start().await;
    let a = s.connect(t, "alice").await;
    let eve = s.connect(t, "eve").await;
    assert_eq!(
        create_room(&a, "general", &[]).await.room_id,
        "alice~general"
    );
    assert_eq!(
        create_room(&eve, "general", &[]).await.room_id,
        "eve~general"
    );
    let again = req(
        &a,
        request::Body::RoomCreate(v1::RoomCreateRequest {
            room_id: "general".into(),
            name: String::new(),
            participants: vec![],
        }),
    )
    .await;
    assert_eq!(code(again), ErrorCode::Conflict, "only the creator's own");
    for bad in ["alice~general", "eve~x", "a b"] {
        let r = req(
            &eve,
            request::Body::RoomCreate(v1::RoomCreateRequest {
                room_id: bad.into(),
                name: String::new(),
                participants: vec![],
            }),
        )
        .await;
        assert_eq!(code(r), ErrorCode::BadRequest, "{bad}");
    }
    let generated = create_room(&eve, "", &[]).await.room_id;
    assert!(!generated.contains('~') && !generated.is_empty());
}

/// A backend with the API key is trusted: it adds participants without an
/// invitation, whatever the join policy; an invitation the user had is consumed.
async fn the_server_api_adds_participants_directly(t: TransportKind) {
    let s = TestServer::start_with(|c| c.rooms.join_policy = JoinPolicy::Invite).await;
    let a = s.connect(t, "alice").await;
    let b = s.connect(t, "bob").await;
    create_room(&a, "r", &["bob"]).await;
    let s = &s;
    let add = |room: &'static str, body: &'static str| async move {
        let path = format!("/api/v1/rooms/{room}/participants");
        s.api("POST", &path, Some(body)).await
    };
    let (status, text) = add("alice~r", r#"{"user_id":"bob"}"#).await;
    assert_eq!(status, 200, "{text}");
    let json: tutti::api::ParticipantsJson = serde_json::from_str(&text).unwrap();
    assert_eq!(json.participants, ["alice", "bob"]);
    assert!(b.room_invites().await.unwrap().is_empty(), "consumed");
    let m = send(&a, "alice~r", "hi").await.unwrap();
    assert_eq!(next_message(&b).await, m);
    let (status, text) = add("alice~r", r#"{"user_id":"carol","admin":true}"#).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(add("alice~missing", r#"{"user_id":"bob"}"#).await.0, 404);
    assert_eq!(add("alice~r", r#"{"user_id":"a b"}"#).await.0, 400);
    assert_eq!(add("alice~r", r#"{"user":"bob"}"#).await.0, 400);
    let (_, text) = s
        .http_post("/api/v1/rooms/alice~r/participants", r#"{"user_id":"eve"}"#)
        .await;
    assert!(!text.contains("eve\""), "no key, no change: {text}");
}
