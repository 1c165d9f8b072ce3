//! The agent's outbox: unit cases. The two-node property of invariant 1 (`flows/tests.rs`) drives
//! this outbox as its client.

use super::*;

fn lim() -> OutboxLimits {
    OutboxLimits {
        resend_after_ms: 100,
        done_max: 2,
        flows_max: 3,
    }
}

type Ob = FlowOutbox<&'static str, u32>;

fn drain(o: &mut Ob) -> Vec<OutboxAction<&'static str, u32>> {
    std::iter::from_fn(|| o.poll_action()).collect()
}

fn sends(o: &mut Ob) -> Vec<(String, u64)> {
    drain(o)
        .into_iter()
        .filter_map(|a| match a {
            OutboxAction::Send { flow, seq, .. } => Some((flow, seq)),
            _ => None,
        })
        .collect()
}

#[test]
fn messages_are_numbered_kept_until_settled_and_bounded_in_flight() {
    let t = Monotonic(0);
    let mut o: Ob = FlowOutbox::new(lim());
    assert_eq!(o.begin("F.1"), Begin::Started);
    assert_eq!(
        o.begin("F.1"),
        Begin::Again,
        "a task delivered twice runs once"
    );
    o.handle_connected(t, 2);
    assert_eq!(o.push(t, "F.1", "a", false, 0), Ok(0));
    assert_eq!(o.push(t, "F.1", "b", false, 1), Ok(1));
    assert_eq!(
        o.push(t, "F.1", "c", false, 2),
        Err(PushError::Full { max: 2 })
    );
    assert_eq!(sends(&mut o), vec![("F.1".into(), 0), ("F.1".into(), 1)]);
    // Acknowledged unsettled: still kept (it counts against the bound).
    o.handle_ack(t, "F.1", 0, false);
    assert_eq!(
        drain(&mut o),
        vec![OutboxAction::FirstAck {
            flow: "F.1".into(),
            seq: 0,
            is_final: false,
            stamp: 0
        }]
    );
    assert!(o.push(t, "F.1", "c", false, 2).is_err());
    o.handle_ack(t, "F.1", 0, true);
    assert_eq!(o.push(t, "F.1", "c", false, 2), Ok(2));
    assert_eq!(o.unsettled(), 2);
}

#[test]
fn a_new_stream_resends_what_is_not_settled_in_order_and_stalls_resend() {
    let mut o: Ob = FlowOutbox::new(lim());
    o.begin("F.1");
    o.handle_connected(Monotonic(0), 8);
    for (i, p) in ["a", "b", "c"].into_iter().enumerate() {
        o.push(Monotonic(0), "F.1", p, false, i as u32).unwrap();
    }
    drain(&mut o);
    o.handle_ack(Monotonic(0), "F.1", 0, true);
    o.handle_ack(Monotonic(0), "F.1", 1, false);
    drain(&mut o);
    // Disconnected: nothing is sent, not even by the timer.
    o.handle_disconnected();
    o.handle_timeout(Monotonic(1000));
    assert_eq!(o.poll_timeout(), None);
    assert_eq!(sends(&mut o), vec![]);
    // Failover: 1 (only in the old frontend's buffer) and 2 go again, in order.
    o.handle_connected(Monotonic(1000), 8);
    assert_eq!(sends(&mut o), vec![("F.1".into(), 1), ("F.1".into(), 2)]);
    // An acknowledgement lost: sent again after `resend_after_ms`.
    assert_eq!(o.poll_timeout(), Some(Monotonic(1100)));
    o.handle_timeout(Monotonic(1099));
    assert_eq!(sends(&mut o), vec![]);
    o.handle_timeout(Monotonic(1100));
    assert_eq!(sends(&mut o), vec![("F.1".into(), 1), ("F.1".into(), 2)]);
}

