//! The authorization matrix: every request type × every relation a user can have
//! to a room and a document (owner, room admin, participant, document editor and
//! viewer, invitee who has not accepted, revoked, outsider), over both transports,
//! each answer checked against one table. Wherever the answer is `NOT_FOUND`, the
//! same request about an id that does not exist must get exactly the same error
//! (code, name and message): an outsider cannot tell that a room or document exists.
//!
//! Adding a request type means adding one row to [`rows`].

// Requests are built with `..Default::default()` even where every field is set, so
// that fields added to the protocol later leave the table compiling.
#![allow(clippy::needless_update)]

mod support;

use support::TestServer;
use tutti::client::{Client, ClientError};
use tutti::protocol::ErrorCode;
use tutti::protocol::v1::{self, DocRole, PresenceStatus, request, response};
use tutti::services::chat::JoinPolicy;
use tutti::transport::TransportKind;

/// The relations, in the order of a row's expectations.
const ROLES: [&str; 8] = [
    "owner",
    "admin",
    "participant",
    "editor",
    "viewer",
    "invitee",
    "revoked",
    "outsider",
];

/// The user who plays each relation. `alice` owns the room (as its creator and
/// admin) and the document; `adam` is a room admin and `pat` a participant (neither
/// has the document); `ed` and `vic` edit and view the document (neither is in the
/// room); `ivy` is invited into the room and has not accepted; `rex` was a
/// participant and an editor and was removed from both; `eve` was never anything.
const USERS: [&str; 8] = ["alice", "adam", "pat", "ed", "vic", "ivy", "rex", "eve"];

/// What a request must get.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Any successful answer.
    Ok,
    /// This error.
    Err(ErrorCode),
}

use Expect::{Err as E, Ok as O};
const NF: Expect = E(ErrorCode::NotFound);
const PD: Expect = E(ErrorCode::PermissionDenied);

/// The ids a row's request is about.
struct Ids {
    room: String,
    doc: String,
    /// Unique per fixture, for ids and users a request makes up.
    n: usize,
}

/// One request type: how to build it, whether it changes the fixture (then each
/// cell gets a fresh one), requests the caller sends first and after (their
/// answers are not checked), and the expected answer per relation, in [`ROLES`] order.
struct Row {
    name: &'static str,
    mutates: bool,
    setup: fn(&Ids) -> Vec<request::Body>,
    /// Requests the caller sends after, undoing what the request did to the
    /// caller's own state (which outlives the fixture).
    teardown: fn(&Ids) -> Vec<request::Body>,
    body: fn(&Ids) -> request::Body,
    expect: [Expect; 8],
}

fn none(_: &Ids) -> Vec<request::Body> {
    vec![]
}

fn open_doc(i: &Ids) -> Vec<request::Body> {
    vec![request::Body::DocOpen(v1::DocOpenRequest {
        doc_id: i.doc.clone(),
        ..Default::default()
    })]
}

