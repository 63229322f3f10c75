//! The egress proxy of CODE steps with the network ON (without `allowPrivateNetwork`): the
//! runner's side of a snippet's only way out.
//!
//! Such a step keeps its empty network namespace. The runner listens on a Unix socket in the
//! step's directory (Unix sockets cross network namespaces), the sandbox sees that directory at
//! [`SANDBOX_SOCKET_DIRECTORY`], and the sandbox's init relays each TCP connection made to
//! `127.0.0.1:`[`RELAY_PORT`] inside the step's namespace to it (see `sandbox`). Here, each
//! connection speaks HTTP proxy: `CONNECT host:port` (HTTPS and any other tunnel) or an
//! absolute `http://` request. The destination goes through the SSRF guard of API agents
//! (`crate::ssrf`): the name is resolved here, every address vetted, and the runner
//! connects to a vetted address itself, so no answer can change between the check and the
//! connection. A refusal is a `403` whose body says why. The listener and every connection end
//! with the step.
//! May call: `crate::ssrf`, tokio (Unix and TCP sockets).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio::task::JoinSet;
use url::Url;

use crate::ssrf;

/// Where the sandbox sees the proxy's socket directory.
pub const SANDBOX_SOCKET_DIRECTORY: &str = "/run/turbocat-egress";
/// The socket's name in that directory.
pub const SOCKET_NAME: &str = "proxy.sock";
/// The port of the relay inside the step's network namespace (on 127.0.0.1).
pub const RELAY_PORT: u16 = 3128;
/// The environment variable naming the one address (`ip:port`) the guard lets through for
/// tests, whatever its class. Never set it in production.
pub const TEST_ALLOW_VARIABLE: &str = "TURBOCAT_EGRESS_TEST_ALLOW";

/// The longest request head (request line and headers) the proxy reads.
const MAX_HEAD_BYTES: usize = 32 * 1024;
/// How long a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);
/// How long connecting to a destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The pause after a failed accept.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(50);
/// Connections of one step at once; more are closed at once.
const MAX_CONNECTIONS: usize = 64;

static TEST_ALLOWED: OnceLock<Option<SocketAddr>> = OnceLock::new();

/// Sets the address the guard lets through for tests (from [`TEST_ALLOW_VARIABLE`]); the
/// first call wins.
pub fn configure_test_allowance(address: Option<SocketAddr>) {
    if let Some(address) = address {
        tracing::warn!(%address, "the egress proxy lets this address through for tests");
    }
    let _ = TEST_ALLOWED.set(address);
}

/// The environment of a snippet whose way out is the relay.
pub fn proxy_environment() -> Vec<(&'static str, std::ffi::OsString)> {
    let proxy = format!("http://127.0.0.1:{RELAY_PORT}");
    let mut environment: Vec<(&'static str, std::ffi::OsString)> =
        ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"]
            .into_iter()
            .map(|name| (name, proxy.clone().into()))
            .collect();
    environment.push(("NO_PROXY", "".into()));
    environment.push(("no_proxy", "".into()));
    // Node 22.21 and 24 honour the variables above with this; older versions ignore it.
    environment.push(("NODE_USE_ENV_PROXY", "1".into()));
    environment
}

/// A step's proxy: listening until dropped, then every connection of it ends.
pub(super) struct EgressProxy {
    accepting: tokio::task::JoinHandle<()>,
}

impl EgressProxy {
    /// Listens on `<step directory>/egress/proxy.sock` (the directory is what the sandbox
    /// binds at [`SANDBOX_SOCKET_DIRECTORY`]).
    pub fn start(step_directory: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let directory = socket_directory(step_directory);
        std::fs::DirBuilder::new().mode(0o700).create(&directory)?;
        let listener = UnixListener::bind(directory.join(SOCKET_NAME))?;
        let accepting = tokio::spawn(accept_loop(listener));
        Ok(Self { accepting })
    }
}

impl Drop for EgressProxy {
    fn drop(&mut self) {
        // Dropping the task drops its JoinSet, which aborts every connection.
        self.accepting.abort();
    }
}

/// The directory of a step's proxy socket, outside the sandbox.
pub(super) fn socket_directory(step_directory: &Path) -> PathBuf {
    step_directory.join("egress")
}

async fn accept_loop(listener: UnixListener) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of descriptors, say: wait instead of spinning.
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                    continue;
                };
                while connections.try_join_next().is_some() {}
                if connections.len() >= MAX_CONNECTIONS {
                    drop(stream);
                    continue;
                }
                connections.spawn(serve(stream));
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// What a client asked for.
#[derive(Debug, PartialEq, Eq)]
enum ProxyRequest {
    /// `CONNECT host:port`: a tunnel.
    Tunnel { url: Url },
    /// An absolute `http://` request: forwarded as `head` (origin-form, `Connection: close`).
    Forward { url: Url, head: Vec<u8> },
}

