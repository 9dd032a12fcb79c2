//! A seeded fuzzer for the packet programs: every case (a random frame or
//! a mutated fixture packet, rebuilt from `(seed, index)` alone) runs once
//! (`BPF_PROG_TEST_RUN`, repeat 1) through each program of [`PROGRAMS`],
//! against a fixed mix of frontends ([`topology`]), and each run is held to
//! the invariants of [`check::Invariant`]; the conntrack tables are walked
//! after every batch of [`BATCH`] cases and emptied (then primed again), so
//! a batch always starts from the same maps.
//!
//! A case that breaks an invariant is written out as a YAML finding (the
//! program, the input and output in hex, the violations, how the case was
//! made, and whether it fails alone on fresh maps); [`replay`] runs one
//! again. The caller loads the object (this crate's library cannot depend
//! on the agent) and runs everything from a thread inside
//! [`crate::tc::node_netns`].

mod cases;
mod check;
mod conntrack;
mod topology;

use std::{
    collections::BTreeMap,
    fmt, fs, io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{Map, MapData, PerCpuArray},
};
use proxy_common::{Counter, Flow4, map_names};
use serde::{Deserialize, Serialize};

pub use cases::CaseKind;
use cases::Corpus;
use check::{Checker, Explainer, Raised, Run};
pub use check::{Invariant, Violation};
use conntrack::{Tables, Walk};
use topology::Topology;

use crate::tc;

/// Cases between two walks of the conntrack tables (which then start over).
pub const BATCH: u64 = 1000;
/// Findings written per distinct failure (program and first violation),
/// and in all; the rest are only counted.
const FINDINGS_PER_FAILURE: u64 = 3;
const FINDINGS: usize = 100;

/// What a program's return value means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Drop,
    /// Sent out by the program itself (redirect, or XDP_TX).
    Redirect,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Drop => "drop",
            Verdict::Redirect => "redirect",
        }
    }
}

/// A program the fuzzer runs every case through.
pub struct Program {
    pub name: &'static str,
    /// One run on a frame, as if it arrived on (or left by) `ifindex`.
    pub run: fn(&mut Ebpf, &str, &[u8], u32) -> Result<tc::RunResult>,
    /// The return values it may give.
    pub verdicts: &'static [(u32, Verdict)],
}

impl Program {
    fn verdict(&self, value: u32) -> Option<Verdict> {
        self.verdicts
            .iter()
            .find(|(known, _)| *known == value)
            .map(|(_, verdict)| *verdict)
    }
}

pub const TC_VERDICTS: &[(u32, Verdict)] = &[
    (0, Verdict::Pass),     // TC_ACT_OK
    (2, Verdict::Drop),     // TC_ACT_SHOT
    (7, Verdict::Redirect), // TC_ACT_REDIRECT
];

pub const XDP_VERDICTS: &[(u32, Verdict)] = &[
    (2, Verdict::Pass),     // XDP_PASS
    (1, Verdict::Drop),     // XDP_DROP
    (3, Verdict::Redirect), // XDP_TX
    (4, Verdict::Redirect), // XDP_REDIRECT
];

fn run_xdp(ebpf: &mut Ebpf, _program: &str, input: &[u8], ifindex: u32) -> Result<tc::RunResult> {
    tc::run_xdp(ebpf, input, ifindex)
}

/// The programs every case runs through, in this order, on the same maps.
pub const PROGRAMS: &[Program] = &[
    Program {
        name: "xdp_ingress",
        run: run_xdp,
        verdicts: XDP_VERDICTS,
    },
    Program {
        name: "tc_ingress",
        run: tc::run,
        verdicts: TC_VERDICTS,
    },
    Program {
        name: "tc_egress",
        run: tc::run,
        verdicts: TC_VERDICTS,
    },
];

pub struct Options {
    pub seed: u64,
    /// Index of the first case.
    pub start: u64,
    pub count: u64,
    /// Where findings are written.
    pub findings: PathBuf,
    /// A line on stderr every this many cases (0: none).
    pub progress_every: u64,
}

/// A failing case as written out (and read back by [`replay`]).
#[derive(Serialize, Deserialize)]
pub struct Finding {
    pub about: String,
    pub violations: Vec<String>,
    pub program: String,
    pub seed: u64,
    pub index: u64,
    /// The maps were fresh (the fixed frontends and the primed flows)
    /// before case `batch_start`: running cases `batch_start..=index` of
    /// `seed` again rebuilds the state this case met.
    pub batch_start: u64,
    /// Whether it fails the same way run alone on fresh maps.
    pub reproduces_alone: bool,
    pub origin: String,
    /// The return value, if the run returned.
    pub verdict: Option<u32>,
    pub counters: String,
    pub input: String,
    pub output: String,
}

