//! TLS 1.3 session tickets that any node of a cluster can open, so a client that
//! reconnects (after a restart, a failover, a network change) resumes its TLS
//! session instead of running a full handshake: no certificate to send, sign and
//! check.
//!
//! A ticket is `epoch (8 bytes) || nonce (12) || AES-256-GCM(session state)`, with
//! the epoch as associated data. The key of an epoch is derived with HKDF-SHA256
//! from a secret every node shares (the token signing secret), so every node makes
//! the same keys without talking to the others; the key rotates every `period`
//! (the epoch is the Unix time divided by it), and a ticket is accepted during its
//! own epoch and the next one, so it lives between one and two periods. A ticket
//! that does not open (another secret, an older epoch, altered bytes) just means a
//! full handshake.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};

/// How long a key is used for new tickets (a ticket stays valid one more period).
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(6 * 3600);

const EPOCH_LEN: usize = 8;
const TAG_LEN: usize = 16;

/// Makes and opens session tickets with keys derived from a shared secret.
pub struct SharedTicketer {
    prk: hkdf::Prk,
    period_secs: u64,
    rng: SystemRandom,
    now_secs: Box<dyn Fn() -> u64 + Send + Sync>,
    opened: Arc<AtomicU64>,
}

impl std::fmt::Debug for SharedTicketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedTicketer")
            .field("period_secs", &self.period_secs)
            .finish_non_exhaustive()
    }
}

fn unix_secs() -> u64 {
    crate::util::unix_millis() / 1000
}

impl SharedTicketer {
    /// A ticketer keyed by `secret`, rotating every `period` (at least a minute).
    /// `opened` counts the tickets it opened (the resumptions it allowed).
    pub fn new(secret: &[u8], period: Duration, opened: Arc<AtomicU64>) -> Self {
        Self::with_clock(secret, period, opened, Box::new(unix_secs))
    }

    fn with_clock(
        secret: &[u8],
        period: Duration,
        opened: Arc<AtomicU64>,
        now_secs: Box<dyn Fn() -> u64 + Send + Sync>,
    ) -> Self {
        // A fixed salt separates these keys from every other use of the secret.
        let prk =
            hkdf::Salt::new(hkdf::HKDF_SHA256, b"tutti tls session tickets v1").extract(secret);
        Self {
            prk,
            period_secs: period.as_secs().max(60),
            rng: SystemRandom::new(),
            now_secs,
            opened,
        }
    }

    fn epoch(&self) -> u64 {
        (self.now_secs)() / self.period_secs
    }

    fn key(&self, epoch: u64) -> Option<LessSafeKey> {
        let epoch = epoch.to_be_bytes();
        let info = [b"ticket key".as_slice(), epoch.as_slice()];
        let okm = self.prk.expand(&info, &AES_256_GCM).ok()?;
        Some(LessSafeKey::new(UnboundKey::from(okm)))
    }
}

impl rustls::server::ProducesTickets for SharedTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        u32::try_from(self.period_secs).unwrap_or(u32::MAX)
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let epoch = self.epoch();
        let key = self.key(epoch)?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(EPOCH_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(epoch.to_be_bytes()),
            &mut body,
        )
        .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() < EPOCH_LEN + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (epoch, rest) = ticket.split_at(EPOCH_LEN);
        let epoch = u64::from_be_bytes(epoch.try_into().ok()?);
        let now = self.epoch();
        // Its own epoch and the next; one ahead too, for a node whose clock is
        // a little behind the node that made it.
        if !(epoch == now || epoch + 1 == now || epoch == now + 1) {
            return None;
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = sealed.to_vec();
        let len = self
            .key(epoch)?
            .open_in_place(nonce, Aad::from(epoch.to_be_bytes()), &mut body)
            .ok()?
            .len();
        body.truncate(len);
        self.opened.fetch_add(1, Ordering::Relaxed);
        Some(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    /// A ticketer whose clock reads `now` (seconds).
    fn ticketer(secret: &[u8], now: &Arc<AtomicU64>) -> SharedTicketer {
        let now = now.clone();
        SharedTicketer::with_clock(
            secret,
            Duration::from_secs(3600),
            Arc::default(),
            Box::new(move || now.load(Ordering::Relaxed)),
        )
    }

    #[test]
    fn tickets_open_on_any_node_with_the_secret_and_only_there() {
        let now = Arc::new(AtomicU64::new(1_000_000));
        let a = ticketer(b"a shared secret of thirty-two bytes!", &now);
        let b = ticketer(b"a shared secret of thirty-two bytes!", &now);
        let other = ticketer(b"another secret, another cluster.....", &now);
        let t = a.encrypt(b"session state").unwrap();
        assert_eq!(b.decrypt(&t).unwrap(), b"session state");
        assert_eq!(b.opened.load(Ordering::Relaxed), 1);
        assert!(other.decrypt(&t).is_none());
        assert_ne!(
            a.encrypt(b"session state").unwrap(),
            t,
            "a fresh nonce each time"
        );
        // Altered anywhere (epoch, nonce, body, tag), or cut short: refused.
        for i in [0, 7, 8, 19, 20, t.len() - 1] {
            let mut bad = t.clone();
            bad[i] ^= 1;
            assert!(b.decrypt(&bad).is_none(), "byte {i}");
        }
        assert!(b.decrypt(&t[..30]).is_none());
        assert!(b.decrypt(&[]).is_none());
        assert_eq!(b.opened.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn keys_rotate_and_a_ticket_lives_one_more_period() {
        let secret = b"a shared secret of thirty-two bytes!";
        let now = Arc::new(AtomicU64::new(7_200_000));
        let node = ticketer(secret, &now);
        let t = node.encrypt(b"s").unwrap();
        now.store(7_200_000 + 3600, Ordering::Relaxed);
        assert_eq!(node.decrypt(&t).unwrap(), b"s", "the next period");
        let newer = node.encrypt(b"s").unwrap();
        assert_ne!(newer[..8], t[..8], "a new epoch");
        now.store(7_200_000 + 2 * 3600, Ordering::Relaxed);
        assert!(node.decrypt(&t).is_none(), "two periods on");
        assert!(node.decrypt(&newer).is_some());
    }
}
