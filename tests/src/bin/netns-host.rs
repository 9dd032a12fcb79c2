//! `netns-host`: a test host. Enters a network namespace (`--netns`, by
//! setns(2), no mount namespace change) and a cgroup (`--cgroup`) before it
//! creates any socket, then serves or acts as a client. Clients print one
//! JSON line per attempt and exit 0 even when attempts fail (except
//! `http-get`, which exits 1 when it gets no HTTP answer).

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use std::{
    io::{self, BufRead, BufReader, Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::PathBuf,
    thread,
    time::Duration,
};

#[derive(Parser)]
#[command(about = "Servers and clients for tests, inside a network namespace and cgroup")]
struct Cli {
    /// Enter the network namespace /run/netns/NAME first.
    #[arg(long, global = true, value_name = "NAME")]
    netns: Option<String>,
    /// Join the cgroup v2 directory PATH first (writes our pid to cgroup.procs).
    #[arg(long, global = true, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve until killed; prints "ready" once every listener is bound.
    Serve {
        /// Name put in every answer.
        #[arg(long)]
        name: String,
        /// TCP: greet with "NAME PEER\n", then echo every line.
        #[arg(long)]
        tcp: Vec<SocketAddr>,
        /// UDP: answer every datagram with "NAME PEER\n".
        #[arg(long)]
        udp: Vec<SocketAddr>,
        /// HTTP/1.1: answer every request with 200 and body "NAME\n".
        #[arg(long)]
        http: Vec<SocketAddr>,
    },
    /// COUNT sequential TCP connects; one JSON line each.
    Tcp {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Source address: IP or IP:PORT (SO_REUSEADDR is set).
        #[arg(long, value_parser = parse_bind)]
        bind: Option<SocketAddr>,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Connect once, then send every stdin line and print each echo
        /// as {"ok":true,"echo":...}; close at EOF of stdin.
        #[arg(long)]
        stdin: bool,
        /// Pause between connections (steady load for a long COUNT).
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
        /// Close with RST (SO_LINGER 0) instead of FIN: no TIME_WAIT is
        /// left, so the next connection may reuse the --bind port at once.
        #[arg(long, conflicts_with = "stdin")]
        rst: bool,
    },
    /// COUNT UDP queries (sendto/recvfrom, or send/recv with --connect).
    Udp {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Source address: IP or IP:PORT (SO_REUSEADDR is set).
        #[arg(long, value_parser = parse_bind)]
        bind: Option<SocketAddr>,
        #[arg(long)]
        connect: bool,
        /// With --connect: after a query fails other than by a timeout,
        /// connect the same socket (same source port) again, as an
        /// application does when its socket is aborted.
        #[arg(long, requires = "connect")]
        reconnect: bool,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Pause between queries.
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// One HTTP GET of ADDR:PORT/PATH; prints {"status":N,"body":...}.
    HttpGet {
        target: String,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// COUNT sequential HTTP GET / on new connections; one JSON line each.
    Http {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Connection rate: for DURATION_MS (or until COUNT connections) each of
    /// PARALLEL threads connects, reads the greeting line and closes, over
    /// and over (targets in turn). Prints one JSON summary line: rate,
    /// connect() latency percentiles, errors, answers per backend name.
    ConnectRate {
        /// Target; repeat to use several in turn.
        #[arg(long, required = true)]
        to: Vec<SocketAddr>,
        #[arg(long, default_value_t = 2000)]
        duration_ms: u64,
        /// Stop after this many connection attempts (all threads together).
        #[arg(long)]
        count: Option<u64>,
        #[arg(long, default_value_t = 1)]
        parallel: u32,
        /// Per connect() and per greeting read.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
        /// Close with FIN (leaves TIME_WAIT behind) instead of RST (SO_LINGER 0).
        #[arg(long)]
        fin: bool,
    },
}

fn parse_bind(s: &str) -> Result<SocketAddr, String> {
    s.parse::<SocketAddr>()
        .or_else(|_| s.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 0)))
        .map_err(|_| format!("{s:?} is neither IP nor IP:PORT"))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Before any thread or socket exists, so the whole process moves.
    if let Some(ns) = &cli.netns {
        proxy_tests::enter_netns(ns)?;
    }
    if let Some(cg) = &cli.cgroup {
        std::fs::write(cg.join("cgroup.procs"), format!("{}\n", std::process::id()))
            .with_context(|| format!("join cgroup {}", cg.display()))?;
    }
    match cli.cmd {
        Cmd::Serve {
            name,
            tcp,
            udp,
            http,
        } => serve(&name, &tcp, &udp, &http),
        Cmd::Tcp {
            to,
            count,
            bind,
            timeout_ms,
            stdin,
            interval_ms,
            rst,
        } => {
            let timeout = Duration::from_millis(timeout_ms);
            if stdin {
                tcp_session(to, bind, timeout);
            } else {
                for i in 0..count {
                    if i > 0 && interval_ms > 0 {
                        thread::sleep(Duration::from_millis(interval_ms));
                    }
                    let line = match tcp_once(to, bind, timeout) {
                        Ok((stream, greeting)) => {
                            if rst {
                                SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
                            }
                            greeting
                        }
                        Err(e) => err_json(&e),
                    };
                    println!("{line}");
                }
            }
            Ok(())
        }
        Cmd::Udp {
            to,
            count,
            bind,
            connect,
            reconnect,
            timeout_ms,
            interval_ms,
        } => udp_client(
            to,
            count,
            bind,
            UdpMode { connect, reconnect },
            Duration::from_millis(timeout_ms),
            interval_ms,
        ),
        Cmd::HttpGet { target, timeout_ms } => {
            let t = target.strip_prefix("http://").unwrap_or(&target);
            let (addr, path) = match t.split_once('/') {
                Some((a, p)) => (a, format!("/{p}")),
                None => (t, "/".to_string()),
            };
            let addr: SocketAddr = addr
                .parse()
                .with_context(|| format!("bad address {addr:?}"))?;
            match http_get(addr, &path, Duration::from_millis(timeout_ms)) {
                Ok((status, body)) => {
                    println!("{}", json!({"status": status, "body": body}));
                    Ok(())
                }
                Err(e) => {
                    println!("{}", err_json(&e));
                    std::process::exit(1);
                }
            }
        }
        Cmd::Http {
            to,
            count,
            timeout_ms,
        } => {
            for _ in 0..count {
                let v = match http_get(to, "/", Duration::from_millis(timeout_ms)) {
                    Ok((status, body)) => json!({"ok": true, "status": status, "body": body}),
                    Err(e) => err_value(&e),
                };
                println!("{v}");
            }
            Ok(())
        }
        Cmd::ConnectRate {
            to,
            duration_ms,
            count,
            parallel,
            timeout_ms,
            fin,
        } => {
            let v = connect_rate(
                &to,
                Duration::from_millis(duration_ms),
                count,
                parallel.max(1),
                Duration::from_millis(timeout_ms),
                fin,
            );
            println!("{v}");
            Ok(())
        }
    }
}

fn err_value(e: &io::Error) -> Value {
    json!({"ok": false, "error": e.to_string(), "kind": format!("{:?}", e.kind()), "errno": e.raw_os_error()})
}

fn err_json(e: &io::Error) -> String {
    err_value(e).to_string()
}

// ---------------------------------------------------------------- servers

fn serve(name: &str, tcp: &[SocketAddr], udp: &[SocketAddr], http: &[SocketAddr]) -> Result<()> {
    if tcp.is_empty() && udp.is_empty() && http.is_empty() {
        bail!("serve needs at least one of --tcp, --udp, --http");
    }
    let mut threads = Vec::new();
    for addr in tcp {
        let l = TcpListener::bind(addr).with_context(|| format!("bind tcp {addr}"))?;
        let name = name.to_string();
        threads.push(thread::spawn(move || accept_loop(l, name, tcp_conn)));
    }
    for addr in http {
        let l = TcpListener::bind(addr).with_context(|| format!("bind http {addr}"))?;
        let name = name.to_string();
        threads.push(thread::spawn(move || accept_loop(l, name, http_conn)));
    }
    for addr in udp {
        let s = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
        let name = name.to_string();
        threads.push(thread::spawn(move || udp_loop(s, &name)));
    }
    println!("ready");
    io::stdout().flush()?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn accept_loop(l: TcpListener, name: String, handle: fn(TcpStream, &str) -> io::Result<()>) {
    for conn in l.incoming() {
        match conn {
            Ok(s) => {
                let name = name.clone();
                thread::spawn(move || {
                    let _ = handle(s, &name);
                });
            }
            Err(e) => eprintln!("accept: {e}"),
        }
    }
}

fn tcp_conn(s: TcpStream, name: &str) -> io::Result<()> {
    let mut w = &s;
    writeln!(w, "{name} {}", s.peer_addr()?)?;
    for line in BufReader::new(&s).lines() {
        writeln!(w, "{}", line?)?;
    }
    Ok(())
}

fn http_conn(s: TcpStream, name: &str) -> io::Result<()> {
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while find(&head, b"\r\n\r\n").is_none() && head.len() < 65536 {
        let n = (&s).read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let body = format!("{name}\n");
    write!(
        &s,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    s.shutdown(std::net::Shutdown::Write)
}

fn udp_loop(s: UdpSocket, name: &str) {
    let mut buf = [0u8; 65536];
    loop {
        match s.recv_from(&mut buf) {
            Ok((_, peer)) => {
                let _ = s.send_to(format!("{name} {peer}\n").as_bytes(), peer);
            }
            Err(e) => eprintln!("udp recv: {e}"),
        }
    }
}

// ---------------------------------------------------------------- clients

fn socket_for(
    to: SocketAddr,
    ty: Type,
    proto: Protocol,
    bind: Option<SocketAddr>,
) -> io::Result<Socket> {
    let sock = Socket::new(Domain::for_address(to), ty, Some(proto))?;
    if let Some(b) = bind {
        sock.set_reuse_address(true)?;
        sock.bind(&b.into())?;
    }
    Ok(sock)
}

/// Connects, reads the greeting line; returns the stream and the JSON line.
fn tcp_once(
    to: SocketAddr,
    bind: Option<SocketAddr>,
    timeout: Duration,
) -> io::Result<(TcpStream, String)> {
    let sock = socket_for(to, Type::STREAM, Protocol::TCP, bind)?;
    sock.connect_timeout(&to.into(), timeout)?;
    let s: TcpStream = sock.into();
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let reply = read_line(&s)?;
    let v = json!({"ok": true, "reply": reply, "peer": s.peer_addr()?.to_string(), "local": s.local_addr()?.to_string()});
    Ok((s, v.to_string()))
}

/// Reads one line byte by byte (no buffering beyond it), without "\n".
fn read_line(mut s: &TcpStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        if s.read(&mut b)? == 0 {
            if line.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed before a line",
                ));
            }
            break;
        }
        if b[0] == b'\n' {
            break;
        }
        line.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&line)
        .trim_end_matches('\r')
        .to_string())
}