/// The maps found inconsistent after a batch.
#[derive(Serialize)]
pub struct MapFinding {
    pub about: String,
    pub violations: Vec<String>,
    pub seed: u64,
    /// The maps were fresh before case `batch_start`, walked after the
    /// case before `batch_end`.
    pub batch_start: u64,
    pub batch_end: u64,
}

/// The object's maps filled for fuzzing, and the handles the runs need.
struct Bench {
    topology: Topology,
    tables: Tables,
    counters: Counters,
}

impl Bench {
    /// Fills the (freshly loaded) object's service maps.
    fn set_up(ebpf: &mut Ebpf) -> Result<Bench> {
        tc::fill_maps(ebpf, &topology::maps())?;
        Ok(Bench {
            topology: Topology::read(ebpf)?,
            tables: Tables::open(ebpf)?,
            counters: Counters::open(ebpf)?,
        })
    }

    /// Empties the tables the programs fill and primes the flows again.
    fn reset(&mut self, ebpf: &mut Ebpf) -> Result<()> {
        self.tables.clear()?;
        self.topology.prime(ebpf)
    }

    fn run(
        &mut self,
        ebpf: &mut Ebpf,
        ifindex: u32,
        program: &Program,
        input: &[u8],
    ) -> Result<Outcome> {
        let mut checker = Checker::default();
        let result = match (program.run)(ebpf, program.name, input, ifindex) {
            Ok(result) => result,
            Err(err) if refused_by_kernel(&err, input) => return Ok(Outcome::refused()),
            Err(err) => {
                checker.fail(Invariant::Run, format!("{err:#}"));
                return Ok(Outcome {
                    refused: false,
                    value: None,
                    verdict: None,
                    output: Vec::new(),
                    raised: vec![0; Counter::COUNT as usize],
                    duration: Duration::ZERO,
                    checker,
                });
            }
        };
        checker.ensure(Invariant::Run, true, String::new);
        let raised = self.counters.raised()?;
        let verdict = program.verdict(result.verdict);
        checker.ensure(Invariant::Verdict, verdict.is_some(), || {
            format!("returned {}", result.verdict)
        });
        if let Some(verdict) = verdict {
            let run = Run {
                input,
                output: &result.output,
                verdict,
                raised: Raised(&raised),
            };
            let tracked = |flow: &Flow4| self.tables.tracked(flow);
            let maps = Explainer {
                topology: &self.topology,
                tracked: &tracked,
            };
            check::check_run(&run, &maps, &mut checker);
        }
        Ok(Outcome {
            refused: false,
            value: Some(result.verdict),
            verdict,
            output: result.output,
            raised,
            duration: result.duration,
            checker,
        })
    }
}

/// `BPF_PROG_TEST_RUN` refuses (EINVAL) a frame shorter than Ethernet and
/// the fixed header its ethertype names: the kernel turning the input
/// away, not a datapath failure.
fn refused_by_kernel(err: &anyhow::Error, input: &[u8]) -> bool {
    let einval = err.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|err| err.raw_os_error() == Some(libc::EINVAL))
    });
    let network_header = match input.get(12..14) {
        Some([0x08, 0x00]) => 20,
        Some([0x86, 0xdd]) => 40,
        _ => 0,
    };
    einval && input.len() < 14 + network_header
}

/// One run of one program on one case.
struct Outcome {
    refused: bool,
    value: Option<u32>,
    verdict: Option<Verdict>,
    output: Vec<u8>,
    raised: Vec<u64>,
    duration: Duration,
    checker: Checker,
}

impl Outcome {
    fn refused() -> Outcome {
        Outcome {
            refused: true,
            value: None,
            verdict: None,
            output: Vec::new(),
            raised: vec![0; Counter::COUNT as usize],
            duration: Duration::ZERO,
            checker: Checker::default(),
        }
    }
}

/// `lb_counters`, summed over CPUs; [`Counters::raised`] gives what rose
/// since the last call.
struct Counters {
    map: PerCpuArray<MapData, u64>,
    last: Vec<u64>,
}

