//! The `database` setting: an SQLite file's path or a PostgreSQL URL — which it is, how it may be
//! shown (no password), and what a PostgreSQL URL must say off this machine (TLS verified).

use super::StoreError;
use std::path::Path;

/// Whether a `database` setting is a PostgreSQL URL (rather than an SQLite file's path).
pub fn is_database_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// `database` as it may be shown: a URL without its password (in the userinfo or a `password`
/// parameter); a URL that does not parse is not shown at all. A multi-host URL is shown as its
/// hosts' URLs, each redacted.
pub fn redacted(database: &str) -> String {
    if !is_database_url(database) {
        return database.to_string();
    }
    // A `#` in a password would make the URL parser show its start as a port or host.
    if database.contains('#') {
        return "<a postgres:// URL with an unencoded #>".into();
    }
    if let Ok(t) = targets(database)
        && t.urls.len() > 1
    {
        return t
            .urls
            .iter()
            .map(|u| redacted(u))
            .collect::<Vec<_>>()
            .join(" | ");
    }
    let Ok(mut u) = url::Url::parse(database) else {
        return "<a postgres:// URL that does not parse>".into();
    };
    // Whatever follows a `#` may be a password the URL parser did not see as one.
    u.set_fragment(None);
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    let pairs: Vec<(String, String)> = u
        .query_pairs()
        .map(|(k, v)| {
            let v = if k.eq_ignore_ascii_case("password") {
                "***".to_string()
            } else {
                v.into_owned()
            };
            (k.into_owned(), v)
        })
        .collect();
    if !pairs.is_empty() {
        u.query_pairs_mut().clear().extend_pairs(pairs);
    }
    u.to_string()
}

/// Refuses a PostgreSQL URL whose traffic could be read or forged on the way: a host other than
/// loopback or a Unix socket needs `sslmode=verify-full` (TLS, the server's certificate and name
/// checked). The broker relies on the database's answers for "released at most once".
pub(super) fn check_postgres_url(database: &str) -> Result<(), StoreError> {
    use sqlx::postgres::{PgConnectOptions, PgSslMode};
    // Judged on what sqlx will connect with (its reading of the URL, repeated and alias
    // parameters, `hostaddr`, and the PG* environment), not on a reading of our own.
    let o: PgConnectOptions = database
        .parse()
        .map_err(|e: sqlx::Error| StoreError::Db(format!("the database URL: {e}")))?;
    let host = o.get_host();
    // A host that is a folder is a Unix socket (sqlx reads it so, from PGHOST too).
    let local = o.get_socket().is_some()
        || host.starts_with('/')
        || host == "localhost"
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback());
    if local || matches!(o.get_ssl_mode(), PgSslMode::VerifyFull) {
        return Ok(());
    }
    Err(StoreError::Db(
        "a database that is not on this machine must be reached with sslmode=verify-full (TLS, its certificate and name checked)".into(),
    ))
}

/// What a PostgreSQL URL asks for: the servers to try, in order, each as a one-host URL, and
/// whether only a server that takes writes will do.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Targets {
    pub urls: Vec<String>,
    /// `target_session_attrs=read-write` (or `primary`): a standby is passed over.
    pub read_write: bool,
}

/// Hosts a URL may list, at most.
const MAX_HOSTS: usize = 16;

