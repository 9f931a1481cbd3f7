//! Presence and contacts through the real server: several devices per user, the
//! grace period before OFFLINE (no flapping on a quick reconnect), status changes
//! reaching accepted contacts and room co-participants only, the contact request /
//! accept / remove flows with their events and codes, permissions on `get`,
//! durability of contacts and last_seen across a restart, and a client that vanishes
//! without closing shown offline after the idle timeout and the grace period.
//!
//! "Nothing was pushed" is proven with a marker on the same (ordered) presence
//! stream: a marker user's contact request, which arrives after anything that was
//! queued before it.

mod support;

use std::time::{Duration, Instant};

use support::{EVENT_WAIT, TestServer};
use tutti::client::{Client, ClientError, Event};
use tutti::protocol::ErrorCode;
use tutti::protocol::v1::{
    self, ContactState, PresenceStatus, StreamKind, push, request, response,
};
use tutti::transport::TransportKind;

async fn req(c: &Client, body: request::Body) -> Result<response::Body, ClientError> {
    c.request(body).await
}

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> ErrorCode {
    match r {
        Err(ClientError::Server(e)) => e.error_code().expect("a known code"),
        other => panic!("expected a server error, got {other:?}"),
    }
}

async fn set(c: &Client, status: PresenceStatus) -> Result<v1::PresenceState, ClientError> {
    match req(
        c,
        request::Body::PresenceSet(v1::PresenceSetRequest {
            status: status as i32,
        }),
    )
    .await?
    {
        response::Body::PresenceSet(r) => Ok(r.state.unwrap()),
        other => panic!("{other:?}"),
    }
}

async fn get(c: &Client, users: &[&str]) -> Result<Vec<v1::PresenceState>, ClientError> {
    match req(
        c,
        request::Body::PresenceGet(v1::PresenceGetRequest {
            user_ids: users.iter().map(|s| s.to_string()).collect(),
        }),
    )
    .await?
    {
        response::Body::PresenceGet(r) => Ok(r.states),
        other => panic!("{other:?}"),
    }
}

async fn get_one(c: &Client, user: &str) -> v1::PresenceState {
    let mut states = get(c, &[user]).await.unwrap();
    assert_eq!(states.len(), 1);
    states.pop().unwrap()
}

async fn contact_request(c: &Client, user: &str) -> Result<ContactState, ClientError> {
    match req(
        c,
        request::Body::ContactRequest(v1::ContactRequestRequest {
            user_id: user.into(),
        }),
    )
    .await?
    {
        response::Body::ContactRequest(r) => Ok(r.state()),
        other => panic!("{other:?}"),
    }
}

async fn contact_accept(c: &Client, user: &str) -> Result<(), ClientError> {
    match req(
        c,
        request::Body::ContactAccept(v1::ContactAcceptRequest {
            user_id: user.into(),
        }),
    )
    .await?
    {
        response::Body::ContactAccept(_) => Ok(()),
        other => panic!("{other:?}"),
    }
}

async fn contact_remove(c: &Client, user: &str) -> Result<(), ClientError> {
    match req(
        c,
        request::Body::ContactRemove(v1::ContactRemoveRequest {
            user_id: user.into(),
        }),
    )
    .await?
    {
        response::Body::ContactRemove(_) => Ok(()),
        other => panic!("{other:?}"),
    }
}

async fn contact_list(c: &Client) -> Vec<v1::Contact> {
    match req(c, request::Body::ContactList(v1::ContactListRequest {}))
        .await
        .unwrap()
    {
        response::Body::ContactList(r) => r.contacts,
        other => panic!("{other:?}"),
    }
}

fn presence(user: &str, status: PresenceStatus, last_seen_ms: u64) -> push::Event {
    push::Event::Presence(v1::PresenceState {
        user_id: user.into(),
        status: status as i32,
        last_seen_ms,
    })
}

fn contact(user: &str, state: ContactState) -> push::Event {
    push::Event::ContactEvent(v1::ContactEvent {
        user_id: user.into(),
        state: state as i32,
    })
}

