//! The agent's own HTTP endpoints (/healthz, /livez, /metrics,
//! healthCheckNodePort) on hyper's HTTP/1.1 server. They are probed by
//! kubelet, load balancers and Prometheus, so only GET and HEAD are
//! answered; slow or too many clients are cut off so they cannot hold the
//! agent's sockets and tasks.

use std::{
    convert::Infallible,
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::{Context as _, Result};
use http_body_util::Full;
use hyper::{Method, StatusCode, body::Bytes, header, server::conn::http1, service::service_fn};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::Sleep,
};

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

    fn method_not_allowed() -> Self {
        let mut response = Self::json(405, "{\"error\":\"method not allowed\"}".into());
        response.headers.push(("Allow", "GET, HEAD".into()));
        response
    }
}

/// What one server tolerates from its clients.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// To send a request head, and to send the next one on a kept-alive
    /// connection.
    pub header_read_timeout: Duration,
    /// To take one response off the server, from its first byte written.
    pub write_timeout: Duration,
    /// Connections served at once; more are closed as they are accepted.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(5),
            write_timeout: Duration::from_secs(10),
            max_connections: 64,
        }
    }
}

/// Answers a GET or HEAD for a path.
pub type Handler = Arc<dyn Fn(&str) -> Response + Send + Sync>;

/// Binds first, so a taken address fails the agent at start.
pub async fn bind(addr: SocketAddr, what: &str) -> Result<TcpListener> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the {what} server to {addr}"))?;
    tracing::info!(%addr, server = what, "listening");
    Ok(listener)
}

/// Answers every GET and HEAD with `handler(path)`, within the default
/// [`Limits`], until accepting fails.
pub async fn serve(listener: TcpListener, handler: Handler) -> Result<Infallible> {
    serve_within(listener, handler, Limits::default()).await
}

/// [`serve`] within other limits.
pub async fn serve_within(
    listener: TcpListener,
    handler: Handler,
    limits: Limits,
) -> Result<Infallible> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    // Logged once each time the limit is reached, not per refused client.
    let mut refusing = false;
    loop {
        let (stream, peer) = listener.accept().await?;
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if !refusing {
                tracing::warn!(
                    %peer,
                    max_connections = limits.max_connections,
                    "http connection limit reached; closing new connections"
                );
                refusing = true;
            }
            continue;
        };
        if refusing {
            tracing::info!("http connections below the limit again");
            refusing = false;
        }
        let handler = handler.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: hyper::Request<_>| {
                let response = if matches!(*request.method(), Method::GET | Method::HEAD) {
                    handler(request.uri().path())
                } else {
                    Response::method_not_allowed()
                };
                std::future::ready(Ok::<_, Infallible>(encode(response)))
            });
            let io = TokioIo::new(WriteDeadline::new(stream, limits.write_timeout));
            let served = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .serve_connection(io, service)
                .await;
            if let Err(err) = served {
                tracing::debug!(%peer, error = %err, "http connection failed");
            }
            drop(permit);
        });
    }
}

/// hyper leaves the body out of HEAD answers and sets Content-Length.
fn encode(response: Response) -> hyper::Response<Full<Bytes>> {
    let mut builder = hyper::Response::builder()
        .status(response.status)
        .header(header::CONTENT_TYPE, response.content_type)
        .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    for (name, value) in response.headers {
        builder = builder.header(name, value);
    }
    builder
        .body(Full::new(Bytes::from(response.body)))
        .unwrap_or_else(|err| {
            tracing::error!(error = %err, "invalid http response");
            let mut failed = hyper::Response::new(Full::default());
            *failed.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            failed
        })
}

/// A connection whose writes fail once a response has taken longer than
/// the timeout to write (a flush ends a response): a client that stops
/// reading cannot keep its connection.
struct WriteDeadline {
    stream: TcpStream,
    timeout: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl WriteDeadline {
    fn new(stream: TcpStream, timeout: Duration) -> Self {
        Self {
            stream,
            timeout,
            deadline: None,
        }
    }

    fn poll_within<T>(
        &mut self,
        cx: &mut Context<'_>,
        write: impl FnOnce(Pin<&mut TcpStream>, &mut Context<'_>) -> Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        let timeout = self.timeout;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "response not taken within the write timeout",
            )));
        }
        write(Pin::new(&mut self.stream), cx)
    }
}