/// Splits a libpq multi-host URL — `postgres://u@h1:5432,h2:5433/db?…` or
/// `postgres://u@/db?host=/run/a,/run/b&port=5432,5433` — into one URL per host, the other
/// parameters kept, `target_session_attrs` taken out (sqlx does not know it; the store acts on
/// it). A one-host URL gives itself.
pub(super) fn targets(database: &str) -> Result<Targets, StoreError> {
    let bad = |why: &str| StoreError::Db(format!("the database URL: {why}"));
    let (scheme, rest) = database
        .split_once("://")
        .ok_or_else(|| bad("expected postgres://…"))?;
    // A `#` would start a fragment, hiding what follows from the URL's other readers.
    if rest.contains('#') {
        return Err(bad("percent-encode `#` (as %23)"));
    }
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    // A password with `/`, `?` or `@` unencoded would land here: refuse rather than misread it.
    if tail.contains('@') {
        return Err(bad(
            "percent-encode `@`, `/` and `?` in the user name and password",
        ));
    }
    let (userinfo, hostlist) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (path, query) = tail.split_once('?').unwrap_or((tail, ""));
    let mut params: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
        .into_owned()
        .collect();
    // One reading only: a parameter given twice is refused rather than guessed at.
    for (n, (k, _)) in params.iter().enumerate() {
        if params[..n].iter().any(|(seen, _)| seen == k) {
            return Err(bad(&format!("the parameter {k} is given twice")));
        }
    }
    let attrs = take(&mut params, "target_session_attrs");
    let read_write = match attrs.as_deref() {
        None | Some("any") => false,
        Some("read-write" | "primary") => true,
        Some(other) => {
            return Err(bad(&format!(
                "target_session_attrs={other}: the broker writes; give read-write (or primary), or any"
            )));
        }
    };
    let rebuild = |host: &str, params: &[(String, String)]| {
        let mut url = format!("{scheme}://");
        if let Some(u) = userinfo {
            url.push_str(u);
            url.push('@');
        }
        url.push_str(host);
        url.push_str(path);
        if !params.is_empty() {
            url.push('?');
            url.push_str(
                &url::form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(params)
                    .finish(),
            );
        }
        url
    };
    let in_authority: Vec<&str> = hostlist.split(',').collect();
    let host_param = params.iter().position(|(k, _)| k == "host");
    let listed = host_param.is_some_and(|i| params[i].1.contains(','));
    let urls: Vec<String> = match (in_authority.len() > 1, listed) {
        (true, true) => return Err(bad("list the hosts in the authority or in host=, not both")),
        (true, false) => {
            if in_authority.iter().any(|h| h.is_empty()) {
                return Err(bad("an empty host in the host list"));
            }
            in_authority.iter().map(|h| rebuild(h, &params)).collect()
        }
        (false, true) => {
            let hosts: Vec<String> = take(&mut params, "host")
                .unwrap_or_default()
                .split(',')
                .map(str::to_string)
                .collect();
            let ports: Vec<String> = take(&mut params, "port")
                .map(|p| p.split(',').map(str::to_string).collect())
                .unwrap_or_default();
            if hosts.iter().any(String::is_empty) {
                return Err(bad("an empty host in host="));
            }
            if ports.len() > 1 && ports.len() != hosts.len() {
                return Err(bad("port= must give one port, or one per host"));
            }
            hosts
                .iter()
                .enumerate()
                .map(|(n, h)| {
                    let mut p = params.clone();
                    p.push(("host".into(), h.clone()));
                    if let Some(port) = ports.get(n).or(ports.first()) {
                        p.push(("port".into(), port.clone()));
                    }
                    rebuild(hostlist, &p)
                })
                .collect()
        }
        (false, false) => vec![rebuild(hostlist, &params)],
    };
    if urls.len() > MAX_HOSTS {
        return Err(bad(&format!("at most {MAX_HOSTS} hosts")));
    }
    Ok(Targets { urls, read_write })
}

/// Removes parameter `name` (every occurrence); its last value.
fn take(params: &mut Vec<(String, String)>, name: &str) -> Option<String> {
    let last = params
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone());
    params.retain(|(k, _)| k != name);
    last
}