/// Every request type of `Request.body` (the oneof in frames.proto).
fn rows() -> Vec<Row> {
    use request::Body as B;
    vec![
        Row {
            name: "echo",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| B::Echo(v1::EchoRequest::default()),
            expect: [O; 8],
        },
        Row {
            // A token is about its own user, never a room or document: a forged one
            // is refused for everyone (the rules for genuine ones are in foundation).
            name: "auth_refresh",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| {
                B::AuthRefresh(v1::AuthRefreshRequest {
                    token: "not.a.token".into(),
                    ..Default::default()
                })
            },
            expect: [PD; 8],
        },
        Row {
            name: "room_create",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| {
                B::RoomCreate(v1::RoomCreateRequest {
                    name: "mine".into(),
                    ..Default::default()
                })
            },
            expect: [O; 8],
        },
        Row {
            name: "room_add",
            mutates: true,
            setup: none,
            teardown: none,
            body: |i| {
                B::RoomAdd(v1::RoomAddRequest {
                    room_id: i.room.clone(),
                    user_id: format!("zed{}", i.n),
                    admin: false,
                })
            },
            expect: [O, O, PD, NF, NF, NF, NF, NF],
        },
        Row {
            name: "room_remove",
            mutates: true,
            setup: none,
            teardown: none,
            body: |i| {
                B::RoomRemove(v1::RoomRemoveRequest {
                    room_id: i.room.clone(),
                    user_id: "pat".into(),
                })
            },
            expect: [O, O, PD, NF, NF, NF, NF, NF],
        },
        Row {
            name: "room_leave",
            mutates: true,
            setup: none,
            teardown: none,
            body: |i| {
                B::RoomLeave(v1::RoomLeaveRequest {
                    room_id: i.room.clone(),
                })
            },
            expect: [O, O, O, NF, NF, NF, NF, NF],
        },
        Row {
            name: "room_list",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| B::RoomList(Default::default()),
            expect: [O; 8],
        },
        Row {
            name: "chat_send",
            mutates: false,
            setup: none,
            teardown: none,
            body: |i| {
                B::ChatSend(v1::ChatSendRequest {
                    room_id: i.room.clone(),
                    text: "hi".into(),
                    ..Default::default()
                })
            },
            expect: [O, O, O, NF, NF, NF, NF, NF],
        },
        Row {
            name: "chat_history",
            mutates: false,
            setup: none,
            teardown: none,
            body: |i| {
                B::ChatHistory(v1::ChatHistoryRequest {
                    room_id: i.room.clone(),
                    ..Default::default()
                })
            },
            expect: [O, O, O, NF, NF, NF, NF, NF],
        },
        Row {
            name: "chat_mark_read",
            mutates: false,
            setup: none,
            teardown: none,
            body: |i| {
                B::ChatMarkRead(v1::ChatMarkReadRequest {
                    room_id: i.room.clone(),
                    offset: 1,
                })
            },
            expect: [O, O, O, NF, NF, NF, NF, NF],
        },
        Row {
            name: "room_invite_list",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| B::RoomInviteList(Default::default()),
            expect: [O; 8],
        },
        Row {
            name: "room_invite_accept",
            mutates: true,
            setup: none,
            // Having accepted, the invitee would be a co-participant from then on.
            teardown: |i| {
                vec![request::Body::RoomLeave(v1::RoomLeaveRequest {
                    room_id: i.room.clone(),
                })]
            },
            body: |i| {
                B::RoomInviteAccept(v1::RoomInviteAcceptRequest {
                    room_id: i.room.clone(),
                })
            },
            expect: [NF, NF, NF, NF, NF, O, NF, NF],
        },
        Row {
            name: "room_invite_decline",
            mutates: true,
            setup: none,
            teardown: none,
            body: |i| {
                B::RoomInviteDecline(v1::RoomInviteDeclineRequest {
                    room_id: i.room.clone(),
                })
            },
            expect: [NF, NF, NF, NF, NF, O, NF, NF],
        },
        Row {
            name: "notify_list",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| B::NotifyList(Default::default()),
            expect: [O; 8],
        },
        Row {
            // An id of someone else's (the owner's) notification.
            name: "notify_mark_read",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| {
                B::NotifyMarkRead(v1::NotifyMarkReadRequest {
                    notification_ids: vec!["alice:1".into()],
                })
            },
            expect: [O, PD, PD, PD, PD, PD, PD, PD],
        },
        Row {
            name: "notify_mark_all_read",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| B::NotifyMarkAllRead(Default::default()),
            expect: [O; 8],
        },
        Row {
            name: "presence_set",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| {
                B::PresenceSet(v1::PresenceSetRequest {
                    status: PresenceStatus::Online as i32,
                })
            },
            expect: [O; 8],
        },
        Row {
            // The owner's presence: visible to room co-participants who accepted.
            name: "presence_get",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| {
                B::PresenceGet(v1::PresenceGetRequest {
                    user_ids: vec!["alice".into()],
                })
            },
            expect: [O, O, O, PD, PD, PD, PD, PD],
        },
        Row {
            name: "contact_request",
            mutates: false,
            setup: none,
            teardown: none,
            body: |i| {
                B::ContactRequest(v1::ContactRequestRequest {
                    user_id: format!("zed{}", i.n),
                })
            },
            expect: [O; 8],
        },
        Row {
            name: "contact_accept",
            mutates: false,
            setup: none,
            teardown: none,
            body: |i| {
                B::ContactAccept(v1::ContactAcceptRequest {
                    user_id: format!("nobody{}", i.n),
                })
            },
            expect: [NF; 8],
        },
        Row {
            name: "contact_remove",
            mutates: false,
            setup: none,
            teardown: none,
            body: |i| {
                B::ContactRemove(v1::ContactRemoveRequest {
                    user_id: format!("nobody{}", i.n),
                })
            },
            expect: [NF; 8],
        },
        Row {
            name: "contact_list",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| B::ContactList(Default::default()),
            expect: [O; 8],
        },
        Row {
            name: "doc_create",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| B::DocCreate(Default::default()),
            expect: [O; 8],
        },
        Row {
            name: "doc_share",
            mutates: true,
            setup: none,
            teardown: none,
            body: |i| {
                B::DocShare(v1::DocShareRequest {
                    doc_id: i.doc.clone(),
                    user_id: format!("zed{}", i.n),
                    role: DocRole::Viewer as i32,
                })
            },
            expect: [O, NF, NF, PD, PD, NF, NF, NF],
        },
        Row {
            name: "doc_open",
            mutates: false,
            setup: none,
            teardown: none,
            body: |i| {
                B::DocOpen(v1::DocOpenRequest {
                    doc_id: i.doc.clone(),
                    ..Default::default()
                })
            },
            expect: [O, NF, NF, O, O, NF, NF, NF],
        },
        Row {
            name: "doc_close",
            mutates: false,
            setup: none,
            teardown: none,
            body: |i| {
                B::DocClose(v1::DocCloseRequest {
                    doc_id: i.doc.clone(),
                })
            },
            expect: [O; 8],
        },
        Row {
            // After trying to open it: viewers may not edit, others never had it.
            name: "doc_submit",
            mutates: true,
            setup: open_doc,
            teardown: none,
            body: |i| {
                let op = tutti::ot::TextOperation::new().retain(2).insert("!");
                B::DocSubmit(v1::DocSubmitRequest {
                    doc_id: i.doc.clone(),
                    base_revision: 0,
                    op: Some(tutti::protocol::ot_wire::op_to_wire(&op)),
                    client_id: "c".into(),
                    seq: 1,
                    ..Default::default()
                })
            },
            expect: [O, NF, NF, O, PD, NF, NF, NF],
        },
        Row {
            name: "doc_list",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| B::DocList(Default::default()),
            expect: [O; 8],
        },
        Row {
            name: "analytics_track",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| {
                B::AnalyticsTrack(v1::AnalyticsTrackRequest {
                    events: vec![v1::AnalyticsEvent {
                        r#type: "page_view".into(),
                        ..Default::default()
                    }],
                })
            },
            expect: [O; 8],
        },
        // Reading analytics takes the token role `metrics`, which none of these
        // users has, whatever they are to rooms and documents.
        Row {
            name: "analytics_series",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| {
                B::AnalyticsSeries(v1::AnalyticsSeriesRequest {
                    r#type: "page_view".into(),
                    duration_ms: 60_000,
                    resolution_ms: 1_000,
                    ..Default::default()
                })
            },
            expect: [PD; 8],
        },
        Row {
            name: "analytics_top",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| {
                B::AnalyticsTop(v1::AnalyticsTopRequest {
                    window_ms: 60_000,
                    limit: 10,
                })
            },
            expect: [PD; 8],
        },
        Row {
            name: "analytics_distinct_users",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| {
                B::AnalyticsDistinctUsers(v1::AnalyticsDistinctUsersRequest { window_ms: 60_000 })
            },
            expect: [PD; 8],
        },
        Row {
            name: "metrics_subscribe",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| {
                B::MetricsSubscribe(v1::MetricsSubscribeRequest {
                    interval_ms: 1_000,
                    ..Default::default()
                })
            },
            expect: [PD; 8],
        },
        Row {
            name: "metrics_unsubscribe",
            mutates: false,
            setup: none,
            teardown: none,
            body: |_| B::MetricsUnsubscribe(Default::default()),
            expect: [O; 8],
        },
    ]
}