impl AsyncRead for WriteDeadline {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteDeadline {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_within(cx, |stream, cx| stream.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = this.poll_within(cx, |stream, cx| stream.poll_flush(cx));
        if flushed.is_ready() {
            this.deadline = None;
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut()
            .poll_within(cx, |stream, cx| stream.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Far above any timeout under test: a server that never acts fails
    /// the test instead of hanging it.
    const PATIENCE: Duration = Duration::from_secs(20);

    async fn start(limits: Limits) -> SocketAddr {
        let listener = bind((std::net::Ipv4Addr::LOCALHOST, 0).into(), "test")
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let handler: Handler = Arc::new(|path: &str| match path {
            "/healthz" => Response::json(200, "{\"healthy\":true}".into()),
            "/big" => Response::json(200, "x".repeat(8 << 20)),
            _ => Response::not_found(),
        });
        tokio::spawn(serve_within(listener, handler, limits));
        addr
    }

    /// Sends `request` and reads until the server closes.
    async fn exchange(addr: SocketAddr, request: &str) -> io::Result<String> {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
            .await
            .expect("the server closes the connection")?;
        Ok(String::from_utf8_lossy(&answer).into_owned())
    }

    fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
        let head = answer.split("\r\n\r\n").next()?;
        head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    /// The connection was closed without an answer.
    fn unanswered(answer: &io::Result<String>) -> bool {
        match answer {
            Ok(answer) => answer.is_empty(),
            Err(err) => matches!(
                err.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
        }
    }

    /// One answer on a kept-alive connection: head and body.
    async fn next_answer(stream: &mut TcpStream) -> (String, String) {
        let mut data = Vec::new();
        let read = async {
            loop {
                if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&data[..end + 4]).into_owned();
                    let length: usize = header(&head, "content-length").unwrap().parse().unwrap();
                    if data.len() >= end + 4 + length {
                        let body = String::from_utf8_lossy(&data[end + 4..][..length]);
                        return (head, body.into_owned());
                    }
                }
                let mut buf = [0; 4096];
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before a whole answer");
                data.extend_from_slice(&buf[..n]);
            }
        };
        tokio::time::timeout(PATIENCE, read)
            .await
            .expect("an answer")
    }

    #[tokio::test]
    async fn get_answers_and_keeps_the_connection_alive() {
        let addr = start(Limits::default()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /healthz?verbose HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = next_answer(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert_eq!(header(&head, "content-type"), Some("application/json"));
        assert_eq!(header(&head, "x-content-type-options"), Some("nosniff"));
        assert_eq!(body, "{\"healthy\":true}");
        // The same connection serves the next request.
        stream
            .write_all(b"GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = next_answer(&mut stream).await;
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"), "{head}");
        assert_eq!(body, "{\"error\":\"not found\"}");
    }

    #[tokio::test]
    async fn other_methods_get_405_with_allow() {
        let addr = start(Limits::default()).await;
        let answer = exchange(
            addr,
            "POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        )
        .await
        .unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{answer}"
        );
        assert_eq!(header(&answer, "allow"), Some("GET, HEAD"));
    }

    #[tokio::test]
    async fn head_gets_the_length_but_no_body() {
        let addr = start(Limits::default()).await;
        let answer = exchange(
            addr,
            "HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert_eq!(header(&answer, "content-length"), Some("16"));
        assert!(answer.ends_with("\r\n\r\n"), "no body: {answer:?}");
    }

    #[tokio::test]
    async fn slow_request_head_is_cut_off() {
        let addr = start(Limits {
            header_read_timeout: Duration::from_millis(200),
            ..Limits::default()
        })
        .await;
        // Half a head, then nothing: the server must close, not wait.
        let answer = exchange(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n").await;
        assert!(unanswered(&answer), "{answer:?}");
    }

    /// Waits until a GET on a new connection is answered.
    async fn wait_served(addr: SocketAddr) {
        let served = async {
            loop {
                let answer = exchange(addr, "GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n");
                if answer.await.is_ok_and(|a| a.starts_with("HTTP/1.1 200")) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(PATIENCE, served)
            .await
            .expect("a GET is served again");
    }

    #[tokio::test]
    async fn connection_limit_closes_excess_connections() {
        let addr = start(Limits {
            max_connections: 2,
            ..Limits::default()
        })
        .await;
        // Two idle connections hold both permits (each served a GET, so
        // both were accepted and counted).
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let (head, _) = next_answer(&mut stream).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            held.push(stream);
        }
        let refused = exchange(addr, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(unanswered(&refused), "a third connection: {refused:?}");
        drop(held.pop());
        wait_served(addr).await;
    }

    #[tokio::test]
    async fn client_that_stops_reading_is_cut_off() {
        let addr = start(Limits {
            write_timeout: Duration::from_millis(200),
            max_connections: 1,
            ..Limits::default()
        })
        .await;
        // Far more than the socket buffers take, never read: the server's
        // write stalls and only the write timeout frees the one permit.
        let mut stalled = TcpStream::connect(addr).await.unwrap();
        let requests = "GET /big HTTP/1.1\r\nHost: x\r\n\r\n".repeat(8);
        stalled.write_all(requests.as_bytes()).await.unwrap();
        wait_served(addr).await;
        drop(stalled);
    }
}
