//! Seeded simulations of a whole deployment (the production master, minions and agents on turmoil
//! hosts, 40–60 ms shared volume): each must end with every invariant the checkers read from the
//! simulated storage holding.

use talon_sim::cluster::{SimOptions, run};

fn sim(seed: u64, minions: usize, clients: usize, rows: u64) {
    let o = SimOptions {
        seed,
        minions,
        clients,
        rows,
        duration_s: 600,
    };
    let r = run(&o, &mut |_| {}).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    assert!(
        r.violations.is_empty(),
        "seed {seed}: {:?}\nreproduce: cargo run --release -p talon-sim -- --seed {seed} --minions {minions} --clients {clients} --rows {rows}",
        r.violations
    );
    assert_eq!(
        (r.stats.completed, r.stats.rows),
        (clients as u64, clients as u64 * rows)
    );
    // The bulk data went through the simulated shared volume: at least one write per client's flow.
    assert!(r.volume_ops.1 >= clients as u64, "{r:?}");
}

#[test]
fn single_server_seeds() {
    for seed in [1, 2] {
        sim(seed, 0, 8, 300);
    }
}

#[test]
fn master_and_minions_seeds() {
    for seed in [3, 4, 5] {
        sim(seed, 2, 12, 300);
    }
}
