//! Follows this network namespace's IPv4 addresses through rtnetlink
//! (rule 11): NodePort frontends are planned on them, so an address added
//! to or removed from the node is seen at once, without polling and without
//! any Service changing.

use std::{
    io, mem,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use anyhow::{Context, Result};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::watch,
};

use super::interface_addresses;

/// How long a burst of address events (an interface coming up with several
/// addresses, a DHCP renewal) is let settle before the addresses are read
/// again: one replan per burst, not one per event.
const SETTLE: Duration = Duration::from_millis(100);

/// Subscribes to address changes, then reads the addresses (in that order,
/// so no change between the two is missed) and follows them on a task. The
/// receiver holds the current list, sorted; the task ends when the
/// receiver is dropped, or closes the channel if the socket fails.
pub fn watch() -> Result<watch::Receiver<Vec<Ipv4Addr>>> {
    let socket =
        AddressEvents::subscribe().context("subscribing to address changes (rtnetlink)")?;
    let addresses = interface_addresses().context("listing interface addresses")?;
    let (sender, receiver) = watch::channel(addresses);
    tokio::spawn(async move {
        if let Err(err) = socket.follow(sender).await {
            tracing::error!(error = format!("{err:#}"), "node address watch failed");
        }
    });
    Ok(receiver)
}

/// A NETLINK_ROUTE socket in the IPv4 address group: it receives an
/// RTM_NEWADDR or RTM_DELADDR message for every IPv4 address added or
/// removed in this namespace, and nothing else.
struct AddressEvents {
    socket: AsyncFd<OwnedFd>,
}

impl AddressEvents {
    fn subscribe() -> io::Result<AddressEvents> {
        // SAFETY: plain socket(2); the descriptor is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_nl is plain data; zeroed is a valid value.
        let mut local: libc::sockaddr_nl = unsafe { mem::zeroed() };
        local.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        local.nl_groups = libc::RTMGRP_IPV4_IFADDR as u32;
        // SAFETY: bind with a valid sockaddr_nl and its size.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&local as *const libc::sockaddr_nl).cast(),
                mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if bound != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: OwnedFd keeps its descriptor open and unchanged until the
        // AsyncFd drops it.
        let socket = unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(AddressEvents { socket })
    }

    /// Sends the addresses again after every burst of events, when they
    /// differ from the last ones sent; returns when nobody listens.
    async fn follow(self, sender: watch::Sender<Vec<Ipv4Addr>>) -> Result<()> {
        loop {
            tokio::select! {
                event = self.next_event() => event.context("reading address events")?,
                () = sender.closed() => return Ok(()),
            }
            tokio::time::sleep(SETTLE).await;
            self.drain().context("reading address events")?;
            let now = match interface_addresses() {
                Ok(now) => now,
                Err(err) => {
                    tracing::warn!(error = %err, "cannot list interface addresses; waiting for the next change");
                    continue;
                }
            };
            sender.send_if_modified(|current| {
                let changed = *current != now;
                *current = now;
                changed
            });
        }
    }

    /// Waits until at least one event arrived, and consumes all waiting.
    async fn next_event(&self) -> io::Result<()> {
        loop {
            let mut ready = self.socket.readable().await?;
            let received = self.drain()?;
            // Drained to EAGAIN: readiness is stale until the next message.
            ready.clear_ready();
            if received {
                return Ok(());
            }
        }
    }

    /// Reads every waiting message; whether there was any. Their content
    /// does not matter: the group only carries address changes, and the
    /// addresses are read whole afterwards. An overrun (ENOBUFS: events
    /// were lost) counts as a change for the same reason.
    fn drain(&self) -> io::Result<bool> {
        let mut buffer = [0u8; 8192];
        let mut received = false;
        loop {
            // SAFETY: recv into a buffer of the given length.
            let read = unsafe {
                libc::recv(
                    self.socket.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if read >= 0 {
                received = true;
                continue;
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EAGAIN) => return Ok(received),
                Some(libc::ENOBUFS) => received = true,
                Some(libc::EINTR) => {}
                _ => return Err(err),
            }
        }
    }
}
