//! The SSRF guard of the URLs users give: API and LLM agents (on the runner) and alert webhooks
//! (on the server). Which addresses a URL may reach, and an HTTP client pinned to the addresses
//! that were vetted (so a DNS answer that changes between the check and the connection cannot
//! slip past). Pure code below the server and the runner, which both call it.
//!
//! Refused unless the caller allows private networks (an agent's or an alert rule's
//! `allowPrivateNetwork`): loopback, private (RFC 1918), shared
//! (CGNAT, 100.64/10), link-local, unique-local (fc00::/7), site-local, and the IPv6 forms that
//! embed such an IPv4 address (v4-mapped, v4-compatible, NAT64, 6to4). Always refused, flag or
//! not: unspecified, multicast, broadcast, reserved and documentation ranges, and the cloud
//! metadata endpoints (169.254.169.254, fd00:ec2::254, 168.63.129.16, 100.100.100.200).
//! May call: DNS resolution (tokio) and reqwest.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use url::{Host, Url};

/// What kind of address an IP is, as far as the SSRF guard cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressClass {
    /// Reachable on the public internet.
    Public,
    Loopback,
    /// RFC 1918 (v4), or a deprecated site-local v6 address.
    Private,
    /// 100.64.0.0/10, carrier-grade NAT.
    SharedCgnat,
    LinkLocal,
    /// fc00::/7.
    UniqueLocal,
    /// A cloud provider's instance metadata endpoint.
    Metadata,
    Unspecified,
    Multicast,
    Broadcast,
    /// Reserved, documentation, benchmarking or protocol-assignment ranges.
    Reserved,
}

impl AddressClass {
    /// Whether the class is reachable with `allowPrivateNetwork` (and only then).
    pub fn is_private_network(self) -> bool {
        matches!(
            self,
            Self::Loopback
                | Self::Private
                | Self::SharedCgnat
                | Self::LinkLocal
                | Self::UniqueLocal
        )
    }

    /// Whether an agent may connect to an address of this class.
    pub fn is_allowed(self, allow_private_network: bool) -> bool {
        self == Self::Public || (allow_private_network && self.is_private_network())
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::SharedCgnat => "shared (carrier-grade NAT)",
            Self::LinkLocal => "link-local",
            Self::UniqueLocal => "unique-local",
            Self::Metadata => "cloud metadata",
            Self::Unspecified => "unspecified",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Reserved => "reserved",
        }
    }
}

