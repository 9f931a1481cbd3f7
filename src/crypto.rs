//! Cryptographic helpers shared by the server and the native client: SHA-256 and
//! the rustls provider with Tutti's cipher-suite order. Depends on nothing of ours.

/// ring's provider with the TLS 1.3 suites in the order Tutti prefers: AES-128-GCM
/// with SHA-256 first (as browsers offer them), then AES-256-GCM with SHA-384, then
/// ChaCha20-Poly1305. rustls lists AES-256 first; on CPUs with SHA-NI for SHA-256
/// but not SHA-512 (most x86 servers), SHA-384's key schedule costs about 6% of a
/// handshake in software, and AES-128 encrypts every packet in 10 rounds, not 14.
pub fn crypto_provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::cipher_suite as cs;
    rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        ..rustls::crypto::ring::default_provider()
    }
}

/// SHA-256 of some bytes.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    digest.as_ref().try_into().expect("SHA-256 is 32 bytes")
}