impl Counters {
    fn open(ebpf: &mut Ebpf) -> Result<Counters> {
        let Some(Map::PerCpuArray(data)) = ebpf.map(map_names::COUNTERS) else {
            bail!("no per-CPU array {}", map_names::COUNTERS);
        };
        // A handle of our own, so runs can borrow the object meanwhile.
        let data = MapData::from_id(data.info()?.id())?;
        let mut counters = Counters {
            map: PerCpuArray::try_from(Map::PerCpuArray(data))?,
            last: vec![0; Counter::COUNT as usize],
        };
        counters.raised()?;
        Ok(counters)
    }

    fn raised(&mut self) -> Result<Vec<u64>> {
        let mut raised = Vec::with_capacity(self.last.len());
        for (index, last) in self.last.iter_mut().enumerate() {
            let now: u64 = self.map.get(&(index as u32), 0)?.iter().sum();
            raised.push(now - *last);
            *last = now;
        }
        Ok(raised)
    }
}

/// What happened to one program's runs.
pub struct ProgramStats {
    pub name: &'static str,
    pub runs: u64,
    /// Frames the kernel refused to run (too short for their header).
    pub refused: u64,
    pub verdicts: BTreeMap<&'static str, u64>,
    pub untouched: u64,
    pub rewritten: u64,
    pub raised: Vec<u64>,
    pub kernel_time: Duration,
}

/// Everything a fuzzing session saw.
pub struct Report {
    pub seed: u64,
    pub start: u64,
    pub count: u64,
    pub elapsed: Duration,
    pub kinds: BTreeMap<CaseKind, u64>,
    pub programs: Vec<ProgramStats>,
    /// Per invariant: (times checked, times violated).
    pub invariants: BTreeMap<Invariant, (u64, u64)>,
    pub walks: u64,
    pub walked: Walk,
    /// Failing runs (and map walks) by program and first violation.
    pub failures: BTreeMap<String, u64>,
    pub findings_dir: PathBuf,
    pub findings_written: Vec<PathBuf>,
}

impl Report {
    fn new(options: &Options) -> Report {
        Report {
            seed: options.seed,
            start: options.start,
            count: options.count,
            elapsed: Duration::ZERO,
            kinds: BTreeMap::new(),
            programs: PROGRAMS
                .iter()
                .map(|program| ProgramStats {
                    name: program.name,
                    runs: 0,
                    refused: 0,
                    verdicts: BTreeMap::new(),
                    untouched: 0,
                    rewritten: 0,
                    raised: vec![0; Counter::COUNT as usize],
                    kernel_time: Duration::ZERO,
                })
                .collect(),
            invariants: Invariant::ALL.iter().map(|inv| (*inv, (0, 0))).collect(),
            walks: 0,
            walked: Walk::default(),
            failures: BTreeMap::new(),
            findings_dir: options.findings.clone(),
            findings_written: Vec::new(),
        }
    }

    /// Counts a failure; true when it is to be written out.
    fn failed(&mut self, what: &str, first: &Violation) -> bool {
        let seen = self.failures.entry(format!("{what}: {first}")).or_default();
        *seen += 1;
        *seen <= FINDINGS_PER_FAILURE && self.findings_written.len() < FINDINGS
    }

    /// Violations of every invariant together.
    pub fn violations(&self) -> u64 {
        self.invariants.values().map(|(_, violated)| violated).sum()
    }

    fn tally(&mut self, checker: &Checker) {
        for invariant in &checker.applied {
            let entry = self.invariants.entry(*invariant).or_default();
            entry.0 += 1;
            if checker
                .violations
                .iter()
                .any(|violation| violation.invariant == *invariant)
            {
                entry.1 += 1;
            }
        }
    }

    fn record(&mut self, program: usize, input: &[u8], outcome: &Outcome) {
        self.tally(&outcome.checker);
        let stats = &mut self.programs[program];
        stats.runs += 1;
        if outcome.refused {
            stats.refused += 1;
            return;
        }
        let verdict = outcome.verdict.map_or("other", Verdict::name);
        *stats.verdicts.entry(verdict).or_default() += 1;
        if outcome.value.is_some() {
            if outcome.output == input {
                stats.untouched += 1;
            } else {
                stats.rewritten += 1;
            }
        }
        for (total, raised) in stats.raised.iter_mut().zip(&outcome.raised) {
            *total += raised;
        }
        stats.kernel_time += outcome.duration;
    }
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tc")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn unhex(text: &str) -> Result<Vec<u8>> {
    let text: String = text.split_whitespace().collect();
    anyhow::ensure!(text.len().is_multiple_of(2), "odd number of hex digits");
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(&text[at..at + 2], 16).context("not hex"))
        .collect()
}

