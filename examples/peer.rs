//! A native Tutti peer driven by lines on stdin, built on the public `tutti::client`
//! API: it chats in rooms and edits documents next to browsers and prints what it
//! receives. The browser tests spawn it; it also shows the client API in use.
//!
//! ```text
//! cargo run --example peer -- --addr 127.0.0.1:4433 --pin <sha-256 hex> --token <jwt>
//! ```
//!
//! Commands (one per line; TEXT runs to the end of the line):
//!
//! - `accept ROOM`: accepts an invitation into a room; prints `accepted ROOM`
//! - `send ROOM TEXT`: sends a chat message; prints `sent ROOM OFFSET`
//! - `open DOC`: opens a document; prints `opened DOC REVISION`
//! - `insert DOC POS TEXT`: inserts TEXT at code point POS
//! - `text DOC`: prints `text DOC REVISION SYNCED <text as a JSON string>`
//! - `quit`
//!
//! Events: `message ROOM OFFSET SENDER <text as JSON>` for every chat message pushed,
//! `changed DOC REVISION` after every operation applied, `error <what>` on failures.
//! `ready USER` is printed once the session is open.

use std::collections::HashMap;
use std::io::Write;

use std::io::BufRead;
use tutti::client::collab::Document;
use tutti::client::{Client, ClientConfig, Event, Trust, parse_pin};
use tutti::ot::TextOperation;
use tutti::protocol::v1::{self, push, request, response};
use tutti::transport::TransportKind;

fn arg(args: &[String], name: &str) -> anyhow::Result<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("missing {name}"))
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Sends a DocSubmitRequest in the background (its acknowledgement arrives as the
/// echo of the operation on the push stream).
fn submit(client: &std::sync::Arc<Client>, req: v1::DocSubmitRequest) {
    let client = client.clone();
    tokio::spawn(async move {
        if let Err(e) = client.request(request::Body::DocSubmit(req)).await {
            say(&format!("error submit: {e}"));
        }
    });
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    rustls::crypto::ring::default_provider()
        .install_default()
        .ok();
    let args: Vec<String> = std::env::args().collect();
    let addr = arg(&args, "--addr")?.parse()?;
    let pin = parse_pin(&arg(&args, "--pin")?).map_err(|e| anyhow::anyhow!(e))?;
    let token = arg(&args, "--token")?;
    let config = ClientConfig::new(addr, TransportKind::Quic, Trust::Pinned(vec![pin]), token);
    let client = std::sync::Arc::new(Client::connect(config).await?);
    say(&format!("ready {}", client.welcome().user_id));
    let client_id = format!("peer-{}", client.welcome().session_id);
    let mut docs: HashMap<String, Document> = HashMap::new();
    // Stdin is read on a thread of its own (blocking reads), one line per message.
    let (line_tx, mut line_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if line_tx.send(line).is_err() {
                break;
            }
        }
    });

    loop {
        tokio::select! {
            line = line_rx.recv() => {
                let Some(line) = line else { break };
                let mut parts = line.splitn(2, ' ');
                let cmd = parts.next().unwrap_or("");
                let rest = parts.next().unwrap_or("");
                match cmd {
                    "quit" => break,
                    "accept" => match client.accept_invite(rest).await {
                        Ok(room) => say(&format!("accepted {}", room.room_id)),
                        Err(e) => say(&format!("error accept: {e}")),
                    },
                    "send" => {
                        let (room, text) = rest.split_once(' ').unwrap_or((rest, ""));
                        let body = request::Body::ChatSend(v1::ChatSendRequest { room_id: room.into(), text: text.into(), client_message_id: String::new() });
                        match client.request(body).await {
                            Ok(response::Body::ChatSend(r)) => {
                                let m = r.message.unwrap_or_default();
                                say(&format!("sent {} {}", m.room_id, m.offset));
                            }
                            Ok(other) => say(&format!("error send: unexpected {other:?}")),
                            Err(e) => say(&format!("error send: {e}")),
                        }
                    }
                    "open" => {
                        let body = request::Body::DocOpen(v1::DocOpenRequest { doc_id: rest.into(), known_revision: None });
                        match client.request(body).await {
                            Ok(response::Body::DocOpen(open)) => match Document::from_open(client_id.clone(), open) {
                                Ok(doc) => {
                                    say(&format!("opened {} {}", rest, doc.revision()));
                                    docs.insert(rest.into(), doc);
                                }
                                Err(e) => say(&format!("error open: {e}")),
                            },
                            Ok(other) => say(&format!("error open: unexpected {other:?}")),
                            Err(e) => say(&format!("error open: {e}")),
                        }
                    }
                    "insert" => {
                        let mut p = rest.splitn(3, ' ');
                        let (doc_id, pos, text) = (p.next().unwrap_or(""), p.next().unwrap_or("0"), p.next().unwrap_or(""));
                        let Some(doc) = docs.get_mut(doc_id) else { say("error insert: not open"); continue };
                        let pos: usize = pos.parse().unwrap_or(0);
                        let len = doc.text().chars().count();
                        let op = TextOperation::new().retain(pos.min(len)).insert(text).retain(len - pos.min(len));
                        match doc.edit(op) {
                            Ok(Some(req)) => submit(&client, req),
                            Ok(None) => {}
                            Err(e) => say(&format!("error insert: {e}")),
                        }
                    }
                    "text" => match docs.get(rest) {
                        Some(doc) => say(&format!(
                            "text {} {} {} {}",
                            rest,
                            doc.revision(),
                            doc.is_synchronized(),
                            serde_json::to_string(doc.text())?
                        )),
                        None => say("error text: not open"),
                    },
                    _ => say(&format!("error unknown command {cmd}")),
                }
            }
            event = client.next_event() => {
                let Some(event) = event else { say("closed"); break };
                let Event::Push(_, p) = event else { continue };
                match p.event {
                    Some(push::Event::ChatMessage(m)) => say(&format!(
                        "message {} {} {} {}",
                        m.room_id,
                        m.offset,
                        m.sender_id,
                        serde_json::to_string(&m.text)?
                    )),
                    Some(push::Event::DocOperation(op)) => {
                        let doc_id = op.doc_id.clone();
                        if let Some(doc) = docs.get_mut(&doc_id) {
                            match doc.on_operation(op) {
                                Ok(next) => {
                                    if let Some(req) = next {
                                        submit(&client, req);
                                    }
                                    say(&format!("changed {} {}", doc_id, doc.revision()));
                                }
                                Err(e) => say(&format!("error operation: {e}")),
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    client.close();
    Ok(())
}
