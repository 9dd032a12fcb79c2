//! `/healthz` and `/livez` (rule 33): healthy once the first sync is
//! programmed and while no change has waited longer than the health timeout
//! to be applied.
//!
//! A minimal HTTP/1.1 responder: these endpoints are probed by kubelet and
//! load balancers with plain GETs, so a full HTTP stack would add nothing.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// What the sync loop tells the health endpoints.
#[derive(Clone)]
pub struct Health {
    inner: Arc<Mutex<State>>,
    timeout: Duration,
}

#[derive(Default)]
struct State {
    /// When the datapath last became equal to the desired state.
    last_updated: Option<SystemTime>,
    /// Since when a change waits to be applied.
    pending_since: Option<Instant>,
}

/// A health answer, as served.
#[derive(Debug, PartialEq, Eq)]
pub struct Status {
    pub healthy: bool,
    pub body: String,
}

impl Health {
    pub fn new(timeout: Duration) -> Self {
        Self {
            inner: Arc::default(),
            timeout,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A change arrived that the datapath does not have yet.
    pub fn change_pending(&self) {
        self.state().pending_since.get_or_insert_with(Instant::now);
    }

    /// The datapath now equals the desired state.
    pub fn synced(&self) {
        let mut state = self.state();
        state.last_updated = Some(SystemTime::now());
        state.pending_since = None;
    }

    pub fn status(&self) -> Status {
        let state = self.state();
        let stale = state
            .pending_since
            .is_some_and(|since| since.elapsed() > self.timeout);
        let healthy = state.last_updated.is_some() && !stale;
        let body = serde_json::json!({
            "lastUpdated": state.last_updated.map(rfc3339),
            "currentTime": rfc3339(SystemTime::now()),
            "healthy": healthy,
        });
        Status {
            healthy,
            body: body.to_string(),
        }
    }

    /// Binds first, so a taken address fails the agent at start.
    pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!("binding the health server to {addr} (--healthz-bind-address)")
        })?;
        tracing::info!(%addr, "health server listening");
        Ok(listener)
    }

    /// Serves until accepting fails.
    pub async fn serve(self, listener: TcpListener) -> Result<Infallible> {
        loop {
            let (stream, _) = listener.accept().await?;
            let health = self.clone();
            tokio::spawn(async move {
                if let Err(err) = health.answer(stream).await {
                    tracing::debug!(error = %err, "health request failed");
                }
            });
        }
    }

    async fn answer(&self, mut stream: TcpStream) -> Result<()> {
        let mut head = Vec::with_capacity(512);
        let mut buf = [0u8; 512];
        let read_head = async {
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                head.extend_from_slice(&buf[..n]);
            }
            Ok::<_, std::io::Error>(())
        };
        tokio::time::timeout(Duration::from_secs(5), read_head).await??;
        let request = String::from_utf8_lossy(&head);
        let path = request.split_whitespace().nth(1).unwrap_or("/");
        let (code, body) = match path.split('?').next() {
            Some("/healthz" | "/livez") => {
                let status = self.status();
                let code = if status.healthy {
                    "200 OK"
                } else {
                    "503 Service Unavailable"
                };
                (code, status.body)
            }
            _ => ("404 Not Found", "{\"error\":\"not found\"}".to_string()),
        };
        let response = format!(
            "HTTP/1.1 {code}\r\nContent-Type: application/json\r\nX-Content-Type-Options: nosniff\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        Ok(())
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_nanos(time).to_string()
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    #[test]
    fn rule_33_unhealthy_until_first_sync() {
        let health = Health::new(Duration::from_secs(60));
        assert!(!health.status().healthy);
        health.change_pending();
        assert!(!health.status().healthy);
        health.synced();
        let status = health.status();
        assert!(status.healthy);
        let body: serde_json::Value = serde_json::from_str(&status.body).unwrap();
        assert_eq!(body["healthy"], true);
        assert!(body["lastUpdated"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn rule_33_change_waiting_longer_than_timeout_is_unhealthy() {
        let health = Health::new(Duration::ZERO);
        health.synced();
        health.change_pending();
        std::thread::sleep(Duration::from_millis(5));
        assert!(!health.status().healthy);
        health.synced();
        assert!(health.status().healthy);
    }

    #[test]
    fn timestamps_are_rfc3339() {
        let time = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        assert_eq!(rfc3339(time), "2023-11-14T22:13:20.000000005Z");
    }
}
