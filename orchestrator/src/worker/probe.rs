//! Whether a guest is up on its address. A TCP connection attempt answers that without
//! privileges or anything installed in the guest: a Linux guest whose interface is up with the
//! address answers a SYN with SYN-ACK (a listening port) or RST (a closed one); before that the
//! attempt times out or finds no host.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

pub async fn guest_answers(ip: Ipv4Addr, port: u16, timeout: Duration) -> bool {
    let addr = SocketAddr::from((ip, port));
    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => e.kind() == ErrorKind::ConnectionRefused,
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_and_closed_ports_answer() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let lo = Ipv4Addr::LOCALHOST;
        assert!(guest_answers(lo, port, Duration::from_secs(2)).await);
        drop(l);
        // Nothing listens any more: the RST still proves the host is there.
        assert!(guest_answers(lo, port, Duration::from_secs(2)).await);
    }
}