/// Classifies an address; IPv6 addresses that embed an IPv4 address take that address's class.
pub fn classify(address: IpAddr) -> AddressClass {
    match address {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(address: Ipv4Addr) -> AddressClass {
    let [first, second, third, fourth] = address.octets();
    let metadata = [
        Ipv4Addr::new(169, 254, 169, 254),
        Ipv4Addr::new(168, 63, 129, 16),
        Ipv4Addr::new(100, 100, 100, 200),
        Ipv4Addr::new(192, 0, 0, 192),
    ];
    if metadata.contains(&address) {
        return AddressClass::Metadata;
    }
    match (first, second, third) {
        (0, _, _) => AddressClass::Unspecified,
        (127, _, _) => AddressClass::Loopback,
        (10, _, _) => AddressClass::Private,
        (172, 16..=31, _) => AddressClass::Private,
        (192, 168, _) => AddressClass::Private,
        (100, 64..=127, _) => AddressClass::SharedCgnat,
        (169, 254, _) => AddressClass::LinkLocal,
        (224..=239, _, _) => AddressClass::Multicast,
        (255, 255, 255) if fourth == 255 => AddressClass::Broadcast,
        (240..=255, _, _) => AddressClass::Reserved,
        // IETF protocol assignments, TEST-NET-1/2/3, benchmarking, 6to4 relay anycast.
        (192, 0, 0) | (192, 0, 2) | (198, 51, 100) | (203, 0, 113) | (192, 88, 99) => {
            AddressClass::Reserved
        }
        (198, 18..=19, _) => AddressClass::Reserved,
        _ => AddressClass::Public,
    }
}

fn classify_v6(address: Ipv6Addr) -> AddressClass {
    if address.is_unspecified() {
        return AddressClass::Unspecified;
    }
    if address.is_loopback() {
        return AddressClass::Loopback;
    }
    if let Some(embedded) = embedded_v4(address) {
        return classify_v4(embedded);
    }
    let segments = address.segments();
    if address == Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254) {
        return AddressClass::Metadata;
    }
    match segments[0] {
        0xff00..=0xffff => AddressClass::Multicast,
        0xfe80..=0xfebf => AddressClass::LinkLocal,
        0xfec0..=0xfeff => AddressClass::Private,
        0xfc00..=0xfdff => AddressClass::UniqueLocal,
        // Documentation (2001:db8::/32), Teredo (2001::/32), discard-only (100::/64), ORCHIDv2.
        0x2001 if segments[1] == 0x0db8 || segments[1] == 0 => AddressClass::Reserved,
        0x2001 if (0x0010..=0x002f).contains(&segments[1]) => AddressClass::Reserved,
        0x0100 if segments[1..4] == [0, 0, 0] => AddressClass::Reserved,
        0x0000..=0x00ff => AddressClass::Reserved,
        _ => AddressClass::Public,
    }
}

/// The IPv4 address inside a v4-mapped, v4-compatible, NAT64 (64:ff9b::/96) or 6to4
/// (2002::/16) address.
fn embedded_v4(address: Ipv6Addr) -> Option<Ipv4Addr> {
    let segments = address.segments();
    let low_v4 = || {
        let octets = address.octets();
        Ipv4Addr::new(octets[12], octets[13], octets[14], octets[15])
    };
    match segments {
        [0, 0, 0, 0, 0, 0xffff, _, _] | [0, 0, 0, 0, 0, 0, _, _] => Some(low_v4()),
        [0x0064, 0xff9b, 0, 0, 0, 0, _, _] => Some(low_v4()),
        [0x2002, high, low, ..] => {
            let [a, b] = high.to_be_bytes();
            let [c, d] = low.to_be_bytes();
            Some(Ipv4Addr::new(a, b, c, d))
        }
        _ => None,
    }
}

/// Why a URL may not be fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SsrfError {
    #[error("only http and https URLs are allowed, not `{0}:`")]
    Scheme(String),
    #[error("the URL has no host")]
    NoHost,
    #[error("cannot resolve {host}: {message}")]
    Resolve { host: String, message: String },
    #[error("refused: {host} is {address}, a {class} address{hint}")]
    Refused { host: String, address: IpAddr, class: &'static str, hint: &'static str },
}

impl SsrfError {
    /// A failed DNS lookup may succeed later; a refusal will not.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Resolve { .. })
    }
}

/// The addresses `url` may be fetched from: its host resolved and every answer vetted (one
/// refused answer refuses the URL, so a mixed answer cannot be used to reach inside).
pub async fn vet_url(url: &Url, allow_private_network: bool) -> Result<Vec<SocketAddr>, SsrfError> {
    if !matches!(url.scheme(), "http" | "https") {
        return Err(SsrfError::Scheme(url.scheme().to_owned()));
    }
    let port = url.port_or_known_default().unwrap_or(80);
    let addresses: Vec<SocketAddr> = match url.host() {
        None => return Err(SsrfError::NoHost),
        Some(Host::Ipv4(address)) => vec![SocketAddr::new(IpAddr::V4(address), port)],
        Some(Host::Ipv6(address)) => vec![SocketAddr::new(IpAddr::V6(address), port)],
        Some(Host::Domain(domain)) => tokio::net::lookup_host((domain, port))
            .await
            .map_err(|error| SsrfError::Resolve {
                host: domain.to_owned(),
                message: error.to_string(),
            })?
            .collect(),
    };
    if addresses.is_empty() {
        return Err(SsrfError::Resolve {
            host: url.host_str().unwrap_or_default().to_owned(),
            message: "no address".to_owned(),
        });
    }
    for address in &addresses {
        let class = classify(address.ip());
        if !class.is_allowed(allow_private_network) {
            let hint = if class.is_private_network() {
                " (an administrator can allow it with allowPrivateNetwork)"
            } else {
                ""
            };
            return Err(SsrfError::Refused {
                host: url.host_str().unwrap_or_default().to_owned(),
                address: address.ip(),
                class: class.describe(),
                hint,
            });
        }
    }
    Ok(addresses)
}

/// A client that reaches `url`'s host only at `addresses` (from [`vet_url`]), follows no
/// redirect and ignores proxy settings (a proxy would connect elsewhere).
pub fn pinned_client(url: &Url, addresses: &[SocketAddr]) -> Result<reqwest::Client, String> {
    pinned_client_as(url, addresses, concat!("turbocat-runner/", env!("CARGO_PKG_VERSION")))
}