/// The next event on `c`'s presence stream (other streams are skipped).
async fn next_presence(c: &Client) -> push::Event {
    tokio::time::timeout(EVENT_WAIT, async {
        loop {
            if let Event::Push(StreamKind::Presence, p) = c.next_event().await.expect("open") {
                return p.event.expect("an event");
            }
        }
    })
    .await
    .expect("no presence event in time")
}

/// The next presence state of `user` with `status` pushed to `c`, skipping anything
/// else.
async fn wait_presence(c: &Client, user: &str, status: PresenceStatus) -> v1::PresenceState {
    tokio::time::timeout(EVENT_WAIT, async {
        loop {
            if let push::Event::Presence(s) = next_presence(c).await
                && s.user_id == user
                && s.status() == status
            {
                return s;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{user} never became {status:?}"))
}

/// The next contact event pushed to `c`, skipping presence states.
async fn next_contact_event(c: &Client) -> push::Event {
    loop {
        let e = next_presence(c).await;
        if matches!(e, push::Event::ContactEvent(_)) {
            return e;
        }
    }
}

/// Proves nothing is queued on `c`'s presence stream: a marker user's contact
/// request must be the very next presence event.
async fn assert_quiet(s: &TestServer, t: TransportKind, c: &Client, user: &str, tag: &str) {
    let marker_user = format!("marker-{tag}");
    let marker = s.connect(t, &marker_user).await;
    assert_eq!(
        contact_request(&marker, user).await.unwrap(),
        ContactState::Requested
    );
    assert_eq!(
        next_presence(c).await,
        contact(&marker_user, ContactState::Incoming),
        "{user} was pushed something before the marker"
    );
}

/// Makes `a` and `b` accepted contacts, `b` being the long-lived client `bc`; `a`
/// uses a session of its own, closed again, and `bc` sees `a` go offline.
async fn befriend(s: &TestServer, t: TransportKind, a: &str, bc: &Client, b: &str) {
    let ac = s.connect(t, a).await;
    set(&ac, PresenceStatus::Online).await.unwrap();
    assert_eq!(
        contact_request(&ac, b).await.unwrap(),
        ContactState::Requested
    );
    contact_accept(bc, a).await.unwrap();
    drop(ac);
    let off = wait_presence(bc, a, PresenceStatus::Offline).await;
    assert!(off.last_seen_ms > 0);
}

fn now_ms() -> u64 {
    tutti::util::unix_millis()
}

both_transports!(
    a_user_is_online_until_the_last_device_leaves,
    a_reconnect_within_grace_does_not_flap,
    status_reaches_contacts_and_room_peers_only,
    contact_requests_accept_and_remove,
    contacts_and_last_seen_survive_a_restart,
    a_vanished_client_is_offline_after_idle_timeout_and_grace,
);

async fn a_user_is_online_until_the_last_device_leaves(t: TransportKind) {
    let grace = Duration::from_millis(100);
    let s = TestServer::start_with(|c| c.presence.grace = grace).await;
    let bob = s.connect(t, "bob").await;
    befriend(&s, t, "alice", &bob, "bob").await;

    let phone = s.connect(t, "alice").await;
    assert_eq!(
        next_presence(&bob).await,
        presence("alice", PresenceStatus::Online, 0)
    );
    let laptop = s.connect(t, "alice").await;
    // The status is the user's: set on the laptop, it is Alice's.
    set(&laptop, PresenceStatus::Away).await.unwrap();
    assert_eq!(
        next_presence(&bob).await,
        presence("alice", PresenceStatus::Away, 0)
    );
    // The phone hears the laptop's change too.
    assert_eq!(
        next_presence(&phone).await,
        presence("alice", PresenceStatus::Away, 0)
    );

    // The laptop leaves: the phone keeps Alice online, well past the grace period
    // (no event to wait for here: a short sleep, then a marker).
    let n = s.server().sessions();
    drop(laptop);
    s.wait_sessions(n - 1).await;
    tokio::time::sleep(grace * 3).await;
    assert_eq!(get_one(&bob, "alice").await.status(), PresenceStatus::Away);
    assert_quiet(&s, t, &bob, "bob", "one-left").await;

    // The phone leaves: Bob sees Alice offline, with when she left.
    let before = now_ms();
    drop(phone);
    let off = match next_presence(&bob).await {
        push::Event::Presence(p) => p,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (off.user_id.as_str(), off.status()),
        ("alice", PresenceStatus::Offline)
    );
    assert!(
        (before..=now_ms()).contains(&off.last_seen_ms),
        "{} not in [{before}, now]",
        off.last_seen_ms
    );
    assert_eq!(get_one(&bob, "alice").await, off);
    assert_eq!(
        s.server()
            .services()
            .presence
            .presence_of("alice")
            .await
            .unwrap(),
        off
    );
}

async fn a_reconnect_within_grace_does_not_flap(t: TransportKind) {
    let grace = Duration::from_secs(1);
    let s = TestServer::start_with(|c| c.presence.grace = grace).await;
    let bob = s.connect(t, "bob").await;
    befriend(&s, t, "alice", &bob, "bob").await;

    let first = s.connect(t, "alice").await;
    assert_eq!(
        next_presence(&bob).await,
        presence("alice", PresenceStatus::Online, 0)
    );
    let n = s.server().sessions();
    drop(first);
    s.wait_sessions(n - 1).await;
    let left = Instant::now();
    // Back within the grace period: Bob hears only the new status, no OFFLINE and
    // no second ONLINE.
    let second = s.connect(t, "alice").await;
    set(&second, PresenceStatus::DoNotDisturb).await.unwrap();
    assert!(
        left.elapsed() < grace,
        "the reconnect took too long to test"
    );
    assert_eq!(
        next_presence(&bob).await,
        presence("alice", PresenceStatus::DoNotDisturb, 0)
    );
    // The cancelled timer would have fired by now (nothing to wait on: a sleep).
    tokio::time::sleep_until((left + grace + grace / 2).into()).await;
    assert_quiet(&s, t, &bob, "bob", "reconnected").await;
    assert_eq!(
        get_one(&bob, "alice").await.status(),
        PresenceStatus::DoNotDisturb
    );

    // Leaving for good: OFFLINE, but only after the grace period.
    let gone = Instant::now();
    drop(second);
    let off = wait_presence(&bob, "alice", PresenceStatus::Offline).await;
    assert!(
        gone.elapsed() >= grace,
        "offline after {:?}",
        gone.elapsed()
    );
    assert!(off.last_seen_ms > 0);
}

async fn status_reaches_contacts_and_room_peers_only(t: TransportKind) {
    // The default join policy: Carol shares the room once she accepts.
    let s = TestServer::start_with(|c| {
        c.presence.grace = Duration::from_millis(100);
        c.rooms.join_policy = tutti::services::chat::JoinPolicy::Invite;
    })
    .await;
    let bob = s.connect(t, "bob").await; // an accepted contact
    befriend(&s, t, "alice", &bob, "bob").await;
    let carol = s.connect(t, "carol").await; // shares a room
    let eve = s.connect(t, "eve").await; // a stranger, connected throughout

    let alice = s.connect(t, "alice").await;
    assert_eq!(
        next_presence(&bob).await,
        presence("alice", PresenceStatus::Online, 0)
    );
    req(
        &alice,
        request::Body::RoomCreate(v1::RoomCreateRequest {
            room_id: "r".into(),
            name: "r".into(),
            participants: vec!["carol".into()],
        }),
    )
    .await
    .unwrap();
    // Invited, Carol is no co-participant yet: she may not read Alice's presence.
    let early = req(
        &carol,
        request::Body::PresenceGet(v1::PresenceGetRequest {
            user_ids: vec!["alice".into()],
        }),
    )
    .await;
    match early {
        Err(tutti::client::ClientError::Server(e)) => {
            assert_eq!(
                e.error_code(),
                Some(tutti::protocol::ErrorCode::PermissionDenied)
            )
        }
        other => panic!("{other:?}"),
    }
    carol.accept_invite("alice~r").await.unwrap();

    let r = set(&alice, PresenceStatus::Away).await.unwrap();
    assert_eq!(
        r,
        v1::PresenceState {
            user_id: "alice".into(),
            status: PresenceStatus::Away as i32,
            last_seen_ms: 0,
        }
    );
    assert_eq!(
        next_presence(&bob).await,
        presence("alice", PresenceStatus::Away, 0)
    );
    // Carol may or may not have heard Alice come online (the room was created
    // right after); she hears the change.
    wait_presence(&carol, "alice", PresenceStatus::Away).await;
    // Setting the same status again announces nothing.
    set(&alice, PresenceStatus::Away).await.unwrap();
    set(&alice, PresenceStatus::DoNotDisturb).await.unwrap();
    for c in [&bob, &carol] {
        assert_eq!(
            next_presence(c).await,
            presence("alice", PresenceStatus::DoNotDisturb, 0)
        );
    }
    // Eve heard none of it.
    assert_quiet(&s, t, &eve, "eve", "stranger").await;

    // Who may read Alice's presence.
    assert_eq!(
        get_one(&bob, "alice").await.status(),
        PresenceStatus::DoNotDisturb
    );
    assert_eq!(
        get_one(&carol, "alice").await.status(),
        PresenceStatus::DoNotDisturb
    );
    assert_eq!(
        get_one(&alice, "alice").await.status(),
        PresenceStatus::DoNotDisturb
    );
    assert_eq!(
        code(get(&eve, &["alice"]).await),
        ErrorCode::PermissionDenied
    );
    // One stranger in the list fails the whole request.
    assert_eq!(
        code(get(&alice, &["bob", "eve"]).await),
        ErrorCode::PermissionDenied
    );
    let both = get(&alice, &["bob", "carol"]).await.unwrap();
    assert_eq!(
        both.iter()
            .map(|p| (p.user_id.as_str(), p.status()))
            .collect::<Vec<_>>(),
        [
            ("bob", PresenceStatus::Online),
            ("carol", PresenceStatus::Online)
        ]
    );
    assert!(get(&alice, &[]).await.unwrap().is_empty());

    // Bad input.
    for status in [PresenceStatus::Offline, PresenceStatus::Unspecified] {
        assert_eq!(code(set(&alice, status).await), ErrorCode::BadRequest);
    }
    let bad = req(
        &alice,
        request::Body::PresenceSet(v1::PresenceSetRequest { status: 99 }),
    )
    .await;
    assert_eq!(code(bad), ErrorCode::BadRequest);
    assert_eq!(code(get(&alice, &[""]).await), ErrorCode::BadRequest);
    let many: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
    let many: Vec<&str> = many.iter().map(String::as_str).collect();
    assert_eq!(code(get(&alice, &many).await), ErrorCode::LimitExceeded);

    // Alice leaves: her contact and her room peer hear it, the stranger does not.
    drop(alice);
    for c in [&bob, &carol] {
        let off = wait_presence(c, "alice", PresenceStatus::Offline).await;
        assert!(off.last_seen_ms > 0);
    }
    assert_quiet(&s, t, &eve, "eve", "stranger-2").await;
}

async fn contact_requests_accept_and_remove(t: TransportKind) {
    let s = TestServer::start_with(|c| c.presence.max_contacts = 3).await;
    let alice = s.connect(t, "alice").await;
    let alice2 = s.connect(t, "alice").await; // another device of Alice's
    let bob = s.connect(t, "bob").await;

    // Bad input and nothing to act on.
    assert_eq!(
        code(contact_request(&alice, "alice").await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(contact_request(&alice, "").await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(contact_request(&alice, "a b").await),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(contact_accept(&alice, "bob").await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(contact_remove(&alice, "bob").await),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(contact_accept(&alice, "alice").await),
        ErrorCode::BadRequest
    );

    // Alice asks Bob.
    assert_eq!(
        contact_request(&alice, "bob").await.unwrap(),
        ContactState::Requested
    );
    assert_eq!(
        next_contact_event(&bob).await,
        contact("alice", ContactState::Incoming)
    );
    assert_eq!(
        next_contact_event(&alice2).await,
        contact("bob", ContactState::Requested)
    );
    // Asking again changes nothing; Alice cannot accept her own request.
    assert_eq!(
        contact_request(&alice, "bob").await.unwrap(),
        ContactState::Requested
    );
    assert_eq!(
        code(contact_accept(&alice, "bob").await),
        ErrorCode::NotFound
    );
    let listed = |c: Vec<v1::Contact>| {
        c.into_iter()
            .map(|c| (c.user_id.clone(), c.state(), c.presence.map(|p| p.status())))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        listed(contact_list(&alice).await),
        [("bob".to_string(), ContactState::Requested, None)]
    );
    assert_eq!(
        listed(contact_list(&bob).await),
        [("alice".to_string(), ContactState::Incoming, None)]
    );
    // Not a contact yet.
    assert_eq!(
        code(get(&bob, &["alice"]).await),
        ErrorCode::PermissionDenied
    );

    // Bob accepts.
    contact_accept(&bob, "alice").await.unwrap();
    assert_eq!(
        next_contact_event(&alice).await,
        contact("bob", ContactState::Accepted)
    );
    assert_eq!(
        next_contact_event(&alice2).await,
        contact("bob", ContactState::Accepted)
    );
    assert_eq!(
        listed(contact_list(&alice).await),
        [(
            "bob".to_string(),
            ContactState::Accepted,
            Some(PresenceStatus::Online)
        )]
    );
    assert_eq!(
        listed(contact_list(&bob).await),
        [(
            "alice".to_string(),
            ContactState::Accepted,
            Some(PresenceStatus::Online)
        )]
    );
    assert_eq!(
        get_one(&bob, "alice").await.status(),
        PresenceStatus::Online
    );
    assert_eq!(
        contact_request(&bob, "alice").await.unwrap(),
        ContactState::Accepted
    );
    assert_eq!(
        code(contact_accept(&bob, "alice").await),
        ErrorCode::NotFound
    );

    // Bob removes Alice: both sides forget, and presence is private again.
    contact_remove(&bob, "alice").await.unwrap();
    assert_eq!(
        next_contact_event(&alice).await,
        contact("bob", ContactState::Removed)
    );
    assert!(contact_list(&alice).await.is_empty());
    assert!(contact_list(&bob).await.is_empty());
    assert_eq!(
        code(get(&bob, &["alice"]).await),
        ErrorCode::PermissionDenied
    );
    assert_eq!(
        code(get(&alice, &["bob"]).await),
        ErrorCode::PermissionDenied
    );

    // A request can be declined (removed by the one asked).
    contact_request(&alice, "bob").await.unwrap();
    assert_eq!(
        next_contact_event(&bob).await,
        contact("alice", ContactState::Incoming)
    );
    contact_remove(&bob, "alice").await.unwrap();
    assert_eq!(
        next_contact_event(&alice).await,
        contact("bob", ContactState::Removed)
    );
    assert!(contact_list(&alice).await.is_empty());

    // Two who ask each other are contacts.
    let carol = s.connect(t, "carol").await;
    assert_eq!(
        contact_request(&carol, "dave").await.unwrap(),
        ContactState::Requested
    );
    let dave = s.connect(t, "dave").await;
    assert_eq!(
        listed(contact_list(&dave).await),
        [("carol".to_string(), ContactState::Incoming, None)],
        "requests wait for an offline user"
    );
    assert_eq!(
        contact_request(&dave, "carol").await.unwrap(),
        ContactState::Accepted
    );
    assert_eq!(
        next_contact_event(&carol).await,
        contact("dave", ContactState::Accepted)
    );

    // The limit counts contacts and requests, on both sides.
    for u in ["u1", "u2", "u3"] {
        contact_request(&alice, u).await.unwrap();
    }
    assert_eq!(
        code(contact_request(&alice, "u4").await),
        ErrorCode::LimitExceeded
    );
    assert_eq!(
        code(contact_request(&bob, "alice").await),
        ErrorCode::LimitExceeded
    );
    assert_eq!(contact_list(&alice).await.len(), 3);
    assert!(contact_list(&bob).await.is_empty());
    contact_remove(&alice, "u3").await.unwrap();
    assert_eq!(
        contact_request(&bob, "alice").await.unwrap(),
        ContactState::Requested
    );
}

async fn contacts_and_last_seen_survive_a_restart(t: TransportKind) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = support::test_config(dir.path());
    config.presence.grace = Duration::from_millis(100);
    let mut s = TestServer {
        server: Some(tutti::start(config.clone()).await.unwrap()),
        dir,
    };
    let alice = s.connect(t, "alice").await;
    let bob = s.connect(t, "bob").await;
    let carol = s.connect(t, "carol").await;
    set(&bob, PresenceStatus::Away).await.unwrap();
    contact_request(&alice, "bob").await.unwrap();
    contact_accept(&bob, "alice").await.unwrap();
    contact_request(&carol, "alice").await.unwrap();
    assert_eq!(
        next_contact_event(&alice).await,
        contact("bob", ContactState::Accepted)
    );
    drop(bob);
    let bob_seen = wait_presence(&alice, "bob", PresenceStatus::Offline)
        .await
        .last_seen_ms;
    assert!(bob_seen > 0);
    drop((alice, carol));
    // Alice's last_seen is stored by the time the shutdown has closed her session.
    let before_shutdown = now_ms();
    s.shutdown().await;

    s.server = Some(tutti::start(config).await.unwrap());
    let service = &s.server().services().presence;
    let bob_state = service.presence_of("bob").await.unwrap();
    assert_eq!(
        (bob_state.status(), bob_state.last_seen_ms),
        (PresenceStatus::Offline, bob_seen)
    );
    let alice_state = service.presence_of("alice").await.unwrap();
    assert_eq!(alice_state.status(), PresenceStatus::Offline);
    assert!(alice_state.last_seen_ms > 0 && alice_state.last_seen_ms <= before_shutdown + 1000);
    assert_eq!(service.presence_of("nobody").await.unwrap().last_seen_ms, 0);

    let alice = s.connect(t, "alice").await;
    let contacts = contact_list(&alice).await;
    let listed: Vec<_> = contacts
        .iter()
        .map(|c| (c.user_id.as_str(), c.state(), c.presence.clone()))
        .collect();
    assert_eq!(
        listed,
        [
            ("bob", ContactState::Accepted, Some(bob_state.clone())),
            ("carol", ContactState::Incoming, None),
        ]
    );
    assert_eq!(get_one(&alice, "bob").await, bob_state);
    // The relation still works both ways: Bob comes back and Alice hears it.
    let bob = s.connect(t, "bob").await;
    assert_eq!(
        next_presence(&alice).await,
        presence("bob", PresenceStatus::Online, 0),
        "a fresh session starts ONLINE"
    );
    assert_eq!(
        get_one(&bob, "alice").await.status(),
        PresenceStatus::Online
    );
    contact_accept(&alice, "carol").await.unwrap();
}

async fn a_vanished_client_is_offline_after_idle_timeout_and_grace(t: TransportKind) {
    let idle = Duration::from_secs(1);
    let grace = Duration::from_millis(200);
    let s = TestServer::start_with(|c| {
        c.presence.grace = grace;
        c.timeouts.idle = idle;
        c.timeouts.heartbeat = Duration::from_millis(300);
    })
    .await;
    let bob = s.connect(t, "bob").await;
    befriend(&s, t, "alice", &bob, "bob").await;

    // Alice's client connects on a runtime of its own, sends no keep-alives of its
    // own, then freezes: its runtime stops, so nothing answers the server any more
    // (no close, no acknowledgement), as when a device loses its network.
    let mut config = s.client_config(t, &s.token("alice"));
    config.keep_alive = Duration::from_secs(60);
    tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client = rt.block_on(async {
            let c = Client::connect(config).await.unwrap();
            set(&c, PresenceStatus::Away).await.unwrap();
            c
        });
        // Neither is ever run or dropped again: no close is sent.
        std::mem::forget(client);
        std::mem::forget(rt);
    })
    .await
    .unwrap();
    let frozen = Instant::now();
    wait_presence(&bob, "alice", PresenceStatus::Away).await;

    let off = wait_presence(&bob, "alice", PresenceStatus::Offline).await;
    let took = frozen.elapsed();
    assert!(off.last_seen_ms > 0);
    // Seen by the idle timeout, not by a close; then the grace period.
    assert!(took >= idle, "offline after {took:?}");
    assert!(took < idle + grace + Duration::from_secs(5), "{took:?}");
}
