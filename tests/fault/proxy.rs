//! A TCP proxy the test owns: in front of PostgreSQL it makes the database vanish without
//! touching the shared server; in front of two replicas it is the load balancer (each new
//! connection goes to the first backend that accepts it).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;

pub struct TcpProxy {
    pub address: SocketAddr,
    state: Arc<ProxyState>,
    accept: AbortHandle,
}

struct ProxyState {
    backends: Vec<SocketAddr>,
    /// While set, new connections are closed at once and nothing is relayed.
    cut: AtomicBool,
    relays: Mutex<Vec<AbortHandle>>,
}

impl TcpProxy {
    /// Listens on a free loopback port and relays to the first of `backends` that accepts.
    pub async fn start(backends: Vec<SocketAddr>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind the proxy");
        let address = listener.local_addr().expect("proxy address");
        let state = Arc::new(ProxyState {
            backends,
            cut: AtomicBool::new(false),
            relays: Mutex::new(Vec::new()),
        });
        let accepting = state.clone();
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                if accepting.cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let backends = accepting.backends.clone();
                let relay = tokio::spawn(relay(inbound, backends));
                accepting.relays.lock().expect("relays").push(relay.abort_handle());
            }
        });
        Self { address, state, accept: accept.abort_handle() }
    }

    /// Every relayed connection is closed and new ones are closed at once.
    pub async fn cut(&self) {
        self.state.cut.store(true, Ordering::SeqCst);
        for relay in self.state.relays.lock().expect("relays").drain(..) {
            relay.abort();
        }
        // Let the aborted relays drop their sockets.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Relays again.
    pub fn restore(&self) {
        self.state.cut.store(false, Ordering::SeqCst);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.accept.abort();
        for relay in
            self.state.relays.lock().map(|mut relays| relays.split_off(0)).unwrap_or_default()
        {
            relay.abort();
        }
    }
}

async fn relay(mut inbound: TcpStream, backends: Vec<SocketAddr>) {
    for backend in backends {
        let connecting = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(backend));
        if let Ok(Ok(mut outbound)) = connecting.await {
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            return;
        }
    }
}

/// The address of the PostgreSQL server in a database URL.
pub fn postgres_address(url: &str) -> SocketAddr {
    let parsed = url::Url::parse(url).expect("database url");
    let host = parsed.host_str().expect("database host");
    let host = if host == "localhost" { "127.0.0.1" } else { host };
    format!("{host}:{}", parsed.port().unwrap_or(5432)).parse().expect("a socket address")
}

/// `url` with its host and port replaced by the proxy's.
pub fn through(url: &str, proxy: &TcpProxy) -> String {
    let mut parsed = url::Url::parse(url).expect("url");
    parsed.set_host(Some("127.0.0.1")).expect("host");
    parsed.set_port(Some(proxy.address.port())).expect("port");
    parsed.to_string()
}
