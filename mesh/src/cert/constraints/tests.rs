use super::{Pattern, check_name_pattern, covers, matches, pattern};
use crate::cert::{
    CertError, Claims, Curve, LocalCa, MeshCert, Request, Role, issuer_of, new_key, params,
    parse_bundle, sign, verify,
};

const NOW: u64 = 1_800_000_000;
const BROKER: &str = "kbs.attesta.local";

fn root() -> LocalCa {
    LocalCa::root("root", &[], NOW - 86_400, NOW + 86_400).unwrap()
}

fn ca_req<'a>(name: &'a str, parent: &MeshCert, roles: &[Role], names: &[&str]) -> Request<'a> {
    Request {
        name,
        claims: Claims {
            v: 1,
            role: Some(Role::Ca),
            roles: roles.to_vec(),
            names: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        },
        is_ca: true,
        not_before: parent.not_before,
        not_after: parent.not_after,
        curve: Curve::Ed25519,
    }
}

fn node_req(name: &str, role: Option<Role>) -> Request<'_> {
    Request {
        name,
        claims: Claims {
            v: 1,
            ips: vec!["10.42.7.1/16".into()],
            role,
            ..Default::default()
        },
        is_ca: false,
        not_before: NOW - 60,
        not_after: NOW + 3600,
        curve: Curve::Ed25519,
    }
}

fn local(pem: String, key: zeroize::Zeroizing<String>) -> LocalCa {
    LocalCa {
        cert: parse_bundle(pem.as_bytes()).unwrap().remove(0),
        pem,
        key,
    }
}

/// An intermediate CA signed with [`sign`] (the signer's checks apply).
fn sub_ca(
    parent: &LocalCa,
    name: &str,
    roles: &[Role],
    names: &[&str],
) -> Result<LocalCa, CertError> {
    let i = sign(
        &parent.cert,
        &parent.key,
        &ca_req(name, &parent.cert, roles, names),
    )?;
    Ok(local(i.cert_pem, i.key_pem))
}

/// The broker's guest CA as it should be: guests only, VM ids (single labels) only.
fn guest_ca(root: &LocalCa) -> LocalCa {
    sub_ca(root, "guest-ca", &[Role::Guest], &["*"]).unwrap()
}

/// Signed with `parent`'s key but without [`sign`]'s checks: what a careless or compromised
/// signer could produce. Verification must still refuse what lies outside `parent`.
fn forge(parent: &LocalCa, req: &Request<'_>) -> Result<LocalCa, CertError> {
    let issuer = issuer_of(&parent.cert, &parent.key)?;
    let key = new_key(Curve::Ed25519)?;
    let cert = params(req)?
        .signed_by(&key, &issuer)
        .map_err(|e| CertError::Issue(e.to_string()))?;
    Ok(LocalCa {
        cert: MeshCert::parse(cert.der())?,
        pem: cert.pem(),
        key: zeroize::Zeroizing::new(key.serialize_pem()),
    })
}

fn signed(ca: &LocalCa, name: &str, role: Option<Role>) -> Result<MeshCert, CertError> {
    let i = sign(&ca.cert, &ca.key, &node_req(name, role))?;
    Ok(parse_bundle(i.cert_pem.as_bytes())?.remove(0))
}

#[test]
fn a_guest_ca_signs_guests_with_plain_names_only() {
    let root = root();
    let g = guest_ca(&root);
    let roots = [root.cert.clone()];
    let vm = signed(&g, "vm-1", Some(Role::Guest)).unwrap();
    assert_eq!(
        verify(&[vm, g.cert.clone()], &roots, NOW).unwrap().name,
        "vm-1"
    );
    for role in [
        Some(Role::Kbs),
        Some(Role::Host),
        Some(Role::Lighthouse),
        None,
    ] {
        assert!(
            matches!(signed(&g, "vm-1", role), Err(CertError::RoleOutside { .. })),
            "{role:?}"
        );
    }
    for name in [BROKER, "vm-1.attesta.local", "a.b", "vm 1", "vm-1."] {
        assert!(
            matches!(
                signed(&g, name, Some(Role::Guest)),
                Err(CertError::NameOutside { .. })
            ),
            "{name}"
        );
    }
}

