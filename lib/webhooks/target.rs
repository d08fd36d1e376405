//! Where a webhook may go. An endpoint URL is an admin's input that makes us send requests, so
//! it must not reach our own network: http or https only, no credentials in it, and every
//! address its host resolves to must be public, unless `webhooks.allow_private_targets`. The
//! check runs at registration and again before each connection, and the connection goes to the
//! address that was checked (a name that resolves elsewhere the second time cannot slip by).

use std::net::{IpAddr, SocketAddr};

/// Why a URL is not a target.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TargetError {
    #[error("the URL must be an absolute http or https URL without credentials")]
    Malformed,
    #[error("{0} resolves to no address")]
    Unresolved(String),
    #[error("{host} resolves to {addr}, a private, loopback or link-local address")]
    Private { host: String, addr: IpAddr },
}

/// A checked target: its URL and the address to connect to.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: reqwest::Url,
    pub host: String,
    pub addr: SocketAddr,
}

/// Parses `raw` as an endpoint URL (no resolution).
pub fn parse(raw: &str) -> Result<reqwest::Url, TargetError> {
    let url = reqwest::Url::parse(raw.trim()).map_err(|_| TargetError::Malformed)?;
    let fine = matches!(url.scheme(), "http" | "https")
        && url.host_str().is_some_and(|h| !h.is_empty())
        && url.username().is_empty()
        && url.password().is_none()
        && raw.len() <= 2048;
    fine.then_some(url).ok_or(TargetError::Malformed)
}

/// Resolves the URL's host and checks every address it has.
pub async fn resolve(url: &reqwest::Url, allow_private: bool) -> Result<Target, TargetError> {
    let host = url.host_str().ok_or(TargetError::Malformed)?.to_owned();
    let port = url.port_or_known_default().ok_or(TargetError::Malformed)?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((bare, port))
            .await
            .map_err(|_| TargetError::Unresolved(host.clone()))?
            .collect(),
    };
    let first = *addrs
        .first()
        .ok_or_else(|| TargetError::Unresolved(host.clone()))?;
    if !allow_private {
        if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
            return Err(TargetError::Private {
                host,
                addr: bad.ip(),
            });
        }
    }
    Ok(Target {
        url: url.clone(),
        host: bare.to_owned(),
        addr: first,
    })
}

/// Whether an address is on the public internet.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_private()
                || v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                // Carrier-grade NAT, benchmarking, and "this network".
                || (a == 100 && (64..128).contains(&b))
                || (a == 198 && (18..20).contains(&b))
                || a == 0
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                // Unique local (fc00::/7) and link-local (fe80::/10).
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_absolute_http_urls_without_credentials() {
        assert!(parse("https://shop.example/hooks").is_ok());
        assert!(parse("http://shop.example:8080/h?x=1").is_ok());
        for bad in [
            "ftp://x/y",
            "/relative",
            "https://user:pw@x/",
            "not a url",
            "file:///etc",
        ] {
            assert_eq!(parse(bad).err(), Some(TargetError::Malformed), "{bad}");
        }
    }

    #[test]
    fn private_loopback_and_link_local_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:2800:220:1::1"] {
            assert!(is_public(ip.parse().expect("ip")), "{ip}");
        }
    }

    #[tokio::test]
    async fn a_loopback_target_is_refused_unless_allowed() {
        let url = parse("http://127.0.0.1:9/hook").expect("url");
        assert!(matches!(
            resolve(&url, false).await,
            Err(TargetError::Private { .. })
        ));
        assert!(resolve(&url, true).await.is_ok());
    }
}
