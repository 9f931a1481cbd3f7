//! An in-process simulation: several clients, one authority, messages held
//! in per-connection FIFO queues that are delivered in a random interleaving
//! (so each message waits a random time), with duplicated and lost sends
//! (followed by a resend). Pure and seeded: no sockets, no threads.
//! `TUTTI_SIM_SEEDS` sets the number of seeds (default 200).

use std::collections::{HashSet, VecDeque};

use super::rng::SplitMix64;
use super::{Authority, Client, Outgoing, TextOperation};

/// Server-to-client messages.
enum Down {
    Op(TextOperation),
    Ack,
}

struct Peer {
    id: String,
    client: Client,
    doc: String,
    up: VecDeque<Outgoing>,
    down: VecDeque<Down>,
}

#[derive(Default)]
struct Stats {
    edits: usize,
    duplicates_seen: usize,
    /// Operations whose first send was lost and whose resend was applied.
    recovered: usize,
    max_concurrent: usize,
}

struct World {
    rng: SplitMix64,
    authority: Authority,
    peers: Vec<Peer>,
    /// Every distinct (client, seq) that was sent.
    sent: HashSet<(String, u64)>,
    /// Sends that were dropped from a queue.
    lost: HashSet<(String, u64)>,
    stats: Stats,
}

impl World {
    fn new(seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let doc = rng.doc(5);
        let n = 3 + rng.below(6);
        let peers = (0..n)
            .map(|i| Peer {
                id: format!("client-{i}"),
                client: Client::new(0),
                doc: doc.clone(),
                up: VecDeque::new(),
                down: VecDeque::new(),
            })
            .collect();
        Self {
            rng,
            authority: Authority::new(doc),
            peers,
            sent: HashSet::new(),
            lost: HashSet::new(),
            stats: Stats::default(),
        }
    }

    fn send(&mut self, k: usize, out: Outgoing) {
        let peer = &mut self.peers[k];
        self.sent.insert((peer.id.clone(), out.seq));
        peer.up.push_back(out);
    }

    fn edit(&mut self, k: usize) {
        let len = self.peers[k].doc.chars().count();
        let op = self.rng.op(len, 3);
        let peer = &mut self.peers[k];
        peer.doc = op
            .apply(&peer.doc)
            .expect("a generated op fits its document");
        if !op.is_noop() {
            self.stats.edits += 1;
        }
        if let Some(out) = peer.client.apply_client(op).expect("local edit") {
            self.send(k, out);
        }
    }

    fn deliver_up(&mut self, k: usize) {
        let Some(msg) = self.peers[k].up.pop_front() else {
            return;
        };
        let before = self.authority.revision();
        let id = self.peers[k].id.clone();
        let applied = self
            .authority
            .receive(msg.base_revision, msg.op, Some((&id, msg.seq)))
            .expect("the authority accepts the operation");
        if applied.duplicate {
            self.stats.duplicates_seen += 1;
            assert_eq!(
                self.authority.revision(),
                before,
                "a resend was applied twice"
            );
            assert!(applied.revision <= before);
            return;
        }
        assert_eq!(applied.revision, before + 1);
        if self.lost.contains(&(id, msg.seq)) {
            self.stats.recovered += 1;
        }
        self.stats.max_concurrent = self.stats.max_concurrent.max(applied.concurrent);
        for (i, peer) in self.peers.iter_mut().enumerate() {
            peer.down.push_back(if i == k {
                Down::Ack
            } else {
                Down::Op(applied.op.clone())
            });
        }
    }

    fn deliver_down(&mut self, k: usize) {
        let Some(msg) = self.peers[k].down.pop_front() else {
            return;
        };
        match msg {
            Down::Ack => {
                if let Some(out) = self.peers[k].client.server_ack().expect("an expected ack") {
                    self.send(k, out);
                }
            }
            Down::Op(op) => {
                let peer = &mut self.peers[k];
                let local = peer.client.apply_server(op).expect("server op transforms");
                peer.doc = local.apply(&peer.doc).expect("transformed op fits");
            }
        }
    }

    /// Resend the outstanding operation (a duplicate if the first copy
    /// arrives too); with `lose`, the queued copies are dropped first.
    fn resend(&mut self, k: usize, lose: bool) {
        let peer = &mut self.peers[k];
        if lose {
            for dropped in peer.up.drain(..) {
                self.lost.insert((peer.id.clone(), dropped.seq));
            }
        }
        if let Some(out) = peer.client.resend() {
            assert!(self.sent.contains(&(peer.id.clone(), out.seq)));
            peer.up.push_back(out);
        }
    }