fn tcp_session(to: SocketAddr, bind: Option<SocketAddr>, timeout: Duration) {
    let (mut s, greeting) = match tcp_once(to, bind, timeout) {
        Ok(x) => x,
        Err(e) => {
            println!("{}", err_json(&e));
            return;
        }
    };
    println!("{greeting}");
    for line in io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let v = writeln!(s, "{line}")
            .and_then(|()| read_line(&s))
            .map(|echo| json!({"ok": true, "echo": echo}))
            .unwrap_or_else(|e| err_value(&e));
        println!("{v}");
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
}

struct UdpMode {
    connect: bool,
    reconnect: bool,
}

fn udp_client(
    to: SocketAddr,
    count: u32,
    bind: Option<SocketAddr>,
    UdpMode { connect, reconnect }: UdpMode,
    timeout: Duration,
    interval_ms: u64,
) -> Result<()> {
    let bind = bind.unwrap_or_else(|| SocketAddr::new(IpAddr::from([0, 0, 0, 0]), 0));
    let setup = || -> io::Result<UdpSocket> {
        let s: UdpSocket = socket_for(to, Type::DGRAM, Protocol::UDP, Some(bind))?.into();
        s.set_read_timeout(Some(timeout))?;
        if connect {
            s.connect(to)?;
        }
        Ok(s)
    };
    let sock = setup();
    let mut buf = [0u8; 65536];
    for i in 0..count {
        if i > 0 && interval_ms > 0 {
            thread::sleep(Duration::from_millis(interval_ms));
        }
        let result = sock.as_ref().map_err(clone_err).and_then(|s| {
            let msg = format!("query {i}\n");
            let (n, from) = if connect {
                s.send(msg.as_bytes())?;
                let n = s.recv(&mut buf)?;
                (n, s.peer_addr()?)
            } else {
                s.send_to(msg.as_bytes(), to)?;
                s.recv_from(&mut buf)?
            };
            let reply = String::from_utf8_lossy(&buf[..n]).trim_end().to_string();
            Ok(json!({"ok": true, "reply": reply, "from": from.to_string(), "local": s.local_addr()?.to_string()}))
        });
        let line = match (result, &sock) {
            (Ok(line), _) => line,
            (Err(e), Ok(s)) if reconnect && !is_timeout(&e) => {
                // The pending socket error says why (an aborted socket
                // fails send() with EDESTADDRREQ once disconnected).
                let cause = s.take_error().ok().flatten().unwrap_or(e);
                let reconnected = reconnect_udp(s, to).err().map(|e| err_value(&e));
                let mut line = err_value(&cause);
                line["reconnect_error"] = reconnected.unwrap_or(Value::Null);
                line
            }
            (Err(e), _) => err_value(&e),
        };
        println!("{line}");
    }
    Ok(())
}

