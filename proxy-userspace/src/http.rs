//! A minimal HTTP/1.1 responder for the agent's own endpoints (/healthz,
//! /livez, /metrics, healthCheckNodePort). They are probed by kubelet, load
//! balancers and Prometheus with plain GETs, so a full HTTP stack would add
//! nothing but weight. One request per connection; bounded head and time.

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const MAX_HEAD: usize = 8192;
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// An answer: status line text, content type, extra headers, body.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Response {
    pub fn json(status: u16, body: String) -> Self {
        Self {
            status,
            content_type: "application/json",
            headers: Vec::new(),
            body,
        }
    }

    pub fn not_found() -> Self {
        Self::json(404, "{\"error\":\"not found\"}".into())
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        404 => "Not Found",
        503 => "Service Unavailable",
        _ => "",
    }
}

/// Binds first, so a taken address fails the agent at start.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} server to {addr}"))?;
    tracing::info!(%addr, server = what, "listening");
    Ok(listener)
}

/// Answers every request with `handler(path)` until accepting fails.
pub async fn serve(
    listener: TcpListener,
    handler: Arc<dyn Fn(&str) -> Response + Send + Sync>,
) -> Result<Infallible> {
    loop {
        let (stream, _) = listener.accept().await?;
        let handler = handler.clone();
        tokio::spawn(async move {
            if let Err(err) = answer(stream, handler.as_ref()).await {
                tracing::debug!(error = %err, "http request failed");
            }
        });
    }
}

async fn answer(
    mut stream: TcpStream,
    handler: &(dyn Fn(&str) -> Response + Send + Sync),
) -> Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 512];
    let read_head = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    };
    tokio::time::timeout(READ_TIMEOUT, read_head).await??;
    let request = String::from_utf8_lossy(&head);
    let target = request.split_whitespace().nth(1).unwrap_or("/");
    let path = target.split('?').next().unwrap_or("/");
    let response = handler(path);
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {}\r\nConnection: close\r\n",
        response.status,
        reason(response.status),
        response.content_type,
        response.body.len()
    );
    for (name, value) in &response.headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str("\r\n");
    out.push_str(&response.body);
    stream.write_all(out.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}
