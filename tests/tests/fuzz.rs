//! The packet programs under a short fixed-seed fuzzing run (see
//! `proxy_tests::fuzz`): 20,000 cases through each program, every
//! invariant kept. `cargo xtask fuzz` runs the long one.

use proxy_common::Counter;
use proxy_tests::{fuzz, tc};
use proxy_userspace::programs::{Capacities, load_detached};

const SEED: u64 = 20_240_601;
const CASES: u64 = 20_000;

#[test]
fn tc_programs_keep_their_invariants_on_fuzzed_packets() {
    assert!(unsafe { libc::geteuid() } == 0, "needs root (BPF, netns)");
    let netns = tc::node_netns("epfz").unwrap();
    let findings = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-findings");
    let _ = std::fs::remove_dir_all(&findings);
    let report = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                proxy_tests::enter_netns(netns.node.name())?;
                let mut ebpf = load_detached(&Capacities {
                    services: 4096,
                    backends: 1024,
                    conntrack: 65_536,
                    nat: 65_536,
                })?;
                fuzz::run(
                    &mut ebpf,
                    netns.ifindex,
                    &fuzz::Options {
                        seed: SEED,
                        start: 0,
                        count: CASES,
                        findings,
                        progress_every: 0,
                    },
                )
            })
            .join()
            .unwrap()
    })
    .unwrap();
    eprintln!("{report}");
    assert_eq!(report.violations(), 0, "{report}");
    // The cases reach every path: each counter a program can raise rose.
    let reached = [
        (
            "tc_ingress",
            &[
                Counter::PacketNewFlow,
                Counter::PacketSnat,
                Counter::PacketEstablished,
                Counter::PacketReply,
                Counter::IcmpErrorTranslated,
                Counter::AffinityHit,
                Counter::RejectedNoBackend,
                Counter::DroppedNoLocalBackend,
                Counter::DroppedSourceRange,
                Counter::DroppedTtlExceeded,
                Counter::MalformedTruncated,
                Counter::MalformedIpHeader,
                Counter::FragmentPassed,
            ][..],
        ),
        (
            "tc_egress",
            &[
                Counter::PacketReply,
                Counter::IcmpErrorTranslated,
                Counter::MalformedTruncated,
                Counter::MalformedIpHeader,
                Counter::FragmentPassed,
            ][..],
        ),
    ];
    for (name, counters) in reached {
        let program = report
            .programs
            .iter()
            .find(|program| program.name == name)
            .unwrap();
        assert_eq!(program.runs, CASES, "{name}");
        for counter in counters {
            assert!(
                program.raised[*counter as usize] > 0,
                "{name} never raised {}: the cases miss that path",
                counter.name()
            );
        }
    }
}
