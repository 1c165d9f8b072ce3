//! `talon-sim`: one seeded simulation of a Talon deployment. Prints the seed and everything drawn from
//! it first, progress while it runs, and `trace-hash: <hex>` last; exits 0 only if every checked
//! invariant held. A failed run prints the command that reproduces it.

use std::process::ExitCode;
use talon_sim::cluster::{LIVENESS_BOUND_S, SimOptions, run};

/// Log timestamps in virtual seconds.
struct VirtualTime;

impl tracing_subscriber::fmt::time::FormatTime for VirtualTime {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        let t = turmoil::sim_elapsed().unwrap_or_default();
        write!(w, "{:>9.3}s", t.as_secs_f64())
    }
}

fn usage() -> String {
    "usage: talon-sim [--seed N] [--minions K] [--clients M] [--rows R] [--duration SECONDS] [--no-faults]\n\
     --duration is the safety phase (faults) in virtual seconds; the liveness phase that follows has at most "
        .to_owned()
        + &format!("{LIVENESS_BOUND_S} virtual s to converge.")
}

fn parse() -> Result<SimOptions, String> {
    let mut o = SimOptions {
        seed: 0,
        minions: 2,
        clients: 20,
        rows: 100,
        duration_s: 60,
        faults: true,
    };
    let mut seed = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            let v = args
                .next()
                .ok_or_else(|| format!("{name} needs a value; {}", usage()))?;
            v.parse::<u64>()
                .map_err(|_| format!("{name} {v:?}: not a number; {}", usage()))
        };
        match a.as_str() {
            "--seed" => seed = Some(value("--seed")?),
            "--minions" => o.minions = value("--minions")? as usize,
            "--clients" => o.clients = value("--clients")? as usize,
            "--rows" => o.rows = value("--rows")?,
            "--duration" => o.duration_s = value("--duration")?,
            "--no-faults" => o.faults = false,
            "-h" | "--help" => return Err(usage()),
            other => return Err(format!("unknown argument {other:?}; {}", usage())),
        }
    }
    // Without --seed, a fresh one (printed, so the run can be repeated).
    o.seed = seed.unwrap_or_else(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(std::process::id().into());
        h.finish()
    });
    Ok(o)
}

fn main() -> ExitCode {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let repro = format!(
        "cargo run --release -p talon-sim -- --seed {} --minions {} --clients {} --rows {} --duration {}{}",
        o.seed,
        o.minions,
        o.clients,
        o.rows,
        o.duration_s,
        if o.faults { "" } else { " --no-faults" }
    );
    println!("seed: {}", o.seed);
    // The nodes' own logs, for chasing a failure: `RUST_LOG=info talon-sim --seed N` (to stderr;
    // timestamps are the virtual clock's, as the nodes see it).
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_timer(VirtualTime)
            .with_ansi(false)
            .with_writer(std::io::stderr)
            .try_init();
    }
    let wall = std::time::Instant::now();
    let report = run(&o, &mut |line| println!("{line}"));
    let secs = wall.elapsed().as_secs_f64();
    match report {
        Ok(r) => {
            for (h, s) in &r.hunts {
                println!(
                    "hunt {h}: scheduled {} completed {} errors {} rows {}",
                    s.scheduled, s.completed, s.errors, s.rows
                );
            }
            for (t, host, why) in &r.exits {
                println!(
                    "process exit at {:.1} virtual s: {host}: {why} (restarted)",
                    *t as f64 / 1000.0
                );
            }
            let virt = r.ended_ms as f64 / 1000.0;
            println!(
                "{} faults ({}); {} label changes and {} collections acknowledged; shared volume: {} operations, {} injected errors",
                r.plan.len(),
                r.swarm.kinds().join(", "),
                r.labels,
                r.collections,
                r.volume_ops.0,
                r.volume_ops.1
            );
            if r.workload.event_rate > 0 {
                println!(
                    "event streams: {} batches acknowledged settled; the volume holds {} batches, {} events",
                    r.event_batches_settled, r.events_stored.0, r.events_stored.1
                );
            }
            let outcome = if r.converged_ms > 0 {
                format!(
                    "converged at {:.1} virtual s",
                    r.converged_ms as f64 / 1000.0
                )
            } else {
                "not converged".to_string()
            };
            println!(
                "{outcome}; {virt:.1} virtual s in {secs:.1} wall s ({:.1} virtual s per wall s; checkers {:.1} wall s)",
                virt / secs.max(0.001),
                r.checks_wall.as_secs_f64()
            );
            for v in &r.violations {
                println!("VIOLATION: {v}");
            }
            if !r.violations.is_empty() {
                println!("reproduce: {repro}");
            }
            println!("trace-hash: {}", r.trace_hash);
            if r.violations.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            println!("FAILED: {e}");
            println!("reproduce: {repro}");
            ExitCode::FAILURE
        }
    }
}