/// A `sqlite:` URL for `path`, made absolute first (a relative one would be read as a host);
/// every byte outside the unreserved set and `/` percent-encoded, as sqlx decodes them.
pub(super) fn sqlite_url(path: &Path) -> Result<String, StoreError> {
    let abs = std::path::absolute(path)
        .map_err(|e| StoreError::Db(format!("{}: {e}", path.display())))?;
    let text = abs
        .to_str()
        .ok_or_else(|| StoreError::Db(format!("{}: the path is not UTF-8", abs.display())))?;
    if abs
        .components()
        .any(|c| c == std::path::Component::ParentDir)
    {
        return Err(StoreError::Db(format!(
            "{text}: give the path without `..`"
        )));
    }
    let mut p = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            p.push(char::from(b));
        } else {
            p.push_str(&format!("%{b:02X}"));
        }
    }
    Ok(format!("sqlite://{p}?mode=rwc"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_never_shown() {
        for (url, want) in [
            (
                "postgres://kbs:s3cret@db.example/kbs?sslmode=verify-full",
                "postgres://kbs:***@db.example/kbs?sslmode=verify-full",
            ),
            (
                "postgres://kbs@db.example/kbs?password=s3cret",
                "postgres://kbs@db.example/kbs?password=***",
            ),
            (
                "postgres://kbs:a/b@host/db",
                "<a postgres:// URL that does not parse>",
            ),
            ("/var/lib/attesta/kbs.db", "/var/lib/attesta/kbs.db"),
            (
                "postgres://kbs@db/kbs#s3cret",
                "<a postgres:// URL with an unencoded #>",
            ),
            (
                "postgres://kbs:2024#s3cret@db/kbs",
                "<a postgres:// URL with an unencoded #>",
            ),
        ] {
            let shown = redacted(url);
            assert_eq!(shown, want);
            assert!(!shown.contains("s3cret"));
        }
    }

    #[test]
    fn remote_databases_need_verified_tls() {
        for ok in [
            "postgres://kbs@127.0.0.1:5432/kbs",
            "postgres://kbs@localhost/kbs",
            "postgres://kbs@[::1]/kbs",
            "postgres://kbs@localhost/kbs?host=/run/postgresql",
            "postgres:///kbs?host=/run/postgresql",
            "postgres://kbs@db.example/kbs?sslmode=verify-full",
        ] {
            assert!(check_postgres_url(ok).is_ok(), "{ok}");
        }
        for bad in [
            "postgres://kbs@db.example/kbs",
            "postgres://kbs@db.example/kbs?sslmode=require",
            "postgres://kbs@10.0.0.5/kbs?sslmode=prefer",
            "postgres://kbs@127.0.0.1/kbs?host=db.example",
            // What sqlx reads, not what a first glance sees: the last of a repeated parameter,
            // hostaddr, the ssl-mode alias.
            "postgres://kbs@localhost/kbs?hostaddr=203.0.113.5",
            "postgres://kbs@db.example/kbs?sslmode=verify-full&sslmode=disable",
            "postgres://kbs@db.example/kbs?sslmode=verify-full&ssl-mode=disable",
        ] {
            assert!(check_postgres_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn multi_host_urls_become_one_url_per_host() {
        let t = targets(
            "postgres://kbs:pw@db1:5432,db2:5433/kbs?sslmode=verify-full&target_session_attrs=read-write",
        )
        .unwrap();
        assert!(t.read_write);
        assert_eq!(
            t.urls,
            [
                "postgres://kbs:pw@db1:5432/kbs?sslmode=verify-full",
                "postgres://kbs:pw@db2:5433/kbs?sslmode=verify-full"
            ]
        );
        let t = targets("postgres://kbs@localhost/kbs?host=/run/a,/run/b&port=5432").unwrap();
        assert!(!t.read_write, "any, by default");
        assert_eq!(
            t.urls,
            [
                "postgres://kbs@localhost/kbs?host=%2Frun%2Fa&port=5432",
                "postgres://kbs@localhost/kbs?host=%2Frun%2Fb&port=5432"
            ]
        );
        let t =
            targets("postgresql:///kbs?host=a,b&port=1,2&target_session_attrs=primary").unwrap();
        assert!(t.read_write);
        assert_eq!(
            t.urls,
            [
                "postgresql:///kbs?host=a&port=1",
                "postgresql:///kbs?host=b&port=2"
            ]
        );
        let one = "postgres://kbs@localhost/kbs?host=%2Frun%2Fa";
        assert_eq!(targets(one).unwrap().urls, [one]);
        for (bad, why) in [
            ("postgres://kbs@a,b/kbs?host=c,d", "not both"),
            ("postgres://kbs@a,,b/kbs", "empty host"),
            ("postgres:///kbs?host=a,b&port=1,2,3", "one per host"),
            (
                "postgres://a,b/kbs?target_session_attrs=standby",
                "read-write",
            ),
            ("postgres://kbs:x/y@a,b/kbs", "percent-encode"),
            ("postgres://kbs:p#w@a,b/kbs", "%23"),
            ("postgres://a,b/kbs?host=c&host=d", "given twice"),
        ] {
            let e = targets(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let many: Vec<String> = (0..17).map(|n| format!("h{n}")).collect();
        assert!(targets(&format!("postgres://{}/kbs", many.join(","))).is_err());
        // Shown host by host, without the password; the first one alone would hide the others.
        let shown = redacted("postgres://kbs:s3cret@db1,db2/kbs?target_session_attrs=read-write");
        assert_eq!(
            shown,
            "postgres://kbs:***@db1/kbs | postgres://kbs:***@db2/kbs"
        );
    }

    #[test]
    fn sqlite_paths_become_absolute_encoded_urls() {
        let u = sqlite_url(Path::new("/srv/a b/k#1?.db")).unwrap();
        assert_eq!(u, "sqlite:///srv/a%20b/k%231%3F.db?mode=rwc");
        assert!(sqlite_url(Path::new("/srv/../etc/kbs.db")).is_err());
        let rel = sqlite_url(Path::new("kbs.db")).unwrap();
        assert!(rel.starts_with("sqlite:///") && rel.ends_with("/kbs.db?mode=rwc"));
    }
}
