//! Clients that know several brokers (replicas on one database): how a list of them is given
//! and checked, and how long one try may take before the next broker is asked. Shared by the
//! guest agent, the host agent and the operator tools so that all behave alike.

use std::fmt::Display;
use std::time::Duration;

/// Brokers a client may list, at most: each unreachable one costs a [`HANDSHAKE_PER_TRY`].
pub const MAX_BROKERS: usize = 8;

/// With other brokers to try, how long a handshake may take before the next is asked.
pub const HANDSHAKE_PER_TRY: Duration = Duration::from_secs(10);

/// The brokers a `section` of a configuration names: `address` (one) or `addresses` (a list),
/// exactly one of them; 1 to [`MAX_BROKERS`] entries, none twice; in the order given.
pub fn broker_list<T: Clone + PartialEq + Display>(
    section: &str,
    address: Option<&T>,
    addresses: &[T],
) -> Result<Vec<T>, String> {
    let list = match (address, addresses) {
        (Some(a), []) => vec![a.clone()],
        (None, []) => return Err(format!("{section}: give `address` or `addresses`")),
        (None, l) => l.to_vec(),
        (Some(_), _) => {
            return Err(format!(
                "{section}: give `address` or `addresses`, not both"
            ));
        }
    };
    if list.len() > MAX_BROKERS {
        return Err(format!(
            "{section}.addresses: at most {MAX_BROKERS} brokers, {} given",
            list.len()
        ));
    }
    for (n, a) in list.iter().enumerate() {
        if list[..n].contains(a) {
            return Err(format!("{section}.addresses: {a} is listed twice"));
        }
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_or_a_list_never_both_never_twice_never_too_many() {
        let s = |v: &str| v.to_string();
        assert_eq!(broker_list("kbs", Some(&s("a")), &[]), Ok(vec![s("a")]));
        assert_eq!(
            broker_list("kbs", None, &[s("b"), s("a")]),
            Ok(vec![s("b"), s("a")])
        );
        let e = |r: Result<Vec<String>, String>| r.unwrap_err();
        assert!(e(broker_list::<String>("kbs", None, &[])).contains("give `address`"));
        assert!(e(broker_list("kbs", Some(&s("a")), &[s("b")])).contains("not both"));
        assert!(e(broker_list("kbs", None, &[s("a"), s("a")])).contains("listed twice"));
        let nine: Vec<String> = (0..9).map(|n| n.to_string()).collect();
        assert!(e(broker_list("kbs", None, &nine)).contains("at most 8"));
    }
}
