//! The generator, run: a small classic BPF interpreter (what the kernel's `bpf_convert_filter`
//! accepts, for the instructions a reuseport program may use) over synthetic IPv4 and IPv6
//! headers, and a checker with the kernel's rules (`bpf_check_classic`,
//! `check_load_and_stores`).

use super::*;
use proptest::prelude::*;

/// A packet as the program sees it: the network header onwards (IP + transport header); the
/// payload (what absolute loads at offset ≥ 0 read) is empty, as in a SYN.
struct Packet {
    net: Vec<u8>,
    rxhash: u32,
}

fn v4(src: [u8; 4], sport: u16) -> Packet {
    let mut net = vec![0u8; 20];
    net[0] = 0x45;
    net[9] = 6;
    net[12..16].copy_from_slice(&src);
    net[16..20].copy_from_slice(&[127, 0, 0, 1]);
    net.extend(sport.to_be_bytes());
    net.extend(8080u16.to_be_bytes());
    net.extend([0u8; 16]);
    Packet { net, rxhash: 0 }
}

fn v6(src: [u16; 8], sport: u16) -> Packet {
    let mut net = vec![0u8; 40];
    net[0] = 0x60;
    net[6] = 6;
    for (i, w) in src.iter().enumerate() {
        net[8 + 2 * i..10 + 2 * i].copy_from_slice(&w.to_be_bytes());
    }
    net[39] = 1;
    net.extend(sport.to_be_bytes());
    net.extend(8080u16.to_be_bytes());
    net.extend([0u8; 16]);
    Packet { net, rxhash: 0 }
}

/// What a load at `off` (the kernel's signed offset) reads, `None` when out of the packet
/// (the kernel then ends the program with 0).
fn load(p: &Packet, off: i64, size: usize) -> Option<u32> {
    let net = i64::from(libc::SKF_NET_OFF);
    if off >= i64::from(libc::SKF_AD_OFF) && off < 0 {
        return match off - i64::from(libc::SKF_AD_OFF) {
            32 if size == 4 => Some(p.rxhash), // SKF_AD_RXHASH
            _ => None,
        };
    }
    let rel = if off >= net && off < net + 0x10_0000 {
        off - net
    } else {
        return None; // payload (empty), or the link layer
    };
    let at = usize::try_from(rel).ok()?;
    let bytes = p.net.get(at..at + size)?;
    Some(bytes.iter().fold(0u32, |a, &b| (a << 8) | u32::from(b)))
}

/// Runs `prog` on `p`: the return value (the index into the group).
fn run(prog: &[sock_filter], p: &Packet) -> u32 {
    let (mut a, mut x, mut m) = (0u32, 0u32, [0u32; 16]);
    let mut pc = 0;
    for _ in 0..=MAX_INSNS {
        let i = prog[pc];
        pc += 1;
        let k = i.k;
        let class = i.code & 0x07;
        match class {
            0x00 | 0x01 => {
                let size = match i.code & 0x18 {
                    0x00 => 4,
                    0x08 => 2,
                    _ => 1,
                };
                let v = match i.code & 0xe0 {
                    0x00 => k,
                    0x20 => match load(p, i64::from(k as i32), size) {
                        Some(v) => v,
                        None => return 0,
                    },
                    0x40 => match load(p, i64::from(k as i32) + i64::from(x), size) {
                        Some(v) => v,
                        None => return 0,
                    },
                    0x60 => m[k as usize],
                    0xa0 => match load(p, i64::from(k as i32), 1) {
                        Some(v) => 4 * (v & 0xf),
                        None => return 0,
                    },
                    c => panic!("load mode {c:#x}"),
                };
                if class == 0x00 {
                    a = v;
                } else {
                    x = v;
                }
            }
            0x02 => m[k as usize] = a,
            0x03 => m[k as usize] = x,
            0x04 => {
                let s = if i.code & 0x08 != 0 { x } else { k };
                a = match i.code & 0xf0 {
                    0x00 => a.wrapping_add(s),
                    0x10 => a.wrapping_sub(s),
                    0x20 => a.wrapping_mul(s),
                    0x30 if s == 0 => return 0,
                    0x30 => a / s,
                    0x40 => a | s,
                    0x50 => a & s,
                    0x60 => a.checked_shl(s).unwrap_or(0),
                    0x70 => a.checked_shr(s).unwrap_or(0),
                    0x80 => a.wrapping_neg(),
                    0x90 if s == 0 => return 0,
                    0x90 => a % s,
                    0xa0 => a ^ s,
                    c => panic!("alu op {c:#x}"),
                };
            }
            0x05 => {
                let s = if i.code & 0x08 != 0 { x } else { k };
                let taken = match i.code & 0xf0 {
                    0x00 => {
                        pc += k as usize;
                        continue;
                    }
                    0x10 => a == s,
                    0x20 => a > s,
                    0x30 => a >= s,
                    0x40 => a & s != 0,
                    c => panic!("jmp op {c:#x}"),
                };
                pc += usize::from(if taken { i.jt } else { i.jf });
            }
            0x06 => {
                return match i.code & 0x18 {
                    0x00 => k,
                    0x10 => a,
                    _ => x,
                }
            }
            _ => {
                if i.code & 0xf8 == 0 {
                    x = a;
                } else {
                    a = x;
                }
            }
        }
    }
    panic!("no ret within {MAX_INSNS} steps");
}