#[test]
fn the_final_status_is_never_refused_and_its_ack_ends_the_flow() {
    let t = Monotonic(0);
    let mut o: Ob = FlowOutbox::new(lim());
    o.begin("F.1");
    o.handle_connected(t, 1);
    o.push(t, "F.1", "a", false, 0).unwrap();
    assert_eq!(o.push(t, "F.1", "done", true, 1), Ok(1));
    assert_eq!(
        o.push(t, "F.1", "late", false, 2),
        Err(PushError::NotRunning)
    );
    drain(&mut o);
    o.handle_ack(t, "F.1", 0, true);
    o.handle_ack(t, "F.1", 1, true);
    assert_eq!(
        drain(&mut o)[2..],
        [
            OutboxAction::FirstAck {
                flow: "F.1".into(),
                seq: 1,
                is_final: true,
                stamp: 1
            },
            OutboxAction::Settled {
                flow: "F.1".into(),
                seq: 1,
                stamp: 1
            },
            OutboxAction::Ended { flow: "F.1".into() }
        ]
    );
    assert_eq!(o.running_flows().count(), 0);
    assert_eq!(o.begin("F.1"), Begin::Again, "remembered once done");
    // At most `done_max` are remembered.
    for f in ["F.2", "F.3"] {
        o.begin(f);
        o.push(t, f, "done", true, 0).unwrap();
        o.handle_ack(t, f, 0, true);
    }
    assert_eq!(o.begin("F.1"), Begin::Started, "forgotten beyond done_max");
}

/// invariant 7 for the agent's flows: at `flows_max` running, a new task is refused (and so not
/// acknowledged: the master sends it again); once one ends, the next is taken.
#[test]
fn running_flows_are_bounded_and_a_refused_task_is_taken_once_one_ends() {
    let mut o: Ob = FlowOutbox::new(lim());
    o.handle_connected(Monotonic(0), 4);
    for f in ["F.1", "F.2", "F.3"] {
        assert_eq!(o.begin(f), Begin::Started);
    }
    assert_eq!(o.begin("F.4"), Begin::Full { max: 3 });
    assert_eq!(
        o.begin("F.2"),
        Begin::Again,
        "a duplicate is still recognised at the bound"
    );
    // F.1 ends: its final status is acknowledged and settled.
    o.push(Monotonic(0), "F.1", "done", true, 0).unwrap();
    o.handle_ack(Monotonic(1), "F.1", 0, true);
    drain(&mut o);
    assert_eq!(o.running_flows().count(), 2);
    assert_eq!(o.begin("F.4"), Begin::Started);
}

/// A message is reported settled once, with its stamp: when a settled acknowledgement follows an
/// unsettled one, or comes first; a repeated settled acknowledgement reports nothing.
#[test]
fn settling_is_reported_once_with_the_stamp() {
    let t = Monotonic(0);
    let mut o: Ob = FlowOutbox::new(lim());
    o.begin("F.1");
    o.handle_connected(t, 4);
    o.push(t, "F.1", "a", false, 10).unwrap();
    o.push(t, "F.1", "b", false, 11).unwrap();
    drain(&mut o);
    o.handle_ack(t, "F.1", 0, false);
    o.handle_ack(t, "F.1", 1, true);
    o.handle_ack(t, "F.1", 0, true);
    o.handle_ack(t, "F.1", 0, true);
    let settled: Vec<(u64, u32)> = drain(&mut o)
        .into_iter()
        .filter_map(|a| match a {
            OutboxAction::Settled { seq, stamp, .. } => Some((seq, stamp)),
            _ => None,
        })
        .collect();
    assert_eq!(settled, [(1, 11), (0, 10)]);
    assert_eq!(o.kept("F.1"), 0);
    assert_eq!(o.abandon("F.1"), 0);
    assert_eq!(o.running_flows().count(), 0);
}

/// A stream taken up again from disk is numbered on from where it was; it is still a flow (a
/// second begin is a repeat).
#[test]
fn a_flow_begun_at_a_number_goes_on_from_it() {
    let t = Monotonic(0);
    let mut o: Ob = FlowOutbox::new(lim());
    assert_eq!(o.begin_at("E.1", 57), Begin::Started);
    assert_eq!(o.begin_at("E.1", 0), Begin::Again);
    o.handle_connected(t, 4);
    assert_eq!(o.push(t, "E.1", "a", false, 0), Ok(57));
    assert!(o.has_room("E.1"));
    assert_eq!(o.push(t, "E.1", "b", false, 0), Ok(58));
    assert!(o.has_room("E.1"));
    o.push(t, "E.1", "c", false, 0).unwrap();
    o.push(t, "E.1", "d", false, 0).unwrap();
    assert!(!o.has_room("E.1"), "4 kept: max_in_flight");
    assert_eq!(
        o.push(t, "E.1", "e", false, 0),
        Err(PushError::Full { max: 4 })
    );
    assert!(!o.has_room("E.2"), "not running");
    let sent: Vec<u64> = sends(&mut o).into_iter().map(|(_, seq)| seq).collect();
    assert_eq!(sent, [57, 58, 59, 60]);
}
