//! The `database` setting: an SQLite file's path or a PostgreSQL URL — which it is, how it may be
//! shown (no password), and what a PostgreSQL URL must say off this machine (TLS verified).

use super::StoreError;
use std::path::Path;

/// Whether a `database` setting is a PostgreSQL URL (rather than an SQLite file's path).
pub fn is_database_url(s: &str) -> bool {
    s.starts_with("postgres://") || s.starts_with("postgresql://")
}

/// `database` as it may be shown: a URL without its password (in the userinfo or a `password`
/// parameter); a URL that does not parse is not shown at all.
pub fn redacted(database: &str) -> String {
    if !is_database_url(database) {
        return database.to_string();
    }
    let Ok(mut u) = url::Url::parse(database) else {
        return "<a postgres:// URL that does not parse>".into();
    };
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
    let u = url::Url::parse(database)
        .map_err(|e| StoreError::Db(format!("the database URL does not parse: {e}")))?;
    let param = |name: &str| {
        u.query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    };
    let local = match (param("host"), u.host()) {
        (Some(h), _) => h.starts_with('/'),
        (None, None) => true,
        // A postgres:// URL's host is opaque to the URL parser: an IPv4 address arrives as text.
        (None, Some(url::Host::Domain(d))) => {
            d == "localhost" || d.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback())
        }
        (None, Some(url::Host::Ipv4(a))) => a.is_loopback(),
        (None, Some(url::Host::Ipv6(a))) => a.is_loopback(),
    };
    if local || param("sslmode").as_deref() == Some("verify-full") {
        return Ok(());
    }
    Err(StoreError::Db(
        "a database that is not on this machine must be reached with sslmode=verify-full (TLS, its certificate and name checked)".into(),
    ))
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
        ] {
            assert!(check_postgres_url(bad).is_err(), "{bad}");
        }
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