/// The kernel's checks of a classic program: length, every jump in range, the last one a
/// `ret`, no division by a constant 0, scratch memory in 0..16 and written before it is read
/// on every path.
fn check(prog: &[sock_filter]) -> Result<(), String> {
    if prog.is_empty() || prog.len() > MAX_INSNS {
        return Err(format!("{} instructions", prog.len()));
    }
    if prog.last().unwrap().code & 0x07 != 0x06 {
        return Err("does not end in ret".into());
    }
    let mut valid = vec![u16::MAX; prog.len()];
    valid[0] = 0;
    for (pc, i) in prog.iter().enumerate() {
        let class = i.code & 0x07;
        let mut mem = valid[pc];
        match (class, i.code & 0xe0) {
            (0x00 | 0x01, 0x60) if i.k >= 16 || mem & (1 << i.k) == 0 => {
                return Err(format!("{pc}: M[{}] read before written", i.k))
            }
            (0x02 | 0x03, _) if i.k >= 16 => return Err(format!("{pc}: M[{}]", i.k)),
            (0x02 | 0x03, _) => mem |= 1 << i.k,
            (0x04, _) if matches!(i.code & 0xf8, 0x30 | 0x90) && i.k == 0 => {
                return Err(format!("{pc}: division by 0"))
            }
            _ => {}
        }
        let next = |off: usize| -> Result<usize, String> {
            let t = pc + 1 + off;
            (t < prog.len())
                .then_some(t)
                .ok_or(format!("{pc}: jump to {t}"))
        };
        match class {
            0x05 if i.code & 0xf0 == 0x00 => {
                let t = next(i.k as usize)?;
                valid[t] &= mem;
            }
            0x05 => {
                for off in [i.jt, i.jf] {
                    let t = next(usize::from(off))?;
                    valid[t] &= mem;
                }
            }
            0x06 => {}
            _ => {
                let t = next(0)?;
                valid[t] &= mem;
            }
        }
    }
    Ok(())
}

/// The group in slot order: socket i serves slot i.
fn plain(n: usize) -> Vec<Option<usize>> {
    (0..n).map(Some).collect()
}

fn slot_of(group: &[Option<usize>], index: u32) -> Option<usize> {
    group.get(index as usize).copied().flatten()
}

#[test]
fn no_ready_slot_falls_back_to_the_kernel() {
    let group = plain(4);
    for balance in [Balance::Hash, Balance::ClientIp] {
        let prog = program(&Input {
            group: &group,
            ready: &[false; 4],
            balance,
        });
        check(&prog).unwrap();
        assert_eq!(prog.len(), 1);
        assert!(run(&prog, &v4([10, 0, 0, 1], 5000)) as usize >= group.len());
    }
}

#[test]
fn only_ready_slots_get_connections_in_either_mode() {
    // Kernel order after a swap: slot 3's socket moved into index 1.
    let group = vec![Some(0), Some(3), Some(2), None, Some(1)];
    let ready = [true, false, true, false];
    for balance in [Balance::Hash, Balance::ClientIp] {
        let prog = program(&Input {
            group: &group,
            ready: &ready,
            balance,
        });
        check(&prog).unwrap();
        let mut seen = [0usize; 4];
        for i in 0..1000u32 {
            let p = v4([10, (i >> 8) as u8, i as u8, 7], 1024 + i as u16);
            let slot = slot_of(&group, run(&prog, &p)).expect("a serving socket");
            assert!(ready[slot], "{balance:?}: slot {slot} is not ready");
            seen[slot] += 1;
        }
        assert!(seen[0] > 200 && seen[2] > 200, "{balance:?}: {seen:?}");
        let p = v6([0xfd00, 0, 0, 1, 2, 3, 4, 5], 4000);
        assert!(ready[slot_of(&group, run(&prog, &p)).unwrap()]);
    }
}

