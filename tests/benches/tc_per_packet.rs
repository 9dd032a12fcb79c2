//! Nanoseconds per packet of each tc and XDP path, next to an empty program
//! of the same hook in the same run, at several numbers of Services
//! (`cargo xtask bench` runs this and renders the table).
//!
//! Katran's method: `BPF_PROG_TEST_RUN` with repeat 1 (a later repeat
//! would see the packet the first one rewrote), many times, averaging the
//! kernel's own measurement of each run. Runs in a namespace shaped like
//! node1 so FIB lookups have routes.
//!
//! `cargo bench -p proxy-tests --bench tc_per_packet -- [--runs N]
//! [--services 1,10000,100000] [--json]` (root).

use std::{
    io::Error,
    mem,
    os::fd::{FromRawFd, OwnedFd, RawFd},
    time::Duration,
};

use anyhow::{Context, Result, bail, ensure};
use proxy_tests::tc::{self, FrontendSpec, Maps, PacketSpec};
use proxy_userspace::programs::{Capacities, load_detached};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

struct Options {
    runs: u32,
    services: Vec<usize>,
    json: bool,
}

fn options() -> Result<Options> {
    let mut options = Options {
        runs: 200_000,
        services: vec![1, 10_000, 100_000],
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--runs" => options.runs = args.next().context("--runs N")?.parse()?,
            "--services" => {
                options.services = args
                    .next()
                    .context("--services N,N")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--json" => options.json = true,
            // cargo bench passes --bench.
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(options)
}

fn main() -> Result<()> {
    let options = options()?;
    ensure!(unsafe { libc::geteuid() } == 0, "needs root (BPF, netns)");
    let netns = tc::node_netns("eptb")?;
    let rows = std::thread::scope(|scope| {
        scope
            .spawn(|| -> Result<Vec<Row>> {
                proxy_tests::enter_netns(netns.node.name())?;
                let empty = EmptyPrograms {
                    tc: EmptyProgram::load(BPF_PROG_TYPE_SCHED_CLS, TC_ACT_OK)?,
                    xdp: EmptyProgram::load(BPF_PROG_TYPE_XDP, XDP_PASS)?,
                };
                let mut rows = Vec::new();
                for services in &options.services {
                    rows.extend(measure(*services, options.runs, netns.ifindex, &empty)?);
                }
                Ok(rows)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("benchmark thread panicked"))?
    })?;
    if options.json {
        for row in &rows {
            println!(
                "{}",
                serde_json::json!({
                    "services": row.services,
                    "path": row.path,
                    "ns_per_packet": row.ns,
                    "empty_ns_per_packet": row.empty_ns,
                    "runs": options.runs,
                })
            );
        }
    } else {
        println!(
            "{:>8}  {:<34} {:>8} {:>8} {:>7}",
            "services", "path", "ns/pkt", "empty", "ratio"
        );
        for row in &rows {
            println!(
                "{:>8}  {:<34} {:>8.1} {:>8.1} {:>6.2}x",
                row.services,
                row.path,
                row.ns,
                row.empty_ns,
                row.ns / row.empty_ns
            );
        }
    }
    Ok(())
}

struct Row {
    services: usize,
    path: &'static str,
    ns: f64,
    empty_ns: f64,
}

/// A path: the program, the packet, the verdict it must give.
struct Path {
    name: &'static str,
    program: &'static str,
    packet: PacketSpec,
    verdict: u32,
    /// A new client port per run (every run a new flow).
    new_flow_each_run: bool,
}

fn packet(src: &str, dst: &str, proto: &str, tcp: &[&str]) -> PacketSpec {
    PacketSpec {
        src: src.to_string(),
        dst: dst.to_string(),
        proto: Some(proto.to_string()),
        tcp: tcp.iter().map(|flag| flag.to_string()).collect(),
        payload: Some("x".repeat(64)),
        ..PacketSpec::default()
    }
}

/// The frontends the paths use, plus `services - 4` others so the maps
/// hold as many Services as measured.
fn maps(services: usize) -> Maps {
    let frontend = |frontend: String, backends: &[&str], ranges: &[&str]| FrontendSpec {
        frontend,
        scope: "external".to_string(),
        backends: backends.iter().map(|b| b.to_string()).collect(),
        when_empty: None,
        source_ranges: ranges.iter().map(|r| r.parse().unwrap()).collect(),
        affinity: 0,
    };
    let mut frontends = vec![
        frontend(
            "192.168.0.2:30080/tcp".into(),
            &["10.244.2.11:8080/tcp"],
            &[],
        ),
        frontend(
            "192.168.0.2:30081/tcp".into(),
            &["10.244.1.11:8080/tcp"],
            &[],
        ),
        frontend(
            "192.168.0.2:30054/udp".into(),
            &["10.244.1.11:5353/udp"],
            &[],
        ),
        frontend(
            "192.0.2.20:80/tcp".into(),
            &["10.244.1.11:8080/tcp"],
            &["198.51.100.0/24"],
        ),
    ];
    for i in 0..services.saturating_sub(frontends.len()) {
        let addr = format!(
            "172.{}.{}.{}:80/tcp",
            16 + i / 65_536,
            (i / 256) % 256,
            i % 256
        );
        frontends.push(frontend(addr, &["10.244.2.12:8080/tcp"], &[]));
    }
    Maps {
        frontends,
        local: vec![
            "10.244.1.11:8080/tcp".to_string(),
            "10.244.1.11:5353/udp".to_string(),
        ],
    }
}

/// The floors: an empty program of each hook.
struct EmptyPrograms {
    tc: EmptyProgram,
    xdp: EmptyProgram,
}

fn measure(services: usize, runs: u32, ifindex: u32, empty: &EmptyPrograms) -> Result<Vec<Row>> {
    let mut ebpf = load_detached(&Capacities {
        services: (services as u32 * 4).max(4096),
        backends: 4096,
        conntrack: 131_072,
        nat: 131_072,
    })?;
    tc::fill_maps(&mut ebpf, &maps(services))?;
    let client = "203.0.113.2:40000";
    // Replies need the SNAT port the first packet of the flow got.
    let first = tc::run(
        &mut ebpf,
        "tc_ingress",
        &tc::build_packet(&packet(client, "192.168.0.2:30080", "tcp", &["syn"]), None)?,
        ifindex,
    )?;
    ensure!(
        first.verdict == TC_ACT_REDIRECT,
        "first packet not redirected"
    );
    let snat_port = u16::from_be_bytes([first.output[34], first.output[35]]);
    let local_first = tc::run(
        &mut ebpf,
        "tc_ingress",
        &tc::build_packet(&packet(client, "192.168.0.2:30081", "tcp", &["syn"]), None)?,
        ifindex,
    )?;
    ensure!(local_first.verdict == TC_ACT_OK, "local flow not passed");
    let paths = [
        Path {
            name: "miss (not a frontend)",
            program: "tc_ingress",
            packet: packet(client, "192.168.0.2:22", "tcp", &["ack"]),
            verdict: TC_ACT_OK,
            new_flow_each_run: false,
        },
        Path {
            name: "hit: tracked, remote (DNAT+SNAT)",
            program: "tc_ingress",
            packet: packet(client, "192.168.0.2:30080", "tcp", &["ack"]),
            verdict: TC_ACT_REDIRECT,
            new_flow_each_run: false,
        },
        Path {
            name: "hit: tracked, local (DNAT)",
            program: "tc_ingress",
            packet: packet(client, "192.168.0.2:30081", "tcp", &["ack"]),
            verdict: TC_ACT_OK,
            new_flow_each_run: false,
        },
        // Local: a remote backend would run out of SNAT ports for one
        // client address after 4,536 flows, with no GC here to free them.
        Path {
            name: "new flow, local (UDP, DNAT)",
            program: "tc_ingress",
            packet: packet(client, "192.168.0.2:30054", "udp", &[]),
            verdict: TC_ACT_OK,
            new_flow_each_run: true,
        },
        Path {
            name: "reply (un-SNAT, ingress)",
            program: "tc_ingress",
            packet: packet(
                "10.244.2.11:8080",
                &format!("192.168.0.2:{snat_port}"),
                "tcp",
                &["ack"],
            ),
            verdict: TC_ACT_REDIRECT,
            new_flow_each_run: false,
        },
        Path {
            name: "reply (un-DNAT, egress)",
            program: "tc_egress",
            packet: packet("10.244.1.11:8080", client, "tcp", &["ack"]),
            verdict: TC_ACT_OK,
            new_flow_each_run: false,
        },
        Path {
            name: "source-range drop",
            program: "tc_ingress",
            packet: packet(client, "192.0.2.20:80", "tcp", &["syn"]),
            verdict: TC_ACT_SHOT,
            new_flow_each_run: false,
        },
        // The same paths in XDP, whose next hops are resolved here, so it
        // sends remote flows and replies itself (XDP_TX).
        Path {
            name: "xdp miss (not a frontend)",
            program: "xdp_ingress",
            packet: packet(client, "192.168.0.2:22", "tcp", &["ack"]),
            verdict: XDP_PASS,
            new_flow_each_run: false,
        },
        Path {
            name: "xdp hit: tracked, remote (TX)",
            program: "xdp_ingress",
            packet: packet(client, "192.168.0.2:30080", "tcp", &["ack"]),
            verdict: XDP_TX,
            new_flow_each_run: false,
        },
        Path {
            name: "xdp hit: tracked, local (DNAT)",
            program: "xdp_ingress",
            packet: packet(client, "192.168.0.2:30081", "tcp", &["ack"]),
            verdict: XDP_PASS,
            new_flow_each_run: false,
        },
        Path {
            name: "xdp new flow, local (UDP, DNAT)",
            program: "xdp_ingress",
            packet: packet(client, "192.168.0.2:30054", "udp", &[]),
            verdict: XDP_PASS,
            new_flow_each_run: true,
        },
        Path {
            name: "xdp reply (un-SNAT, TX)",
            program: "xdp_ingress",
            packet: packet(
                "10.244.2.11:8080",
                &format!("192.168.0.2:{snat_port}"),
                "tcp",
                &["ack"],
            ),
            verdict: XDP_TX,
            new_flow_each_run: false,
        },
        Path {
            name: "xdp source-range drop",
            program: "xdp_ingress",
            packet: packet(client, "192.0.2.20:80", "tcp", &["syn"]),
            verdict: XDP_DROP,
            new_flow_each_run: false,
        },
    ];
    let mut rows = Vec::new();
    for path in &paths {
        let mut input = tc::build_packet(&path.packet, None)?;
        let xdp = path.program == "xdp_ingress";
        let empty_ns = if xdp { &empty.xdp } else { &empty.tc }.ns_per_packet(&input, runs)?;
        let mut total = Duration::ZERO;
        for run in 0..runs {
            if path.new_flow_each_run {
                // A new client port (and UDP checksum 0: still valid).
                let port = 1024 + (run % 60_000) as u16;
                input[34..36].copy_from_slice(&port.to_be_bytes());
                input[40..42].copy_from_slice(&[0, 0]);
            }
            let result = if xdp {
                tc::run_xdp(&mut ebpf, &input, ifindex)?
            } else {
                tc::run(&mut ebpf, path.program, &input, ifindex)?
            };
            ensure!(
                result.verdict == path.verdict,
                "{}: verdict {} instead of {}",
                path.name,
                result.verdict,
                path.verdict
            );
            total += result.duration;
        }
        rows.push(Row {
            services,
            path: path.name,
            ns: total.as_nanos() as f64 / runs as f64,
            empty_ns,
        });
    }
    drop(ebpf);
    Ok(rows)
}

/// `r0 = <verdict>; exit`: the floor every path of its hook is compared
/// with, run the same way.
struct EmptyProgram {
    fd: OwnedFd,
    verdict: u32,
}

const BPF_PROG_LOAD: i64 = 5;
const BPF_PROG_TEST_RUN: i64 = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

#[repr(C)]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
}

fn bpf<T>(cmd: i64, attr: &mut T) -> Result<i64> {
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, mem::size_of::<T>()) };
    if ret < 0 {
        return Err(Error::last_os_error().into());
    }
    Ok(ret)
}