/// How many clients [`pinned_client_as`] keeps for reuse.
const KEPT_CLIENTS: usize = 256;

/// A kept client's key: the URL's host, the addresses it is pinned to (sorted) and its user
/// agent.
type ClientKey = (String, Vec<SocketAddr>, String);

/// [`pinned_client`] sending `user_agent`. Clients are kept by host, addresses and user agent,
/// so that calls to the same place reuse one client: its open connections (keep-alive) and its
/// TLS setup, which building a client for every call cost (a new connection and a few
/// milliseconds a call). A DNS answer that changed makes another key, so a kept client still
/// only reaches addresses vetted for the call at hand. At most `KEPT_CLIENTS` are kept (all
/// are dropped when that many are).
pub fn pinned_client_as(
    url: &Url,
    addresses: &[SocketAddr],
    user_agent: &str,
) -> Result<reqwest::Client, String> {
    static KEPT: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<ClientKey, reqwest::Client>>,
    > = std::sync::OnceLock::new();
    let kept = KEPT.get_or_init(Default::default);
    let mut pinned = addresses.to_vec();
    pinned.sort_unstable();
    pinned.dedup();
    let key = (url.host_str().unwrap_or_default().to_owned(), pinned, user_agent.to_owned());
    if let Some(client) = kept.lock().ok().and_then(|kept| kept.get(&key).cloned()) {
        return Ok(client);
    }
    let client = build_pinned_client(url, addresses, user_agent)?;
    if let Ok(mut kept) = kept.lock() {
        if kept.len() >= KEPT_CLIENTS {
            kept.clear();
        }
        kept.insert(key, client.clone());
    }
    Ok(client)
}

