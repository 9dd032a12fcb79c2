//! Reading what `netns-host` clients print: one JSON line per attempt,
//! `{"ok":true,"reply":"NAME PEER",...}` or `{"ok":false,"errno":N,...}`,
//! and clients that keep running while a test changes the world (a held
//! TCP connection, a UDP stream).

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};
use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    process::{ChildStdin, Command, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use crate::ChildGuard;

/// "backend-2 10.244.0.2:40000" -> ("backend-2", "10.244.0.2"). Panics
/// (with the line) unless the attempt was answered.
pub fn reply_parts(result: &Value) -> (String, String) {
    match outcome(result) {
        Outcome::Answered { backend, source } => (backend, source),
        other => panic!("not answered ({other:?}): {result}"),
    }
}

/// "backend-2 10.244.0.2:40000" -> "backend-2"
pub fn reply_name(result: &Value) -> String {
    reply_parts(result).0
}

/// How many replies each backend sent.
pub fn spread(results: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for result in results {
        *counts.entry(reply_name(result)).or_insert(0) += 1;
    }
    counts
}

/// What one client attempt came to, told apart the way the service rules
/// tell them apart: served, refused (rule 21), dropped (rules 15, 18, 28)
/// or not intercepted at all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `backend` answered; it saw the flow come from the IP `source`.
    Answered { backend: String, source: String },
    /// ECONNREFUSED: a TCP RST or an ICMP port unreachable came back.
    Refused,
    /// Nothing came back before the client's timeout.
    TimedOut,
    /// EHOSTUNREACH or ENETUNREACH: a route said no.
    Unreachable,
    /// Anything else, with the client's line.
    Failed(String),
}

const ECONNREFUSED: i64 = libc::ECONNREFUSED as i64;
const EHOSTUNREACH: i64 = libc::EHOSTUNREACH as i64;
const ENETUNREACH: i64 = libc::ENETUNREACH as i64;
const EAGAIN: i64 = libc::EAGAIN as i64;
const ETIMEDOUT: i64 = libc::ETIMEDOUT as i64;

/// Classifies one client line (TCP greeting or UDP reply).
pub fn outcome(result: &Value) -> Outcome {
    if result["ok"] == true {
        let parsed = result["reply"].as_str().and_then(|reply| {
            let (name, peer) = reply.trim().split_once(' ')?;
            let (ip, _port) = peer.rsplit_once(':')?;
            Some((name.to_string(), ip.to_string()))
        });
        return match parsed {
            Some((backend, source)) => Outcome::Answered { backend, source },
            None => Outcome::Failed(result.to_string()),
        };
    }
    // A connect timeout has no errno; a UDP receive timeout is EAGAIN.
    match (result["errno"].as_i64(), result["kind"].as_str()) {
        (Some(ECONNREFUSED), _) => Outcome::Refused,
        (Some(EHOSTUNREACH | ENETUNREACH), _) => Outcome::Unreachable,
        (Some(EAGAIN | ETIMEDOUT), _) | (_, Some("TimedOut" | "WouldBlock")) => Outcome::TimedOut,
        _ => Outcome::Failed(result.to_string()),
    }
}

/// A client process whose stdout JSON lines are read as they come, and
/// whose stdin takes lines. Drop kills it.
pub struct ClientProcess {
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    child: ChildGuard,
}

impl ClientProcess {
    /// Spawns `cmd` (typically [`crate::host`] with a client subcommand)
    /// with piped stdin and stdout.
    pub fn spawn(cmd: &mut Command) -> Result<ClientProcess> {
        let mut child = ChildGuard::spawn(cmd.stdin(Stdio::piped()).stdout(Stdio::piped()))?;
        let stdin = child.child_mut().stdin.take();
        let stdout = child
            .child_mut()
            .stdout
            .take()
            .ok_or_else(|| anyhow!("stdout of {cmd:?} is not piped"))?;
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(ClientProcess {
            stdin,
            lines,
            child,
        })
    }

    /// The next line, parsed; an error if none comes within `timeout` or
    /// the process ended.
    pub fn next_line(&self, timeout: Duration) -> Result<Value> {
        let line = self.lines.recv_timeout(timeout).map_err(|e| match e {
            mpsc::RecvTimeoutError::Timeout => {
                anyhow!("no line from client {} within {timeout:?}", self.child.id())
            }
            mpsc::RecvTimeoutError::Disconnected => anyhow!("client {} exited", self.child.id()),
        })?;
        serde_json::from_str(&line).with_context(|| format!("not JSON: {line:?}"))
    }

