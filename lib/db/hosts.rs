//! `database.url` naming several servers, as libpq takes it:
//! `postgres://user:pw@host1:5432,host2:5433/db?target_session_attrs=read-write`.
//! sqlx connects to one host, so the list is split here into one set of options per host;
//! [`super::primary`] keeps the pool on whichever of them is the primary.

use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;

/// Why `database.url` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("not a URL (postgres://...)")]
    NotUrl,
    #[error("empty host in the host list")]
    EmptyHost,
    #[error("bad port in {0}")]
    Port(String),
    #[error(
        "target_session_attrs={0} is not supported: the services write, so only read-write \
         (or primary) makes sense"
    )]
    SessionAttrs(String),
    #[error(transparent)]
    Options(#[from] sqlx::Error),
}

/// The servers `database.url` names, in its order, each as complete connect options.
#[derive(Debug, Clone)]
pub struct Targets {
    /// One per host; the first is the one tried first.
    pub hosts: Vec<PgConnectOptions>,
}

impl Targets {
    /// Whether the pool must look for the primary among several servers.
    pub fn several(&self) -> bool {
        self.hosts.len() > 1
    }

    /// `host:port` of target `i`, for logs and errors (never the password).
    pub fn name(&self, i: usize) -> String {
        self.hosts
            .get(i)
            .map(|o| format!("{}:{}", o.get_host(), o.get_port()))
            .unwrap_or_default()
    }
}

/// Splits `url` into one set of connect options per host. A URL with one host parses exactly
/// as sqlx parses it; `target_session_attrs`, which sqlx does not know, is taken out here.
pub fn parse(url: &str) -> Result<Targets, HostsError> {
    let (scheme, rest) = url.split_once("://").ok_or(HostsError::NotUrl)?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, list) = match authority.rsplit_once('@') {
        Some((user, list)) => (format!("{user}@"), list),
        None => (String::new(), authority),
    };
    let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("target_session_attrs", value)) => match value {
                "read-write" | "primary" => {}
                other => return Err(HostsError::SessionAttrs(other.to_owned())),
            },
            _ => kept.push(pair),
        }
    }
    let query = if kept.is_empty() {
        String::new()
    } else {
        format!("?{}", kept.join("&"))
    };
    let hosts = list
        .split(',')
        .map(split_host)
        .collect::<Result<Vec<_>, _>>()?;
    let (first, _) = hosts.first().ok_or(HostsError::EmptyHost)?;
    let base = PgConnectOptions::from_str(&format!("{scheme}://{userinfo}{first}{path}{query}"))?;
    let hosts = hosts
        .iter()
        .map(|(host, port)| {
            let options = base.clone().host(host.trim_matches(['[', ']']));
            match port {
                Some(port) => options.port(*port),
                None => options,
            }
        })
        .collect();
    Ok(Targets { hosts })
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`.
fn split_host(item: &str) -> Result<(String, Option<u16>), HostsError> {
    let item = item.trim();
    if item.is_empty() {
        return Err(HostsError::EmptyHost);
    }
    let port_at = match item.rfind(']') {
        Some(close) => item[close..].find(':').map(|i| close + i),
        None => item.rfind(':'),
    };
    match port_at {
        Some(at) => {
            let port = item[at + 1..]
                .parse()
                .map_err(|_| HostsError::Port(item.to_owned()))?;
            Ok((item[..at].to_owned(), Some(port)))
        }
        None => Ok((item.to_owned(), None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_host_parses_as_sqlx_parses_it() {
        let url = "postgres://u:p@db.example:6000/shop?sslmode=disable";
        let targets = parse(url).expect("parses");
        assert!(!targets.several());
        let ours = &targets.hosts[0];
        let theirs = PgConnectOptions::from_str(url).expect("sqlx parses");
        assert_eq!(ours.get_host(), theirs.get_host());
        assert_eq!(ours.get_port(), theirs.get_port());
        assert_eq!(ours.get_database(), theirs.get_database());
        assert_eq!(ours.get_username(), theirs.get_username());
    }

    #[test]
    fn several_hosts_share_everything_but_host_and_port() {
        let url = "postgresql://u:p%40ss@10.0.0.1:5433,pg-b,[::1]:5434/shop\
                   ?target_session_attrs=read-write&application_name=x";
        let targets = parse(url).expect("parses");
        assert!(targets.several());
        let names: Vec<String> = (0..3).map(|i| targets.name(i)).collect();
        assert_eq!(names, ["10.0.0.1:5433", "pg-b:5432", "::1:5434"]);
        for options in &targets.hosts {
            assert_eq!(options.get_database(), Some("shop"));
            assert_eq!(options.get_username(), "u");
        }
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        for (url, expect) in [
            (
                "postgres://h1,h2/db?target_session_attrs=standby",
                "standby",
            ),
            ("postgres://h1,,h2/db", "empty host"),
            ("postgres://h1:x,h2/db", "bad port"),
            ("h1:5432,h2:5432", "not a URL"),
        ] {
            let error = parse(url).expect_err(url).to_string();
            assert!(error.contains(expect), "{url}: {error}");
        }
    }
}
