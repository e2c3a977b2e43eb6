//! Scale-down without resets (`--reuseport`): a removed slot's ready worker leaves — steered
//! away, still accepting — and drains once its queue is empty or the wait is over.

use super::*;

const WAIT: Duration = Duration::from_secs(1);

/// A ready pool of `n` whose removed slots' workers leave for at most `wait`.
fn leaving_pool(n: usize, wait: Duration) -> H {
    let mut c = cfg(n);
    c.leave_timeout = Some(wait);
    let mut h = H::new(c);
    h.start();
    h
}

fn id_of(h: &H, pid: i32) -> WorkerId {
    h.pool.worker_of_pid(pid).expect("a worker's pid")
}

fn state(h: &H, pid: i32) -> &'static str {
    crate::status::worker_state(&h.pool.workers[&id_of(h, pid)])
}

#[test]
fn a_removed_slot_s_worker_leaves_then_drains_when_its_queue_is_empty() {
    let mut h = leaving_pool(4, WAIT);
    let pids = h.pids();
    let acts = h.req(Request::ScaleTo(2));
    // Steered away at once (the slots are gone, their sockets released), not signalled yet.
    assert!(signals(&acts).is_empty(), "no drain yet: {acts:?}");
    assert!(acts.contains(&Action::ReleaseSlot { slot: 2 }));
    assert!(acts.contains(&Action::ReleaseSlot { slot: 3 }));
    assert_eq!(h.pool.serving_slots(), vec![true, true]);
    assert_eq!(h.pool.ready_count(), 2);
    assert_eq!(state(&h, pids[2]), "leaving");
    let mut leaving = h.pool.leaving();
    leaving.sort();
    assert_eq!(leaving, vec![id_of(&h, pids[2]), id_of(&h, pids[3])]);
    // Slot 3's queue is served: it drains; slot 2 goes on accepting.
    let acts = h.ev(Event::QueueEmpty {
        id: id_of(&h, pids[3]),
    });
    assert_eq!(signals(&acts), vec![(pids[3], Signal::SIGTERM)]);
    assert_eq!(state(&h, pids[3]), "draining");
    assert_eq!(h.pool.leaving(), vec![id_of(&h, pids[2])]);
    // A second report changes nothing.
    let acts = h.ev(Event::QueueEmpty {
        id: id_of(&h, pids[3]),
    });
    assert!(signals(&acts).is_empty());
    // The wait is bounded: at 1 s slot 2 drains even though its queue never emptied.
    let acts = h.advance(WAIT - Duration::from_millis(1));
    assert!(signals(&acts).is_empty());
    let acts = h.advance(Duration::from_millis(1));
    assert_eq!(signals(&acts), vec![(pids[2], Signal::SIGTERM)]);
    assert!(h.pool.leaving().is_empty(), "nothing to poll any more");
    // Their exits are no crashes: nothing restarts.
    assert_eq!(spawns(&h.exits(&[(pids[2], TERMED), (pids[3], TERMED)])), 0);
    assert_eq!(h.pool.counters.restarts, 0);
    assert_eq!(h.pool.next_deadline(), None);
}

#[test]
fn without_a_socket_of_its_own_or_not_ready_a_removed_worker_drains_at_once() {
    // No --reuseport: the socket is shared, nothing is queued for that worker alone.
    let mut h = H::new(cfg(2));
    h.start();
    let top = h.pid(1);
    assert_eq!(
        signals(&h.req(Request::ScaleTo(1))),
        vec![(top, Signal::SIGTERM)]
    );
    assert!(h.pool.leaving().is_empty());

    // With --reuseport, a worker that is not ready (it accepts nothing) drains at once too,
    // and so does a reload's replacement that was starting in the removed slot.
    let mut c = cfg(2);
    c.leave_timeout = Some(WAIT);
    c.ready = ReadyMode::Notify;
    let mut h = H::new(c);
    h.start();
    let (p0, p1) = (h.pid(0), h.pid(1));
    h.msg(p0, WorkerMsg::Ready);
    let acts = h.req(Request::ScaleTo(1));
    assert_eq!(signals(&acts), vec![(p1, Signal::SIGTERM)]);
    h.req(Request::ScaleTo(2));
    let p1 = h.pid(1);
    h.msg(p1, WorkerMsg::Ready);
    h.req(Request::Reload);
    // (One slot at a time: slot 0's replacement first.)
    let n0 = h.pool.slots[0].next.expect("slot 0's replacement");
    let n0 = h.pool.workers[&n0].pid.unwrap();
    h.msg(n0, WorkerMsg::Ready);
    let next = h.pool.slots[1].next;
    assert!(next.is_some(), "slot 1's replacement is starting");
    let next_pid = h.pool.workers[&next.unwrap()].pid.unwrap();
    let acts = h.req(Request::ScaleTo(1));
    assert_eq!(signals(&acts), vec![(next_pid, Signal::SIGTERM)]);
    assert_eq!(state(&h, p1), "leaving", "the serving one leaves");
}