/// A request the proxy does not carry out, with its status.
#[derive(Debug, PartialEq, Eq)]
struct Refusal {
    status: u16,
    reason: String,
}

impl Refusal {
    fn bad_request(reason: impl Into<String>) -> Self {
        Self { status: 400, reason: reason.into() }
    }
}

async fn serve(mut client: UnixStream) {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)).await {
        Ok(Ok(head)) => head,
        Ok(Err(refusal)) => return answer(&mut client, &refusal).await,
        Err(_) => return,
    };
    let (request, rest) = match parse_request(&head) {
        Ok(parsed) => parsed,
        Err(refusal) => return answer(&mut client, &refusal).await,
    };
    let url = match &request {
        ProxyRequest::Tunnel { url } | ProxyRequest::Forward { url, .. } => url.clone(),
    };
    let mut destination = match connect(&url).await {
        Ok(destination) => destination,
        Err(refusal) => {
            tracing::info!(
                destination = %url.host_str().unwrap_or_default(),
                status = refusal.status,
                reason = %refusal.reason,
                "egress refused"
            );
            return answer(&mut client, &refusal).await;
        }
    };
    tracing::debug!(destination = %url.host_str().unwrap_or_default(), "egress allowed");
    let started = match &request {
        ProxyRequest::Tunnel { .. } => {
            client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await
        }
        ProxyRequest::Forward { head, .. } => destination.write_all(head).await,
    };
    if started.is_err() || destination.write_all(rest).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut destination).await;
}

/// Reads up to the end of the request head; what follows it is part of the result too.
async fn read_head(client: &mut (impl AsyncRead + Unpin)) -> Result<Vec<u8>, Refusal> {
    let mut head = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let read = client
            .read(&mut buffer)
            .await
            .map_err(|_| Refusal::bad_request("the request could not be read"))?;
        if read == 0 {
            return Err(Refusal::bad_request("the request ended before its headers"));
        }
        head.extend_from_slice(&buffer[..read]);
        if find_head_end(&head).is_some() {
            return Ok(head);
        }
        if head.len() > MAX_HEAD_BYTES {
            return Err(Refusal::bad_request("the request headers are too long"));
        }
    }
}

fn find_head_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|window| window == b"\r\n\r\n").map(|start| start + 4)
}