fn build_pinned_client(
    url: &Url,
    addresses: &[SocketAddr],
    user_agent: &str,
) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(user_agent);
    if let Some(Host::Domain(domain)) = url.host() {
        builder = builder.resolve_to_addrs(domain, addresses);
    }
    builder.build().map_err(|error| format!("cannot build the HTTP client: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class_of(text: &str) -> AddressClass {
        classify(text.parse().unwrap())
    }

    #[test]
    fn ipv4_ranges_are_classified() {
        let cases = [
            ("8.8.8.8", AddressClass::Public),
            ("140.82.112.3", AddressClass::Public),
            ("127.0.0.1", AddressClass::Loopback),
            ("127.255.0.9", AddressClass::Loopback),
            ("10.1.2.3", AddressClass::Private),
            ("172.16.0.1", AddressClass::Private),
            ("172.31.255.255", AddressClass::Private),
            ("172.32.0.1", AddressClass::Public),
            ("192.168.1.1", AddressClass::Private),
            ("100.64.0.1", AddressClass::SharedCgnat),
            ("100.127.255.255", AddressClass::SharedCgnat),
            ("100.128.0.1", AddressClass::Public),
            ("169.254.10.1", AddressClass::LinkLocal),
            ("169.254.169.254", AddressClass::Metadata),
            ("100.100.100.200", AddressClass::Metadata),
            ("168.63.129.16", AddressClass::Metadata),
            ("0.0.0.0", AddressClass::Unspecified),
            ("0.1.2.3", AddressClass::Unspecified),
            ("224.0.0.1", AddressClass::Multicast),
            ("239.255.255.250", AddressClass::Multicast),
            ("255.255.255.255", AddressClass::Broadcast),
            ("240.0.0.1", AddressClass::Reserved),
            ("192.0.2.10", AddressClass::Reserved),
            ("198.18.0.1", AddressClass::Reserved),
        ];
        for (text, expected) in cases {
            assert_eq!(class_of(text), expected, "{text}");
        }
    }

    #[test]
    fn ipv6_ranges_and_embedded_ipv4_are_classified() {
        let cases = [
            ("2606:4700:4700::1111", AddressClass::Public),
            ("::1", AddressClass::Loopback),
            ("::", AddressClass::Unspecified),
            ("fe80::1", AddressClass::LinkLocal),
            ("fc00::1", AddressClass::UniqueLocal),
            ("fd12:3456::1", AddressClass::UniqueLocal),
            ("fd00:ec2::254", AddressClass::Metadata),
            ("fec0::1", AddressClass::Private),
            ("ff02::1", AddressClass::Multicast),
            ("2001:db8::1", AddressClass::Reserved),
            ("2001::1", AddressClass::Reserved),
            ("::ffff:127.0.0.1", AddressClass::Loopback),
            ("::ffff:10.0.0.1", AddressClass::Private),
            ("::ffff:169.254.169.254", AddressClass::Metadata),
            ("::ffff:8.8.8.8", AddressClass::Public),
            ("::127.0.0.1", AddressClass::Loopback),
            ("64:ff9b::a9fe:a9fe", AddressClass::Metadata),
            ("64:ff9b::808:808", AddressClass::Public),
            ("2002:c0a8:0101::1", AddressClass::Private),
            ("2002:0808:0808::1", AddressClass::Public),
        ];
        for (text, expected) in cases {
            assert_eq!(class_of(text), expected, "{text}");
        }
    }

    #[test]
    fn the_flag_opens_private_networks_but_never_metadata_or_multicast() {
        for class in [AddressClass::Loopback, AddressClass::Private, AddressClass::LinkLocal] {
            assert!(!class.is_allowed(false), "{class:?}");
            assert!(class.is_allowed(true), "{class:?}");
        }
        for class in [AddressClass::Metadata, AddressClass::Multicast, AddressClass::Unspecified] {
            assert!(!class.is_allowed(true), "{class:?}");
        }
        assert!(AddressClass::Public.is_allowed(false));
    }

    #[tokio::test]
    async fn urls_are_vetted_without_connecting() {
        let refused = |text: &str| {
            let url = Url::parse(text).unwrap();
            async move { vet_url(&url, false).await }
        };
        assert!(matches!(refused("http://127.0.0.1:9/").await, Err(SsrfError::Refused { .. })));
        assert!(matches!(refused("http://[::1]/").await, Err(SsrfError::Refused { .. })));
        assert!(matches!(refused("http://localhost/").await, Err(SsrfError::Refused { .. })));
        assert!(matches!(
            refused("http://[::ffff:169.254.169.254]/").await,
            Err(SsrfError::Refused { .. })
        ));
        assert!(matches!(refused("file:///etc/passwd").await, Err(SsrfError::Scheme(_))));
        assert!(matches!(refused("ftp://8.8.8.8/").await, Err(SsrfError::Scheme(_))));
        let public = vet_url(&Url::parse("https://8.8.8.8/x").unwrap(), false).await.unwrap();
        assert_eq!(public, vec!["8.8.8.8:443".parse().unwrap()]);
        let allowed = vet_url(&Url::parse("http://127.0.0.1:8080/").unwrap(), true).await.unwrap();
        assert_eq!(allowed, vec!["127.0.0.1:8080".parse().unwrap()]);
        let metadata = vet_url(&Url::parse("http://169.254.169.254/").unwrap(), true).await;
        assert!(matches!(metadata, Err(SsrfError::Refused { class: "cloud metadata", .. })));
    }

    /// A loopback HTTP/1.1 server answering every request `ok` on a kept-alive connection;
    /// counts the connections it accepted.
    async fn counting_server() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0_u8; 1024];
                    while let Ok(read) = socket.read(&mut buffer).await {
                        if read == 0 {
                            return;
                        }
                        request.extend_from_slice(&buffer[..read]);
                        while let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                            request.drain(..end + 4);
                            let answer = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                            if socket.write_all(answer).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (address, accepted)
    }

    #[tokio::test]
    async fn calls_to_the_same_place_share_a_client_and_its_connection() {
        let (address, accepted) = counting_server().await;
        let url = Url::parse(&format!("http://localhost:{}/step", address.port())).unwrap();
        for _ in 0..3 {
            let client = pinned_client(&url, &[address]).unwrap();
            let body = client.get(url.clone()).send().await.unwrap().text().await.unwrap();
            assert_eq!(body, "ok");
        }
        assert_eq!(
            accepted.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "one kept-alive connection"
        );

        // Pinned elsewhere (another vetted answer), or sent as someone else: another client.
        let (other, other_accepted) = counting_server().await;
        let moved = Url::parse(&format!("http://localhost:{}/step", other.port())).unwrap();
        let client = pinned_client(&moved, &[other]).unwrap();
        assert_eq!(client.get(moved.clone()).send().await.unwrap().text().await.unwrap(), "ok");
        assert_eq!(other_accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
        let webhook = pinned_client_as(&url, &[address], "turbocat-alerts").unwrap();
        webhook.get(url.clone()).send().await.unwrap();
        assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 2, "its own connection");
    }
}