/// A failing run, kept until its batch is over.
struct Failure {
    program: usize,
    index: u64,
    origin: String,
    input: Vec<u8>,
    outcome: Outcome,
}

/// Runs `options.count` cases from `options.start` through every program
/// of a freshly loaded object, from a thread inside a node namespace whose
/// device `ifindex` the packets arrive on.
pub fn run(ebpf: &mut Ebpf, ifindex: u32, options: &Options) -> Result<Report> {
    let started = Instant::now();
    let corpus = Corpus::load(&fixtures_dir())?;
    let mut bench = Bench::set_up(ebpf)?;
    fs::create_dir_all(&options.findings)
        .with_context(|| format!("creating {}", options.findings.display()))?;
    let mut report = Report::new(options);
    let end = options.start + options.count;
    let mut batch_start = options.start;
    while batch_start < end {
        let batch_end = (batch_start + BATCH).min(end);
        bench.reset(ebpf)?;
        let mut failures = Vec::new();
        for index in batch_start..batch_end {
            let case = corpus.case(options.seed, index);
            *report.kinds.entry(case.kind).or_default() += 1;
            for (program_index, program) in PROGRAMS.iter().enumerate() {
                let outcome = bench.run(ebpf, ifindex, program, &case.frame)?;
                report.record(program_index, &case.frame, &outcome);
                if !outcome.checker.violations.is_empty() {
                    failures.push(Failure {
                        program: program_index,
                        index,
                        origin: case.origin.clone(),
                        input: case.frame.clone(),
                        outcome,
                    });
                }
            }
            if options.progress_every > 0
                && (index + 1 - options.start).is_multiple_of(options.progress_every)
            {
                eprintln!(
                    "fuzz: {} cases, {} violations, {:.0?}",
                    index + 1 - options.start,
                    report.violations(),
                    started.elapsed()
                );
            }
        }
        let mut checker = Checker::default();
        let walk = bench.tables.check(&bench.topology, &mut checker)?;
        report.tally(&checker);
        report.walks += 1;
        report.walked.flows += walk.flows;
        report.walked.replies += walk.replies;
        report.walked.orphans += walk.orphans;
        report.walked.affinity += walk.affinity;
        if let Some(first) = checker.violations.first()
            && report.failed("maps", first)
        {
            let finding = MapFinding {
                about: format!("{}: {}", first.invariant.about(), first.detail),
                violations: checker.violations.iter().map(ToString::to_string).collect(),
                seed: options.seed,
                batch_start,
                batch_end,
            };
            let path = options.findings.join(format!(
                "maps-{}-s{}-b{batch_start}.yaml",
                first.invariant.name(),
                options.seed
            ));
            fs::write(&path, serde_saphyr::to_string(&finding)?)?;
            report.findings_written.push(path);
        }
        for failure in failures {
            let program = &PROGRAMS[failure.program];
            let first = &failure.outcome.checker.violations[0];
            if !report.failed(program.name, first) {
                continue;
            }
            let first = first.invariant;
            bench.reset(ebpf)?;
            let alone = bench.run(ebpf, ifindex, program, &failure.input)?;
            let finding = finding(options, batch_start, program, &failure, &alone);
            let path = options.findings.join(format!(
                "{}-{}-s{}-i{}.yaml",
                program.name,
                first.name(),
                options.seed,
                failure.index
            ));
            fs::write(&path, serde_saphyr::to_string(&finding)?)?;
            report.findings_written.push(path);
        }
        batch_start = batch_end;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

fn finding(
    options: &Options,
    batch_start: u64,
    program: &Program,
    failure: &Failure,
    alone: &Outcome,
) -> Finding {
    let violations: Vec<String> = failure
        .outcome
        .checker
        .violations
        .iter()
        .map(ToString::to_string)
        .collect();
    let first = &failure.outcome.checker.violations[0];
    let same = |outcome: &Outcome| -> Vec<Invariant> {
        outcome
            .checker
            .violations
            .iter()
            .map(|violation| violation.invariant)
            .collect()
    };
    Finding {
        about: format!("{}: {}", first.invariant.about(), first.detail),
        violations,
        program: program.name.to_string(),
        seed: options.seed,
        index: failure.index,
        batch_start,
        reproduces_alone: same(alone) == same(&failure.outcome),
        origin: failure.origin.clone(),
        verdict: failure.outcome.value,
        counters: Raised(&failure.outcome.raised).to_string(),
        input: hex(&failure.input),
        output: hex(&failure.outcome.output),
    }
}

/// Runs a finding's input alone on fresh maps (filled into a freshly
/// loaded object) and returns what it violates now.
pub fn replay(ebpf: &mut Ebpf, ifindex: u32, file: &Path) -> Result<Vec<Violation>> {
    let text = fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let finding: Finding = serde_saphyr::from_str(&text)?;
    let program = PROGRAMS
        .iter()
        .find(|program| program.name == finding.program)
        .with_context(|| format!("no program {}", finding.program))?;
    let input = unhex(&finding.input)?;
    let mut bench = Bench::set_up(ebpf)?;
    bench.reset(ebpf)?;
    let outcome = bench.run(ebpf, ifindex, program, &input)?;
    Ok(outcome.checker.violations)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let runs: u64 = self.programs.iter().map(|stats| stats.runs).sum();
        writeln!(
            f,
            "fuzz: seed {}, cases {}..{} ({} per program, batches of {BATCH}), {:.1} s, {:.0} runs/s",
            self.seed,
            self.start,
            self.start + self.count,
            self.count,
            self.elapsed.as_secs_f64(),
            runs as f64 / self.elapsed.as_secs_f64().max(1e-9)
        )?;
        let kinds: Vec<String> = self
            .kinds
            .iter()
            .map(|(kind, n)| format!("{n} {}", kind.name()))
            .collect();
        writeln!(f, "cases: {}", kinds.join(", "))?;
        writeln!(
            f,
            "\n{:<12} {:>9} {:>8} {:>9} {:>9} {:>9} {:>6} {:>10} {:>10} {:>8}",
            "program",
            "packets",
            "refused",
            "pass",
            "drop",
            "redirect",
            "other",
            "untouched",
            "rewritten",
            "ns/run"
        )?;
        for stats in &self.programs {
            let verdict = |name| stats.verdicts.get(name).copied().unwrap_or(0);
            let ran = stats.runs - stats.refused;
            writeln!(
                f,
                "{:<12} {:>9} {:>8} {:>9} {:>9} {:>9} {:>6} {:>10} {:>10} {:>8.0}",
                stats.name,
                stats.runs,
                stats.refused,
                verdict("pass"),
                verdict("drop"),
                verdict("redirect"),
                verdict("other"),
                stats.untouched,
                stats.rewritten,
                stats.kernel_time.as_nanos() as f64 / ran.max(1) as f64
            )?;
        }
        writeln!(f, "\ncounters raised")?;
        for counter in Counter::ALL {
            let values: Vec<u64> = self
                .programs
                .iter()
                .map(|stats| stats.raised[counter as usize])
                .collect();
            if values.iter().any(|value| *value > 0) {
                let values: Vec<String> = self
                    .programs
                    .iter()
                    .zip(&values)
                    .map(|(stats, value)| format!("{} {value}", stats.name))
                    .collect();
                writeln!(f, "  {:<26} {}", counter.name(), values.join(", "))?;
            }
        }
        writeln!(
            f,
            "\n{:<20} {:>10} {:>9}  what",
            "invariant", "checked", "violated"
        )?;
        for (invariant, (checked, violated)) in &self.invariants {
            writeln!(
                f,
                "{:<20} {checked:>10} {violated:>9}  {}",
                invariant.name(),
                invariant.about()
            )?;
        }
        writeln!(
            f,
            "\nmap walks: {} (lb4_ct entries {}, lb4_ct_reply entries {} of which orphaned {}, lb4_affinity entries {})",
            self.walks,
            self.walked.flows,
            self.walked.replies,
            self.walked.orphans,
            self.walked.affinity
        )?;
        if !self.failures.is_empty() {
            let mut failures: Vec<_> = self.failures.iter().collect();
            failures.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            writeln!(f, "distinct failures: {}", failures.len())?;
            for (failure, times) in failures.iter().take(30) {
                writeln!(f, "  {times:>7} x {failure}")?;
            }
        }
        writeln!(
            f,
            "findings: {} written to {} (at most {FINDINGS_PER_FAILURE} per distinct failure)",
            self.findings_written.len(),
            self.findings_dir.display()
        )?;
        for path in &self.findings_written {
            writeln!(f, "  {}", path.display())?;
        }
        Ok(())
    }
}
