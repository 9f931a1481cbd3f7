//! Opening a TUN device, optionally inside another network namespace.
//!
//! The workspace has no TUN crate, so this is the ioctl by hand: open
//! `/dev/net/tun`, then `TUNSETIFF` with the device name and `IFF_TUN | IFF_NO_PI`
//! (whole IP packets, no packet-information header). An existing device of that
//! name (e.g. made by `ip tuntap add mode tun`) is attached to; a missing one is
//! created and disappears when the descriptor closes. The device is looked up in
//! the network namespace of the thread that opens `/dev/net/tun`, so for a device
//! in another namespace the thread enters it (`setns`) for the open and returns
//! to its own namespace before anything else happens. The descriptor keeps
//! working when the interface is later moved to another namespace.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use anyhow::{Context, bail};

/// Opens TUN device `name` (non-blocking) in network namespace `netns` (a name
/// under `/run/netns`, or a path), or in the current one.
pub(super) fn open(name: &str, netns: Option<&str>) -> anyhow::Result<File> {
    match netns {
        None => open_here(name),
        Some(ns) => {
            let path = if ns.contains('/') {
                PathBuf::from(ns)
            } else {
                PathBuf::from("/run/netns").join(ns)
            };
            let target = File::open(&path)
                .with_context(|| format!("network namespace {}", path.display()))?;
            let home = File::open("/proc/thread-self/ns/net")
                .context("this thread's network namespace")?;
            enter(&target).with_context(|| format!("entering {}", path.display()))?;
            let opened = open_here(name);
            // Not returning would leave this thread (and every thread it starts)
            // in the other namespace.
            enter(&home).context("returning to the original network namespace")?;
            opened.with_context(|| format!("in network namespace {ns}"))
        }
    }
}

/// `setns(fd, CLONE_NEWNET)` for the calling thread.
fn enter(ns: &File) -> anyhow::Result<()> {
    // SAFETY: setns takes a descriptor and a flag; `ns` is open for the call.
    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("setns(CLONE_NEWNET)");
    }
    Ok(())
}

/// Opens `/dev/net/tun` and attaches it to (or creates) device `name` in the
/// current network namespace.
fn open_here(name: &str) -> anyhow::Result<File> {
    let bytes = name.as_bytes();
    if bytes.is_empty()
        || bytes.len() >= libc::IFNAMSIZ
        || bytes
            .iter()
            .any(|&b| b == 0 || b == b'/' || b.is_ascii_whitespace())
    {
        bail!(
            "invalid interface name {name:?} (1–{} characters, no '/' or spaces)",
            libc::IFNAMSIZ - 1
        );
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .context("/dev/net/tun (is the tun module there, and are we root?)")?;
    // SAFETY: ifreq is plain data (a name array and a union of integers and
    // pointers), for which all zero bytes are a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, &src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`, which `ifr` is, and
    // the descriptor is open.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| {
            format!(
                "TUNSETIFF {name} (a device of that name must be a TUN device without \
                 multi_queue)"
            )
        });
    }
    Ok(file)
}