    /// Every line printed so far and not read yet.
    pub fn pending_lines(&self) -> Result<Vec<Value>> {
        self.lines
            .try_iter()
            .map(|line| serde_json::from_str(&line).with_context(|| format!("not JSON: {line:?}")))
            .collect()
    }

    /// Writes `line` to the client's stdin.
    pub fn send_line(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| anyhow!("stdin of client {} is closed", self.child.id()))?;
        writeln!(stdin, "{line}")?;
        stdin.flush()?;
        Ok(())
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }
}

/// How long [`HeldConnection`] waits for a line; the client's own
/// `--timeout-ms` should be shorter, so it reports the failure itself.
const HELD_LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// One TCP connection held open by `netns-host tcp --stdin`. `open`
/// returns once the connection is established (the backend's greeting
/// arrived), so nothing a test changes afterwards can race the connect;
/// `echo` sends a line and returns the backend's echo.
pub struct HeldConnection {
    client: ClientProcess,
    /// `{"ok":true,"reply":"NAME CLIENT:PORT",...}`.
    pub greeting: Value,
}

impl HeldConnection {
    /// `cmd` is a `netns-host ... tcp --to ADDR --stdin` command. Errors
    /// unless the connection was established.
    pub fn open(cmd: &mut Command) -> Result<HeldConnection> {
        let client = ClientProcess::spawn(cmd)?;
        let greeting = client.next_line(HELD_LINE_TIMEOUT)?;
        if greeting["ok"] != true {
            bail!("connecting with {cmd:?}: {greeting}");
        }
        Ok(HeldConnection { client, greeting })
    }

    /// A TCP connection to `to` held open by `client` (a `netns-host`
    /// command in the client's namespace), each attempt allowed 5 s.
    pub fn tcp(mut client: Command, to: &str) -> Result<HeldConnection> {
        HeldConnection::open(client.args(["tcp", "--to", to, "--stdin", "--timeout-ms", "5000"]))
    }

    /// The backend that greeted.
    pub fn backend(&self) -> String {
        reply_name(&self.greeting)
    }

    /// Sends `line`; the client's answer: `{"ok":true,"echo":line}`, or
    /// `{"ok":false,...}` with the reason when the connection failed.
    pub fn echo(&mut self, line: &str) -> Value {
        self.client
            .send_line(line)
            .and_then(|()| self.client.next_line(HELD_LINE_TIMEOUT))
            .unwrap_or_else(|e| json!({"ok": false, "error": format!("{e:#}")}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_are_told_apart() {
        let answered = json!({"ok": true, "reply": "web-1 192.168.0.2:40000"});
        assert_eq!(
            outcome(&answered),
            Outcome::Answered {
                backend: "web-1".into(),
                source: "192.168.0.2".into()
            }
        );
        assert_eq!(reply_name(&answered), "web-1");
        let refused = json!({"ok": false, "errno": 111, "kind": "ConnectionRefused"});
        assert_eq!(outcome(&refused), Outcome::Refused);
        let connect_timeout = json!({"ok": false, "errno": null, "kind": "TimedOut"});
        assert_eq!(outcome(&connect_timeout), Outcome::TimedOut);
        let udp_timeout = json!({"ok": false, "errno": 11, "kind": "WouldBlock"});
        assert_eq!(outcome(&udp_timeout), Outcome::TimedOut);
        let unreachable = json!({"ok": false, "errno": 113, "kind": "HostUnreachable"});
        assert_eq!(outcome(&unreachable), Outcome::Unreachable);
        let other = json!({"ok": false, "errno": 1, "kind": "PermissionDenied"});
        assert!(matches!(outcome(&other), Outcome::Failed(_)));
        let garbled = json!({"ok": true, "reply": "no-peer"});
        assert!(matches!(outcome(&garbled), Outcome::Failed(_)));
    }

    #[test]
    fn spread_counts_backends() {
        let lines = [
            json!({"ok": true, "reply": "a 1.2.3.4:1"}),
            json!({"ok": true, "reply": "b 1.2.3.4:2"}),
            json!({"ok": true, "reply": "a 1.2.3.4:3"}),
        ];
        let counts = spread(&lines);
        assert_eq!(counts["a"], 2);
        assert_eq!(counts["b"], 1);
    }
}