/// The request, and the bytes after its head (sent on as they are).
fn parse_request(bytes: &[u8]) -> Result<(ProxyRequest, &[u8]), Refusal> {
    let end = find_head_end(bytes).ok_or_else(|| Refusal::bad_request("no request head"))?;
    let text = std::str::from_utf8(&bytes[..end])
        .map_err(|_| Refusal::bad_request("the request head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut words = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (words.next(), words.next(), words.next(), words.next())
    else {
        return Err(Refusal::bad_request("the request line is not `METHOD target HTTP/1.x`"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(Refusal::bad_request("only HTTP/1.x requests are proxied"));
    }
    let rest = &bytes[end..];
    if method.eq_ignore_ascii_case("CONNECT") {
        let has_port = target
            .rsplit_once(':')
            .is_some_and(|(_, port)| !port.is_empty() && port.parse::<u16>().is_ok());
        let url = Url::parse(&format!("http://{target}/"))
            .ok()
            .filter(|url| has_port && url.host_str().is_some() && url.path() == "/")
            .ok_or_else(|| Refusal::bad_request("CONNECT needs `host:port`"))?;
        return Ok((ProxyRequest::Tunnel { url }, rest));
    }
    let url = Url::parse(target).ok().filter(|url| url.scheme() == "http").ok_or_else(|| {
        Refusal::bad_request(
            "the egress proxy takes `CONNECT host:port` (HTTPS) or an absolute `http://` URL",
        )
    })?;
    // The destination's own Host (a client may have named the proxy), no proxy headers, and
    // one request per connection (a next one could name another host).
    let authority = match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_owned(),
    };
    let mut head = format!("{method} {} {version}\r\nHost: {authority}\r\n", origin_form(&url));
    for line in lines.filter(|line| !line.is_empty()) {
        let name = line.split(':').next().unwrap_or_default().trim().to_ascii_lowercase();
        let hop_by_hop = ["host", "connection", "keep-alive"].contains(&name.as_str());
        if hop_by_hop || name.starts_with("proxy-") {
            continue;
        }
        head.push_str(line);
        head.push_str("\r\n");
    }
    head.push_str("Connection: close\r\n\r\n");
    Ok((ProxyRequest::Forward { url, head: head.into_bytes() }, rest))
}

fn origin_form(url: &Url) -> String {
    match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    }
}

/// Connects to `url`'s host and port at an address the guard allows.
async fn connect(url: &Url) -> Result<TcpStream, Refusal> {
    let addresses = match test_allowance(url) {
        Some(address) => vec![address],
        None => ssrf::vet_url(url, false).await.map_err(|error| Refusal {
            status: if error.is_retryable() { 502 } else { 403 },
            reason: error.to_string(),
        })?,
    };
    let unreachable = |detail: String| Refusal {
        status: 502,
        reason: format!("cannot connect to {}: {detail}", url.host_str().unwrap_or_default()),
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&addresses[..])).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(error)) => Err(unreachable(error.to_string())),
        Err(_) => Err(unreachable("timed out".to_owned())),
    }
}

/// The test address, when `url` names exactly it.
fn test_allowance(url: &Url) -> Option<SocketAddr> {
    let allowed = (*TEST_ALLOWED.get()?)?;
    let host: std::net::IpAddr = match url.host()? {
        url::Host::Ipv4(address) => address.into(),
        url::Host::Ipv6(address) => address.into(),
        url::Host::Domain(_) => return None,
    };
    let port = url.port_or_known_default()?;
    (SocketAddr::new(host, port) == allowed).then_some(allowed)
}

async fn answer(client: &mut (impl AsyncWrite + Unpin), refusal: &Refusal) {
    let phrase = match refusal.status {
        400 => "Bad Request",
        403 => "Forbidden",
        _ => "Bad Gateway",
    };
    let body = format!("turbocat egress proxy: {}\n", refusal.reason);
    let response = format!(
        "HTTP/1.1 {} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: \
         {}\r\nConnection: close\r\n\r\n{body}",
        refusal.status,
        body.len()
    );
    let _ = client.write_all(response.as_bytes()).await;
    let _ = client.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_and_absolute_requests_are_parsed_and_rewritten() {
        let (request, rest) =
            parse_request(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com\r\n\r\nhello")
                .unwrap();
        assert_eq!(
            request,
            ProxyRequest::Tunnel { url: Url::parse("http://example.com:443/").unwrap() }
        );
        assert_eq!(rest, b"hello");

        let (request, rest) = parse_request(
            b"GET http://example.com:8080/a?b=1 HTTP/1.1\r\nHost: 127.0.0.1:3128\r\n\
              Proxy-Authorization: x\r\nConnection: keep-alive\r\nAccept: */*\r\n\r\n",
        )
        .unwrap();
        let ProxyRequest::Forward { url, head } = request else { panic!("{request:?}") };
        assert_eq!(url.as_str(), "http://example.com:8080/a?b=1");
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "GET /a?b=1 HTTP/1.1\r\nHost: example.com:8080\r\nAccept: */*\r\nConnection: \
             close\r\n\r\n"
        );
        assert!(rest.is_empty());
    }

    #[test]
    fn other_requests_are_bad_requests() {
        for request in [
            &b"GET /relative HTTP/1.1\r\n\r\n"[..],
            b"GET https://example.com/ HTTP/1.1\r\n\r\n",
            b"CONNECT example.com HTTP/1.1\r\n\r\n",
            b"CONNECT [::1] HTTP/1.1\r\n\r\n",
            b"GET http://example.com/ HTTP/2\r\n\r\n",
            b"nonsense\r\n\r\n",
        ] {
            let refusal = parse_request(request).unwrap_err();
            assert_eq!(refusal.status, 400, "{}", String::from_utf8_lossy(request));
        }
    }
}