#[test]
fn verification_refuses_roles_and_names_a_careless_signer_let_through() {
    let root = root();
    let g = guest_ca(&root);
    let roots = [root.cert.clone()];
    let check = |name: &str, role: Role| {
        let leaf = forge(&g, &node_req(name, Some(role))).unwrap().cert;
        verify(&[leaf, g.cert.clone()], &roots, NOW)
    };
    assert_eq!(check("vm-2", Role::Guest).unwrap().name, "vm-2");
    assert!(matches!(
        check("vm-2", Role::Kbs),
        Err(CertError::RoleOutside { .. })
    ));
    assert!(matches!(
        check(BROKER, Role::Guest),
        Err(CertError::NameOutside { .. })
    ));
    assert!(matches!(
        check(BROKER, Role::Kbs),
        Err(CertError::RoleOutside { .. })
    ));
}

#[test]
fn a_child_ca_cannot_widen_or_drop_its_parents_roles_and_names() {
    let root = root();
    let g = guest_ca(&root);
    let roots = [root.cert.clone()];
    let g_ = Role::Guest;
    for (roles, names) in [(vec![g_, Role::Kbs], vec!["*"]), (vec![], vec!["*"])] {
        assert!(matches!(
            sub_ca(&g, "sub", &roles, &names),
            Err(CertError::RoleOutside { .. })
        ));
    }
    for names in [
        vec![],
        vec!["*.attesta.local"],
        vec![BROKER],
        vec!["*", "a.b"],
    ] {
        assert!(
            matches!(
                sub_ca(&g, "sub", &[g_], &names),
                Err(CertError::NameOutside { .. })
            ),
            "{names:?}"
        );
    }
    // Narrowing is fine: one exact label under `*`, and its children keep to it.
    let one = sub_ca(&g, "one", &[g_], &["vm-7"]).unwrap();
    assert!(matches!(
        signed(&one, "vm-8", Some(g_)),
        Err(CertError::NameOutside { .. })
    ));
    let vm7 = signed(&one, "vm-7", Some(g_)).unwrap();
    verify(&[vm7, one.cert.clone(), g.cert.clone()], &roots, NOW).unwrap();

    // Widened by hand: the widened CA's own children pass its signer, never verification.
    let wide_roles = forge(&g, &ca_req("wide-roles", &g.cert, &[g_, Role::Kbs], &["*"])).unwrap();
    let kbs = signed(&wide_roles, "vm-9", Some(Role::Kbs)).unwrap();
    assert!(matches!(
        verify(&[kbs, wide_roles.cert.clone(), g.cert.clone()], &roots, NOW),
        Err(CertError::RoleOutside { .. })
    ));
    let wide_names = forge(&g, &ca_req("wide-names", &g.cert, &[g_], &["*", BROKER])).unwrap();
    let broker = signed(&wide_names, BROKER, Some(g_)).unwrap();
    assert!(matches!(
        verify(
            &[broker, wide_names.cert.clone(), g.cert.clone()],
            &roots,
            NOW
        ),
        Err(CertError::NameOutside { .. })
    ));
}

#[test]
fn a_ca_certificate_is_never_a_node() {
    let root = root();
    let g = guest_ca(&root);
    let roots = [root.cert.clone()];
    // A CA's own name is not bound by its issuer's names: as a node it would be the broker.
    let posing = sub_ca(&g, BROKER, &[Role::Guest], &["*"]).unwrap();
    assert!(matches!(
        verify(&[posing.cert, g.cert.clone()], &roots, NOW),
        Err(CertError::CaAsLeaf(_))
    ));
    assert!(matches!(
        verify(&[g.cert], &roots, NOW),
        Err(CertError::CaAsLeaf(_))
    ));
}