#[test]
fn client_ip_keeps_each_client_on_its_home_slot_and_spreads_200_addresses_evenly() {
    let group = plain(4);
    let prog = program(&Input {
        group: &group,
        ready: &[true; 4],
        balance: Balance::ClientIp,
    });
    check(&prog).unwrap();
    let mut per_slot = [0usize; 4];
    for x in 1..=200u8 {
        let home = run(&prog, &v4([127, 0, 0, x], 40000));
        for port in [1025u16, 33333, 65535] {
            assert_eq!(run(&prog, &v4([127, 0, 0, x], port)), home, "127.0.0.{x}");
        }
        per_slot[home as usize] += 1;
    }
    assert!(per_slot.iter().all(|&n| n <= 75), "{per_slot:?}");
}

#[test]
fn client_ip_moves_only_the_clients_of_a_slot_that_cannot_serve_and_brings_them_back() {
    let group = plain(4);
    let all = [true; 4];
    let without_2 = [true, true, false, true];
    let prog = |ready: &[bool]| {
        program(&Input {
            group: &group,
            ready,
            balance: Balance::ClientIp,
        })
    };
    let (healthy, degraded) = (prog(&all), prog(&without_2));
    check(&degraded).unwrap();
    let mut moved = [0usize; 4];
    for x in 1..=200u8 {
        let p = v4([127, 0, 0, x], 5000);
        let home = run(&healthy, &p);
        let now = run(&degraded, &p);
        if home == 2 {
            assert_ne!(now, 2);
            moved[now as usize] += 1;
        } else {
            assert_eq!(now, home, "127.0.0.{x} left a ready home");
        }
        assert_eq!(run(&prog(&all), &p), home, "127.0.0.{x} came back");
    }
    // The displaced clients spread over the three others.
    assert!(moved.iter().filter(|&&n| n > 0).count() >= 2, "{moved:?}");
}

#[test]
fn client_ip_uses_the_ipv6_slash_64() {
    let group = plain(8);
    let prog = program(&Input {
        group: &group,
        ready: &[true; 8],
        balance: Balance::ClientIp,
    });
    let mut per_slot = [0usize; 8];
    for net in 0..400u16 {
        let a = run(&prog, &v6([0x2001, 0xdb8, net, 1, 0, 0, 0, 1], 1000));
        let b = run(&prog, &v6([0x2001, 0xdb8, net, 1, 0xabcd, 9, 8, 7], 2000));
        assert_eq!(a, b, "the low half changed the slot");
        per_slot[a as usize] += 1;
    }
    assert!(per_slot.iter().all(|&n| n <= 75), "{per_slot:?}");
}

#[test]
fn hash_spreads_one_client_connections_over_the_ready_slots() {
    let group = plain(4);
    let prog = program(&Input {
        group: &group,
        ready: &[true; 4],
        balance: Balance::Hash,
    });
    let mut per_slot = [0usize; 4];
    for port in 30000..30400u16 {
        per_slot[run(&prog, &v4([127, 0, 0, 1], port)) as usize] += 1;
    }
    assert!(
        per_slot.iter().all(|&n| (60..=150).contains(&n)),
        "{per_slot:?}"
    );
}

#[test]
fn a_removed_slot_socket_still_in_the_group_gets_nothing() {
    // Slot 1's old socket (index 1) is retiring; its new one joined at the end.
    let group = vec![Some(0), None, Some(2), Some(1)];
    let prog = program(&Input {
        group: &group,
        ready: &[true; 3],
        balance: Balance::ClientIp,
    });
    for x in 1..=200u8 {
        assert_ne!(run(&prog, &v4([127, 0, 0, x], 5000)), 1);
    }
}

proptest! {
    #[test]
    fn the_program_is_always_valid_and_routes_only_to_ready_slots(
        ready in proptest::collection::vec(any::<bool>(), 1..600),
        extra in 0usize..4,
        client in any::<u32>(),
        port in any::<u16>(),
        ip_v6 in any::<bool>(),
        client_ip in any::<bool>(),
    ) {
        // The slots in reverse order (not the identity), with `extra` retiring sockets.
        let mut group: Vec<Option<usize>> = (0..ready.len()).rev().map(Some).collect();
        group.extend(std::iter::repeat_n(None, extra));
        let balance = if client_ip { Balance::ClientIp } else { Balance::Hash };
        let input = Input { group: &group, ready: &ready, balance };
        let prog = program(&input);
        prop_assert!(check(&prog).is_ok(), "{:?}", check(&prog));
        let p = if ip_v6 {
            v6([0x2001, (client >> 16) as u16, client as u16, 0, 1, 2, 3, 4], port)
        } else {
            v4(client.to_be_bytes(), port)
        };
        let index = run(&prog, &p);
        match slot_of(&group, index) {
            Some(slot) => prop_assert!(ready[slot]),
            None => prop_assert!(index as usize >= group.len() && !ready.contains(&true)),
        }
    }
}
