//! What the kernel charges a sender for one small message on loopback: a UDP
//! datagram sent with `sendmsg` (as quinn sends each QUIC packet), the same in
//! `sendmmsg` batches, and a write to a TCP connection with `TCP_NODELAY` (as
//! Node writes a WebSocket frame). On loopback the sender's system call also runs
//! the receiving side's network stack, as the servers' sends do in the load
//! tests, so this is a floor under a server's CPU per delivery there
//! (docs/BENCHMARKS.md, "Where Tutti falls short").
//!
//! ```sh
//! cargo run --release -p tutti-load --example socket_floor [-- <messages> <bytes>]
//! taskset -c 0 target/release/examples/socket_floor    # on one core
//! ```
//!
//! Each kind sends `messages` (200,000) messages of `bytes` (150) round-robin to
//! 16 receiving sockets, which are drained every 512 messages; the sending and the
//! draining are timed apart, in the thread's own CPU time. Linux only.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Duration;

const PEERS: usize = 16;
const DRAIN_EVERY: usize = 512;

fn main() -> anyhow::Result<()> {
    use anyhow::Context;
    let mut args = std::env::args().skip(1);
    let messages: usize = match args.next() {
        Some(a) => a.parse().context("messages: a count, such as 200000")?,
        None => 200_000,
    };
    let bytes: usize = match args.next() {
        Some(a) => a.parse().context("bytes: a size, such as 150")?,
        None => 150,
    };
    anyhow::ensure!(messages > 0, "messages: at least 1");
    anyhow::ensure!(
        (1..=1400).contains(&bytes),
        "bytes: 1 to 1400 (one datagram on a 1500-byte path)"
    );
    println!(
        "{messages} messages of {bytes} B to {PEERS} peers on loopback, CPU time of the sending thread"
    );
    for round in 1..=2 {
        for batch in [1, 8, 32] {
            let (send, recv) = udp(messages, bytes, batch)?;
            let how = if batch == 1 {
                "sendmsg".to_owned()
            } else {
                format!("sendmmsg, {batch} a call")
            };
            println!(
                "round {round}  UDP {how:<20} {send:6.3} us sent, {recv:6.3} us received, per datagram"
            );
        }
        let (send, recv) = tcp(messages, bytes)?;
        println!(
            "round {round}  TCP write, TCP_NODELAY   {send:6.3} us sent, {recv:6.3} us received, per write"
        );
    }
    Ok(())
}

/// The calling thread's CPU time.
fn cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime");
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

fn per_message(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e6 / n as f64
}

/// Sends `n` datagrams, `batch` a call; returns the send and receive CPU per datagram.
fn udp(n: usize, bytes: usize, batch: usize) -> std::io::Result<(f64, f64)> {
    let sender = UdpSocket::bind("127.0.0.1:0")?;
    let peers = (0..PEERS)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let addrs: Vec<SocketAddr> = peers
        .iter()
        .map(|p| p.local_addr())
        .collect::<Result<_, _>>()?;
    let payload = vec![7u8; bytes];
    let names = sockaddrs(&addrs);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let mut msgs = Vec::with_capacity(batch);
    let mut buf = vec![0u8; 65536];
    let (mut sending, mut draining) = (Duration::ZERO, Duration::ZERO);
    let (mut sent, mut received) = (0, 0);
    while sent < n {
        let t0 = cpu();
        let chunk = DRAIN_EVERY.min(n - sent);
        let mut i = 0;
        while i < chunk {
            let k = batch.min(chunk - i);
            if batch == 1 {
                sender.send_to(&payload, addrs[(sent + i) % PEERS])?;
            } else {
                send_batch(&sender, &mut iov, &names, &mut msgs, sent + i, k)?;
            }
            i += k;
        }
        sent += chunk;
        let t1 = cpu();
        for p in &peers {
            while p.recv(&mut buf).is_ok() {
                received += 1;
            }
        }
        sending += t1 - t0;
        draining += cpu() - t1;
    }
    if received != n {
        eprintln!("UDP: {received} of {n} datagrams arrived; raise net.core.rmem_default");
    }
    Ok((per_message(sending, n), per_message(draining, n)))
}

/// The peers' addresses as `sendmmsg` takes them.
fn sockaddrs(addrs: &[SocketAddr]) -> Vec<libc::sockaddr_in> {
    addrs
        .iter()
        .map(|a| match a {
            SocketAddr::V4(a) => libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*a.ip()).to_be(),
                },
                sin_zero: [0; 8],
            },
            SocketAddr::V6(_) => unreachable!("peers are bound to 127.0.0.1"),
        })
        .collect()
}

/// One `sendmmsg` of `k` datagrams of `iov`, to the peers from `first` on,
/// round-robin. `msgs` is reused from call to call, so nothing is allocated in
/// the timed loop.
fn send_batch(
    sender: &UdpSocket,
    iov: &mut libc::iovec,
    names: &[libc::sockaddr_in],
    msgs: &mut Vec<libc::mmsghdr>,
    first: usize,
    k: usize,
) -> std::io::Result<()> {
    let iov: *mut libc::iovec = iov;
    msgs.clear();
    msgs.extend((0..k).map(|j| {
        // SAFETY: an all-zero msghdr is valid (no name, no iovecs, no control data).
        let mut h: libc::msghdr = unsafe { std::mem::zeroed() };
        h.msg_name = &names[(first + j) % PEERS] as *const libc::sockaddr_in as *mut libc::c_void;
        h.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // Every datagram carries the same bytes; the kernel only reads the iovec.
        h.msg_iov = iov;
        h.msg_iovlen = 1;
        libc::mmsghdr {
            msg_hdr: h,
            msg_len: 0,
        }
    }));
    let mut done = 0;
    while done < k {
        // SAFETY: each header points at a live address, iovec and payload, all of
        // which outlive the call.
        let rc = unsafe {
            libc::sendmmsg(
                sender.as_raw_fd(),
                msgs[done..].as_mut_ptr(),
                (k - done) as libc::c_uint,
                0,
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        done += rc as usize;
    }
    Ok(())
}

/// Writes `n` messages to TCP connections; returns the write and read CPU per message.
fn tcp(n: usize, bytes: usize) -> std::io::Result<(f64, f64)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut pairs = Vec::with_capacity(PEERS);
    for _ in 0..PEERS {
        let client = TcpStream::connect(addr)?;
        client.set_nodelay(true)?;
        let (server, _) = listener.accept()?;
        server.set_nonblocking(true)?;
        pairs.push((client, server));
    }
    let payload = vec![7u8; bytes];
    let mut buf = vec![0u8; 1 << 20];
    let (mut writing, mut reading) = (Duration::ZERO, Duration::ZERO);
    let (mut sent, mut received) = (0, 0);
    while sent < n {
        let t0 = cpu();
        let chunk = DRAIN_EVERY.min(n - sent);
        for i in 0..chunk {
            pairs[(sent + i) % PEERS].0.write_all(&payload)?;
        }
        sent += chunk;
        let t1 = cpu();
        for (_, server) in &mut pairs {
            while let Ok(r) = server.read(&mut buf) {
                if r == 0 {
                    break;
                }
                received += r;
            }
        }
        writing += t1 - t0;
        reading += cpu() - t1;
    }
    if received != n * bytes {
        eprintln!("TCP: {received} of {} bytes read", n * bytes);
    }
    Ok((per_message(writing, n), per_message(reading, n)))
}