#[test]
fn a_slot_added_back_while_its_old_worker_leaves_gets_a_new_worker_and_the_old_one_drains() {
    let mut h = leaving_pool(3, WAIT);
    let old = h.pid(2);
    h.req(Request::ScaleTo(2));
    let acts = h.req(Request::ScaleTo(3));
    assert_eq!(spawns(&acts), 1, "slot 2 gets a worker of its own");
    let new = h.pid(2);
    assert_ne!(new, old);
    assert_eq!(state(&h, old), "leaving");
    let acts = h.ev(Event::QueueEmpty { id: id_of(&h, old) });
    assert_eq!(signals(&acts), vec![(old, Signal::SIGTERM)]);
    assert_eq!(spawns(&h.exit(old, TERMED)), 0);
    assert_eq!(h.pid(2), new, "the new slot 2 is untouched");
}

#[test]
fn a_stop_or_a_crash_while_leaving() {
    // A stop drains a leaving worker with the others, at once.
    let mut h = leaving_pool(3, WAIT);
    let pids = h.pids();
    h.req(Request::ScaleTo(2));
    let acts = h.req(Request::Stop);
    let sent: Vec<i32> = signals(&acts).into_iter().map(|(p, _)| p).collect();
    assert!(sent.contains(&pids[2]), "{sent:?}");
    assert_eq!(sent.len(), 3);
    // A leaving worker that dies is not replaced: its slot is gone.
    let mut h = leaving_pool(3, WAIT);
    let top = h.pid(2);
    h.req(Request::ScaleTo(2));
    assert_eq!(spawns(&h.exit(top, CRASH)), 0);
    assert!(h.pool.leaving().is_empty());
    assert_eq!(h.pool.slots.len(), 2);
}

#[test]
fn a_leaving_worker_is_never_measured_nor_recycled() {
    let mut c = cfg(3);
    c.leave_timeout = Some(Duration::from_secs(60));
    c.max_memory = Some(1 << 20);
    let mut h = H::new(c);
    h.start();
    let top = h.pid(2);
    let leaving = id_of(&h, top);
    h.req(Request::ScaleTo(2));
    for _ in 0..3 {
        let acts = h.advance(super::super::recycle::MEASURE_EVERY);
        for a in &acts {
            if let Action::Measure(w) = a {
                assert!(w.iter().all(|&(id, _)| id != leaving), "{w:?}");
                // Everyone is far above the limit: the others are recycled, not this one.
                let answer = w.iter().map(|&(id, _)| (id, 1 << 30)).collect();
                let acts = h.ev(Event::Measured(answer));
                let spawned: Vec<usize> = acts
                    .iter()
                    .filter_map(|a| match a {
                        Action::Spawn { slot, .. } => Some(*slot),
                        _ => None,
                    })
                    .collect();
                assert!(spawned.iter().all(|&s| s < 2), "{spawned:?}");
            }
        }
        assert_eq!(state(&h, top), "leaving");
    }
}

#[test]
fn a_leaving_worker_and_its_deadline_cross_an_upgrade() {
    let mut h = leaving_pool(3, WAIT);
    let top = h.pid(2);
    h.req(Request::ScaleTo(2));
    h.advance(Duration::from_millis(300));
    let snap = h.pool.snapshot(h.now);
    let text = serde_json::to_string(&snap).unwrap();
    assert!(text.contains("\"leaving\""), "{text}");
    let back: PoolSnapshot = serde_json::from_str(&text).unwrap();
    let cfg = h.pool.config().clone();
    h.pool = Pool::restore(cfg, back, h.now, h.now);
    assert_eq!(state(&h, top), "leaving");
    assert_eq!(h.pool.leaving(), vec![id_of(&h, top)]);
    // Still due 1 s after the scale-down, not 1 s after the upgrade.
    let acts = h.advance(Duration::from_millis(700));
    assert_eq!(signals(&acts), vec![(top, Signal::SIGTERM)]);
}