/// Connects `s` to `to` again and drops what the old association left
/// queued (a reply that arrived as the socket was aborted), as a client
/// matching replies to queries would.
fn reconnect_udp(s: &UdpSocket, to: SocketAddr) -> io::Result<()> {
    s.connect(to)?;
    s.set_nonblocking(true)?;
    let mut buf = [0u8; 65536];
    while s.recv(&mut buf).is_ok() {}
    s.set_nonblocking(false)
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn clone_err(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// GET `path`; returns (status, body). Handles Content-Length, chunked,
/// and read-to-close bodies.
fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: netns-host\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    )?;
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    let mut eof = false;
    let head_end = loop {
        if let Some(i) = find(&data, b"\r\n\r\n") {
            break i;
        }
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(bad("connection closed before the response head"));
        }
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut length = None;
    let mut chunked = false;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "content-length" {
                length = v.parse::<usize>().ok();
            } else if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            }
        }
    }
    let mut body = data.split_off(head_end + 4);
    let body = loop {
        if chunked {
            if let Some(decoded) = dechunk(&body) {
                break decoded;
            }
        } else if let Some(len) = length
            && body.len() >= len
        {
            body.truncate(len);
            break body;
        }
        if eof {
            if chunked || length.is_some() {
                return Err(bad("connection closed in the middle of the body"));
            }
            break body;
        }
        let n = s.read(&mut buf)?;
        eof = n == 0;
        body.extend_from_slice(&buf[..n]);
    };
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Decodes a complete chunked body; None while incomplete.
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = find(b, b"\r\n")?;
        let size_str = String::from_utf8_lossy(&b[..eol]);
        let size = usize::from_str_radix(size_str.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        if b.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------- connect-rate

/// What one connect-rate thread saw.
#[derive(Default)]
struct RateTally {
    /// connect() durations of successful connections, in ns.
    connect_ns: Vec<u32>,
    /// socket() to close() durations of successful connections, in ns.
    cycle_ns: Vec<u32>,
    errors: u64,
    first_error: Option<String>,
    /// Successful connections per first word of the greeting.
    backends: std::collections::BTreeMap<String, u64>,
}

/// Upper bound of samples kept per thread (memory stays bounded; the
/// loop itself is bounded by the duration).
const MAX_SAMPLES: usize = 20_000_000;

fn connect_rate(
    to: &[SocketAddr],
    duration: Duration,
    count: Option<u64>,
    parallel: u32,
    timeout: Duration,
    fin: bool,
) -> Value {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Instant;
    let started = AtomicU64::new(0);
    let begin = Instant::now();
    let deadline = begin + duration;
    let tallies: Vec<RateTally> = thread::scope(|scope| {
        let handles: Vec<_> = (0..parallel)
            .map(|t| {
                let started = &started;
                scope.spawn(move || {
                    let mut tally = RateTally::default();
                    let mut i = t as usize;
                    while Instant::now() < deadline && tally.connect_ns.len() < MAX_SAMPLES {
                        if let Some(limit) = count
                            && started.fetch_add(1, Ordering::Relaxed) >= limit
                        {
                            break;
                        }
                        let target = to[i % to.len()];
                        i += 1;
                        match connect_once(target, timeout, fin) {
                            Ok((connect, cycle, name)) => {
                                tally.connect_ns.push(connect);
                                tally.cycle_ns.push(cycle);
                                *tally.backends.entry(name).or_default() += 1;
                            }
                            Err(e) => {
                                tally.errors += 1;
                                tally
                                    .first_error
                                    .get_or_insert_with(|| format!("{target}: {e}"));
                            }
                        }
                    }
                    tally
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let elapsed = begin.elapsed().as_secs_f64();
    let mut connect_ns = Vec::new();
    let mut cycle_ns = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    let mut backends = std::collections::BTreeMap::<String, u64>::new();
    for t in tallies {
        connect_ns.extend(t.connect_ns);
        cycle_ns.extend(t.cycle_ns);
        errors += t.errors;
        first_error = first_error.or(t.first_error);
        for (name, n) in t.backends {
            *backends.entry(name).or_default() += n;
        }
    }
    connect_ns.sort_unstable();
    cycle_ns.sort_unstable();
    let us = |v: &[u32], q: f64| -> Value {
        if v.is_empty() {
            return Value::Null;
        }
        let i = ((v.len() as f64 - 1.0) * q).round() as usize;
        json!(f64::from(v[i]) / 1000.0)
    };
    let connections = connect_ns.len() as u64;
    json!({
        "ok": connections > 0,
        "connections": connections,
        "errors": errors,
        "first_error": first_error,
        "elapsed_s": elapsed,
        "parallel": parallel,
        "rate": connections as f64 / elapsed.max(1e-9),
        "connect_p50_us": us(&connect_ns, 0.50),
        "connect_p99_us": us(&connect_ns, 0.99),
        "cycle_p50_us": us(&cycle_ns, 0.50),
        "cycle_p99_us": us(&cycle_ns, 0.99),
        "backends": backends,
    })
}

/// socket, connect (timed), read the greeting line, close. Returns the
/// connect and whole-cycle durations in ns and the greeting's first word.
fn connect_once(to: SocketAddr, timeout: Duration, fin: bool) -> io::Result<(u32, u32, String)> {
    let begin = std::time::Instant::now();
    let sock = Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP))?;
    // On Linux SO_SNDTIMEO bounds a blocking connect() too.
    sock.set_write_timeout(Some(timeout))?;
    sock.set_read_timeout(Some(timeout))?;
    if !fin {
        sock.set_linger(Some(Duration::ZERO))?;
    }
    let t = std::time::Instant::now();
    sock.connect(&to.into())?;
    let connect = t.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32;
    let mut buf = [0u8; 256];
    let mut len = 0;
    while !buf[..len].contains(&b'\n') && len < buf.len() {
        let n = (&sock).read(&mut buf[len..])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the greeting",
            ));
        }
        len += n;
    }
    drop(sock);
    let cycle = begin.elapsed().as_nanos().min(u128::from(u32::MAX)) as u32;
    let name = String::from_utf8_lossy(&buf[..len])
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string();
    Ok((connect, cycle, name))
}
