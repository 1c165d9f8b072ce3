//! `talon-sim`: one seeded simulation of a Talon deployment. Prints the seed and everything drawn from
//! it first, progress while it runs, and `trace-hash: <hex>` last; exits 0 only if every checked
//! invariant held. A failed run prints the command that reproduces it.

use std::process::ExitCode;
use talon_sim::cluster::{SimOptions, run};

fn usage() -> String {
    "usage: talon-sim [--seed N] [--minions K] [--clients M] [--rows R] [--duration SECONDS]".into()
}

fn parse() -> Result<SimOptions, String> {
    let mut o = SimOptions {
        seed: 0,
        minions: 1,
        clients: 10,
        rows: 100,
        duration_s: 600,
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
        "cargo run --release -p talon-sim -- --seed {} --minions {} --clients {} --rows {} --duration {}",
        o.seed, o.minions, o.clients, o.rows, o.duration_s
    );
    println!("seed: {}", o.seed);
    let wall = std::time::Instant::now();
    let report = run(&o, &mut |line| println!("{line}"));
    let secs = wall.elapsed().as_secs_f64();
    match report {
        Ok(r) => {
            println!(
                "all {} clients connected at {:.3} virtual s; hunt complete at {:.3} virtual s: scheduled {} completed {} errors {} rows {}",
                o.clients,
                r.connected_ms as f64 / 1000.0,
                r.completed_ms as f64 / 1000.0,
                r.stats.scheduled,
                r.stats.completed,
                r.stats.errors,
                r.stats.rows
            );
            println!(
                "shared volume operations: metadata {}, filestore {}; {:.1} virtual s in {secs:.1} wall s ({:.1}x)",
                r.volume_ops.0,
                r.volume_ops.1,
                r.completed_ms as f64 / 1000.0,
                r.completed_ms as f64 / 1000.0 / secs.max(0.001)
            );
            for v in &r.violations {
                println!("VIOLATION: {v}");
            }
            println!("trace-hash: {}", r.trace_hash);
            if r.violations.is_empty() {
                ExitCode::SUCCESS
            } else {
                println!("reproduce: {repro}");
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