async fn ok(c: &Client, body: request::Body) -> response::Body {
    let name = body.name();
    c.request(body)
        .await
        .unwrap_or_else(|e| panic!("fixture {name}: {e:?}"))
}

/// A room and a document where every relation of [`ROLES`] holds, made by the
/// owner's session and the server API (which adds participants directly).
async fn fixture(s: &TestServer, owner: &Client, n: usize) -> Ids {
    use request::Body as B;
    let room = match ok(
        owner,
        B::RoomCreate(v1::RoomCreateRequest {
            room_id: format!("r{n}"),
            name: "room".into(),
            participants: vec!["ivy".into()],
        }),
    )
    .await
    {
        response::Body::RoomCreate(r) => r.room.unwrap(),
        other => panic!("{other:?}"),
    };
    assert_eq!(room.invitees, ["ivy"], "the default policy invites");
    for (user, admin) in [("adam", true), ("pat", false), ("rex", false)] {
        let body = format!(r#"{{"user_id":"{user}","admin":{admin}}}"#);
        let path = format!("/api/v1/rooms/{}/participants", room.room_id);
        let (status, text) = s.api("POST", &path, Some(&body)).await;
        assert_eq!(status, 200, "{text}");
    }
    ok(
        owner,
        B::RoomRemove(v1::RoomRemoveRequest {
            room_id: room.room_id.clone(),
            user_id: "rex".into(),
        }),
    )
    .await;
    let doc = match ok(
        owner,
        B::DocCreate(v1::DocCreateRequest {
            doc_id: format!("d{n}"),
            text: "ab".into(),
        }),
    )
    .await
    {
        response::Body::DocCreate(d) => d.doc_id,
        other => panic!("{other:?}"),
    };
    for (user, role) in [
        ("ed", DocRole::Editor),
        ("vic", DocRole::Viewer),
        ("rex", DocRole::Editor),
        ("rex", DocRole::Unspecified),
    ] {
        ok(
            owner,
            B::DocShare(v1::DocShareRequest {
                doc_id: doc.clone(),
                user_id: user.into(),
                role: role as i32,
            }),
        )
        .await;
    }
    Ids {
        room: room.room_id,
        doc,
        n,
    }
}

fn outcome(r: &Result<response::Body, ClientError>) -> Expect {
    match r {
        Ok(response::Body::Error(e)) => E(e.error_code().expect("a known code")),
        Ok(_) => O,
        Err(ClientError::Server(e)) => E(e.error_code().expect("a known code")),
        Err(e) => panic!("not an answer: {e:?}"),
    }
}

fn error_of(r: Result<response::Body, ClientError>) -> v1::Error {
    match r {
        Err(ClientError::Server(e)) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

async fn matrix(t: TransportKind) {
    let s = TestServer::start_with(|c| {
        c.rooms.join_policy = JoinPolicy::Invite;
        c.rooms.max_invites_per_user = 10_000;
        c.chat.max_rooms_per_user = 10_000;
        // The matrix makes a room per mutating cell; rates are tested in retention.
        c.limits.rate = tutti::services::rate::RateConfig::off();
    })
    .await;
    let mut clients = Vec::new();
    for u in USERS {
        clients.push(s.connect(t, u).await);
    }
    let owner = &clients[0];
    let mut n = 0;
    let shared = fixture(&s, owner, n).await;
    let missing = Ids {
        room: "alice~missing".into(),
        doc: "alice~missing".into(),
        n: 0,
    };
    let mut failures = Vec::new();
    let mut cells = 0;
    for row in rows() {
        for (r, role) in ROLES.iter().enumerate() {
            let fresh;
            let ids = if row.mutates {
                n += 1;
                fresh = fixture(&s, owner, n).await;
                &fresh
            } else {
                &shared
            };
            let c = &clients[r];
            for b in (row.setup)(ids) {
                let _ = c.request(b).await;
            }
            let got = c.request((row.body)(ids)).await;
            cells += 1;
            for b in (row.teardown)(ids) {
                let _ = c.request(b).await;
            }
            let want = row.expect[r];
            if outcome(&got) != want {
                failures.push(format!(
                    "{} as {role}: got {got:?}, want {want:?}",
                    row.name
                ));
                continue;
            }
            // The existence promise: the same request about ids that exist nowhere
            // gets exactly the same error.
            if want == NF {
                for b in (row.setup)(&missing) {
                    let _ = c.request(b).await;
                }
                let there = error_of(got);
                let absent = error_of(c.request((row.body)(&missing)).await);
                if (there.code, &there.name, &there.message)
                    != (absent.code, &absent.name, &absent.message)
                {
                    failures.push(format!(
                        "{} as {role}: {there:?} for an existing id, {absent:?} for a missing one",
                        row.name
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("{t:?}: {cells} cells checked");
}

/// Every request type of the protocol has a row (names from the metrics list,
/// which covers every `Request.body` case).
#[test]
fn every_request_type_has_a_row() {
    let covered: Vec<&str> = rows().iter().map(|r| r.name).collect();
    for name in tutti::metrics::REQUEST_TYPES {
        if *name != "unknown" {
            assert!(covered.contains(name), "no row for {name}");
        }
    }
}

both_transports!(matrix);
