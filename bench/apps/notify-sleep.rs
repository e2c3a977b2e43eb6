//! The trivial worker of the weight and scale sections: tell herder READY=1 (if it gave us a
//! NOTIFY_SOCKET), tell the benchmark "ready <pid>" on BENCH_PROBE_SOCKET (if set), then sleep
//! until a signal ends it. std only; bench/run compiles it with `rustc -O` into its temp dir.
use std::os::unix::net::UnixDatagram;

fn send(var: &str, msg: &str) {
    let Ok(path) = std::env::var(var) else { return };
    let Ok(sock) = UnixDatagram::unbound() else { return };
    if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        if let Ok(addr) = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()) {
            let _ = sock.send_to_addr(msg.as_bytes(), &addr);
        }
    } else {
        let _ = sock.send_to(msg.as_bytes(), &path);
    }
}

fn main() {
    send("NOTIFY_SOCKET", "READY=1");
    send("BENCH_PROBE_SOCKET", &format!("ready {}", std::process::id()));
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