#[test]
fn name_patterns() {
    let m = |p: &str, n: &str| matches(pattern(p).unwrap(), n);
    assert!(m("*", "vm-1") && m("*", "VM_1"));
    for n in ["", BROKER, "a.b", "vm-1.", ".vm", "vm 1", "vm:1"] {
        assert!(!m("*", n), "{n:?}");
    }
    assert!(m("*.attesta.local", BROKER));
    for n in [
        "attesta.local",
        ".attesta.local",
        "a.kbs.attesta.local",
        "kbsattesta.local",
    ] {
        assert!(!m("*.attesta.local", n), "{n:?}");
    }
    assert!(m(BROKER, BROKER) && !m(BROKER, "KBS.attesta.local") && !m(BROKER, "kbs"));

    let c = |p: &str, q: &str| covers(pattern(p).unwrap(), pattern(q).unwrap());
    assert!(c("*", "*") && c("*", "vm-1") && c("*.a.b", "x.a.b") && c("*.a.b", "*.a.b"));
    for (p, q) in [
        ("*", "*.a.b"),
        ("*", "a.b"),
        ("*.a.b", "*"),
        ("*.a.b", "*.b"),
        ("*.b", "*.a.b"),
        ("vm-1", "*"),
        ("x.a.b", "*.a.b"),
    ] {
        assert!(!c(p, q), "{p} covers {q}");
    }

    assert_eq!(pattern("*"), Ok(Pattern::Label));
    assert_eq!(pattern("*.a.b"), Ok(Pattern::Under("a.b")));
    for bad in [
        "",
        "*.",
        "**",
        "a*",
        "*.*.b",
        "*a",
        ".a",
        "a.",
        "a..b",
        &"a".repeat(254),
    ] {
        assert!(check_name_pattern(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn roles_and_names_are_a_cas_and_must_be_well_formed() {
    let root = root();
    let mut node = node_req("vm-1", Some(Role::Guest));
    node.claims.roles = vec![Role::Guest];
    assert!(matches!(
        forge(&root, &node),
        Err(CertError::BadClaims { .. })
    ));
    let mut node = node_req("vm-1", Some(Role::Guest));
    node.claims.names = vec!["*".into()];
    assert!(matches!(
        forge(&root, &node),
        Err(CertError::BadClaims { .. })
    ));
    let grants_ca = ca_req("sub", &root.cert, &[Role::Ca], &[]);
    assert!(matches!(
        forge(&root, &grants_ca),
        Err(CertError::BadClaims { .. })
    ));
    let bad_pattern = ca_req("sub", &root.cert, &[], &["a*"]);
    assert!(matches!(
        forge(&root, &bad_pattern),
        Err(CertError::BadClaims { .. })
    ));
    forge(&root, &ca_req("sub", &root.cert, &[Role::Guest], &["*"])).unwrap();
}

#[test]
fn alternative_names_repeat_the_claims() {
    let root = root();
    let issuer = issuer_of(&root.cert, &root.key).unwrap();
    let with = |extra: Option<rcgen::SanType>| {
        let mut p = params(&node_req("vm-1", Some(Role::Guest))).unwrap();
        p.subject_alt_names.extend(extra);
        let key = new_key(Curve::Ed25519).unwrap();
        MeshCert::parse(p.signed_by(&key, &issuer).unwrap().der())
    };
    // What `sign` writes (the name and the overlay address) parses.
    with(None).unwrap();
    let dns = rcgen::SanType::DnsName(rcgen::string::Ia5String::try_from(BROKER).unwrap());
    assert!(matches!(with(Some(dns)), Err(CertError::BadClaims { .. })));
    let ip = rcgen::SanType::IpAddress("10.9.9.9".parse().unwrap());
    assert!(matches!(with(Some(ip)), Err(CertError::BadClaims { .. })));
    let uri = rcgen::SanType::URI(rcgen::string::Ia5String::try_from("https://x").unwrap());
    assert!(matches!(with(Some(uri)), Err(CertError::BadClaims { .. })));
}

#[test]
fn certificates_from_before_roles_and_names_still_verify() {
    // Made by `attesta-mesh` before these claims existed: a root, an intermediate and a guest.
    let root = parse_bundle(include_bytes!("../testdata/old-root.crt")).unwrap();
    let chain = parse_bundle(include_bytes!("../testdata/old-node-chain.crt")).unwrap();
    assert!(root[0].claims.roles.is_empty() && root[0].claims.names.is_empty());
    assert_eq!(verify(&chain, &root, NOW).unwrap().name, "vm-old");
    // An unconstrained CA still encodes as before, so older verifiers (which refuse unknown
    // fields) accept it; a constrained one does not pass them silently unconstrained.
    let plain = serde_json::to_string(&ca_req("x", &root[0], &[], &[]).claims).unwrap();
    assert!(
        !plain.contains("roles") && !plain.contains("names"),
        "{plain}"
    );
    let scoped =
        serde_json::to_string(&ca_req("x", &root[0], &[Role::Guest], &["*"]).claims).unwrap();
    assert!(scoped.contains(r#""roles":["guest"]"#) && scoped.contains(r#""names":["*"]"#));
}

mod props {
    use super::*;
    use proptest::prelude::*;

    const NODE_ROLES: [Role; 5] = [
        Role::Kbs,
        Role::Lighthouse,
        Role::Host,
        Role::Guest,
        Role::Operator,
    ];
    const PATTERNS: [&str; 5] = ["*", "*.attesta.local", BROKER, "vm-1", "*.a.attesta.local"];
    const NAMES: [&str; 10] = [
        "vm-1",
        "vm-2",
        BROKER,
        "a.attesta.local",
        "b.a.attesta.local",
        "attesta.local",
        "x_y",
        "VM-1",
        "a.b.attesta.local",
        "kbs",
    ];

    fn plain(s: &str) -> bool {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    }

    /// What the issuer allows, written independently of the code under test.
    fn allowed(roles: &[Role], names: &[&str], role: Option<Role>, name: &str) -> bool {
        let role_ok = roles.is_empty() || role.is_some_and(|r| roles.contains(&r));
        let name_ok = names.is_empty()
            || names.iter().any(|p| match p.strip_prefix("*.") {
                _ if *p == "*" => plain(name),
                Some(suffix) => name
                    .split_once('.')
                    .is_some_and(|(h, t)| plain(h) && t == suffix),
                None => *p == name,
            });
        role_ok && name_ok
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            proptest::sample::select(NAMES.to_vec()).prop_map(String::from),
            "[a-z_.-]{1,12}",
        ]
    }

    fn scope() -> impl Strategy<Value = (Vec<Role>, Vec<&'static str>)> {
        (
            proptest::sample::subsequence(NODE_ROLES.to_vec(), 0..=3),
            proptest::sample::subsequence(PATTERNS.to_vec(), 0..=3),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// A node verifies under a CA exactly when its role and name are the CA's to grant,
        /// however it was signed.
        #[test]
        fn a_node_verifies_exactly_within_its_issuer(
            (roles, names) in scope(),
            role in proptest::option::of(proptest::sample::select(NODE_ROLES.to_vec())),
            n in name(),
        ) {
            let root = root();
            let ca = sub_ca(&root, "ca", &roles, &names).unwrap();
            let leaf = forge(&ca, &node_req(&n, role)).unwrap().cert;
            let ok = verify(&[leaf, ca.cert.clone()], std::slice::from_ref(&root.cert), NOW).is_ok();
            prop_assert_eq!(ok, allowed(&roles, &names, role, &n));
        }

        /// Under two CAs, the second signed by hand however it likes, a node that verifies is
        /// within both: no child CA widens its parent.
        #[test]
        fn no_child_ca_widens_its_parent(
            (roles_a, names_a) in scope(),
            (roles_b, names_b) in scope(),
            role in proptest::option::of(proptest::sample::select(NODE_ROLES.to_vec())),
            n in name(),
        ) {
            let root = root();
            let a = sub_ca(&root, "a", &roles_a, &names_a).unwrap();
            let b = forge(&a, &ca_req("b", &a.cert, &roles_b, &names_b)).unwrap();
            let leaf = forge(&b, &node_req(&n, role)).unwrap().cert;
            if verify(&[leaf, b.cert.clone(), a.cert.clone()], std::slice::from_ref(&root.cert), NOW).is_ok() {
                prop_assert!(allowed(&roles_a, &names_a, role, &n));
                prop_assert!(allowed(&roles_b, &names_b, role, &n));
            }
        }

        /// Matching and parsing patterns never panic, whatever the text.
        #[test]
        fn patterns_never_panic(p in "\\PC{0,40}", n in "\\PC{0,40}") {
            if let Ok(p) = pattern(&p) {
                let _ = matches(p, &n);
                if let Ok(q) = pattern(&n) {
                    let _ = covers(p, q);
                }
            }
        }
    }
}