impl EmptyProgram {
    fn load(prog_type: u32, verdict: u32) -> Result<Self> {
        // mov64 r0, verdict ; exit
        let insns: [u64; 2] = [0x0000_0000_0000_00b7 | (u64::from(verdict) << 32), 0x95];
        let license = c"GPL";
        let mut attr = ProgLoadAttr {
            prog_type,
            insn_cnt: 2,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            ..ProgLoadAttr::default()
        };
        let fd = bpf(BPF_PROG_LOAD, &mut attr).context("loading the empty program")?;
        Ok(Self {
            fd: unsafe { OwnedFd::from_raw_fd(fd as RawFd) },
            verdict,
        })
    }

    fn ns_per_packet(&self, input: &[u8], runs: u32) -> Result<f64> {
        use std::os::fd::AsRawFd;
        let mut output = vec![0u8; 2048];
        let mut total: u64 = 0;
        for _ in 0..runs {
            let mut attr = TestRunAttr {
                prog_fd: self.fd.as_raw_fd() as u32,
                data_size_in: input.len() as u32,
                data_size_out: output.len() as u32,
                data_in: input.as_ptr() as u64,
                data_out: output.as_mut_ptr() as u64,
                repeat: 1,
                ..TestRunAttr::default()
            };
            bpf(BPF_PROG_TEST_RUN, &mut attr).context("running the empty program")?;
            ensure!(
                attr.retval == self.verdict,
                "empty program returned {} instead of {}",
                attr.retval,
                self.verdict
            );
            total += u64::from(attr.duration);
        }
        Ok(total as f64 / runs as f64)
    }
}