    fn step(&mut self) {
        let k = self.rng.below(self.peers.len());
        match self.rng.below(100) {
            0..35 => self.edit(k),
            35..60 => self.deliver_up(k),
            60..92 => self.deliver_down(k),
            92..97 => self.resend(k, false),
            _ => self.resend(k, true),
        }
    }

    fn pending(&self) -> Vec<(usize, bool)> {
        let mut queues = Vec::new();
        for (k, p) in self.peers.iter().enumerate() {
            if !p.up.is_empty() {
                queues.push((k, true));
            }
            if !p.down.is_empty() {
                queues.push((k, false));
            }
        }
        queues
    }

    /// Delivers everything, in random order, until no message is left.
    fn quiesce(&mut self) {
        loop {
            let queues = self.pending();
            let Some(&(k, up)) = queues.get(self.rng.below(queues.len())) else {
                break;
            };
            if up {
                self.deliver_up(k);
            } else {
                self.deliver_down(k);
            }
        }
    }

    fn check_converged(&self, seed: u64) {
        for p in &self.peers {
            assert_eq!(
                p.doc,
                self.authority.doc(),
                "seed {seed}: {} diverged",
                p.id
            );
            assert!(
                p.client.is_synchronized(),
                "seed {seed}: {} not synchronized",
                p.id
            );
            assert_eq!(
                p.client.revision(),
                self.authority.revision(),
                "seed {seed}"
            );
        }
        // Every distinct send was applied exactly once.
        assert_eq!(
            self.authority.revision(),
            self.sent.len() as u64,
            "seed {seed}"
        );
    }
}

#[test]
fn clients_converge_under_random_delivery() {
    let mut totals = Stats::default();
    let seeds: u64 = std::env::var("TUTTI_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    for seed in 0..seeds {
        let mut world = World::new(seed);
        for _ in 0..100 {
            world.step();
        }
        world.quiesce();
        world.check_converged(seed);
        totals.edits += world.stats.edits;
        totals.duplicates_seen += world.stats.duplicates_seen;
        totals.recovered += world.stats.recovered;
        totals.max_concurrent = totals.max_concurrent.max(world.stats.max_concurrent);
    }
    // The runs exercised what they are meant to.
    if seeds < 200 {
        return;
    }
    assert!(totals.edits > 2_000, "edits {}", totals.edits);
    assert!(
        totals.duplicates_seen > 100,
        "duplicates {}",
        totals.duplicates_seen
    );
    assert!(totals.recovered > 20, "recovered {}", totals.recovered);
    assert!(
        totals.max_concurrent >= 3,
        "concurrency {}",
        totals.max_concurrent
    );
}

#[test]
fn two_clients_typing_at_the_same_place() {
    let mut server = Authority::new("ab");
    let mut alice = Client::new(0);
    let mut bob = Client::new(0);
    let a_op = TextOperation::new().retain(1).insert("A").retain(1);
    let b_op = TextOperation::new().retain(1).insert("B").retain(1);
    let (mut a_doc, mut b_doc) = (a_op.apply("ab").unwrap(), b_op.apply("ab").unwrap());
    let a_out = alice.apply_client(a_op).unwrap().unwrap();
    let b_out = bob.apply_client(b_op).unwrap().unwrap();
    // Alice's reaches the server first; Bob's is transformed and, being the
    // incoming (left) operation, its insert goes first.
    let a_applied = server
        .receive(a_out.base_revision, a_out.op, Some(("alice", a_out.seq)))
        .unwrap();
    let b_applied = server
        .receive(b_out.base_revision, b_out.op, Some(("bob", b_out.seq)))
        .unwrap();
    assert_eq!(server.doc(), "aBAb");
    // Each connection is FIFO: Alice hears her ack (revision 1) before Bob's
    // operation (revision 2); Bob hears Alice's operation before his ack.
    alice.server_ack().unwrap();
    a_doc = alice
        .apply_server(b_applied.op)
        .unwrap()
        .apply(&a_doc)
        .unwrap();
    b_doc = bob
        .apply_server(a_applied.op)
        .unwrap()
        .apply(&b_doc)
        .unwrap();
    bob.server_ack().unwrap();
    assert_eq!(a_doc, "aBAb");
    assert_eq!(b_doc, "aBAb");
}
