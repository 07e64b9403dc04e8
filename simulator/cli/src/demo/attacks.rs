//! The demo's live attacks on the protocol, on the mesh admission, and the whole attack
//! catalogue, each against a live broker over QUIC.

use super::*;

/// Attacks on the broker's mesh admission: a host certificate from a CA the mesh does not
/// trust, a guest's own (attested) mesh identity used to send an order, and the terminated
/// guest's revoked identity.
pub(crate) async fn mesh_attacks(
    broker: &Broker,
    mesh: &FleetMesh,
    identities: &[(usize, MeshKey, Vec<u8>)],
    operator: &Ed25519KeyPair,
) -> Result<Vec<LiveAttack>, String> {
    use kbs::client::{Remote, send_order};
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let doc = order("vm-mesh-attack", 0, &[7; 64], &IMAGE).sign(operator);
    let remote = |cert_pem: &[u8], key_pem: &[u8]| -> Result<Remote, String> {
        let id = mesh::transport::Identity::from_pem(cert_pem, key_pem)?;
        Ok(Remote {
            addr: broker.addr,
            server_name: broker.server_name.clone(),
            ca: broker.ca_der.clone().into(),
            client_chain: id.chain,
            client_key: id.key,
        })
    };
    let judged = |name: &'static str, expected: &'static str, r: Result<String, _>| {
        let (denied, reason) = match r {
            Ok(vm) => (false, format!("registered {vm}")),
            Err(x @ kbs::client::OrderError::Refused { .. })
            | Err(x @ kbs::client::OrderError::Transport(_)) => (true, x.to_string()),
        };
        LiveAttack {
            name,
            denied,
            reason,
            expected,
        }
    };
    let mut out = Vec::new();
    // Same CA name, another key: the broker's mesh verifier refuses it at the handshake.
    let now = now();
    let foreign = mesh::cert::LocalCa::root(&mesh.ca.cert.name, &[], now - 60, now + 3600)
        .map_err(|x| e(&x))?;
    let host = foreign
        .issue(
            "miner-x",
            &fleet_mesh::host_ip(99),
            &["infra"],
            mesh::cert::Role::Host,
            now.saturating_sub(60),
            now + 3600,
        )
        .map_err(|x| e(&x))?;
    out.push(judged(
        "mesh-host-certificate-from-a-foreign-ca",
        "no trusted CA issued it",
        send_order(
            remote(
                host.issued.cert_pem.as_bytes(),
                host.issued.key_pem.as_bytes(),
            )?,
            false,
            doc.clone(),
        )
        .await,
    ));
    // A guest's genuine mesh identity: admitted (attestation), but not to send orders.
    // A guest presents its certificate with the broker's intermediate, as its node does.
    let guest_pem =
        |cert: &[u8]| snp::certs::pem_encode("CERTIFICATE", cert) + &mesh.guest_ca_pem();
    if let Some((_, key, cert)) = identities.iter().find(|(i, _, _)| *i != 0) {
        let pem = guest_pem(cert);
        out.push(judged(
            "mesh-guest-identity-sends-an-order",
            "forbidden",
            send_order(
                remote(pem.as_bytes(), key.pem().as_bytes())?,
                false,
                doc.clone(),
            )
            .await,
        ));
    }
    // Terminated vm-0's identity, revoked: refused at the handshake.
    if let Some((_, key, cert)) = identities.iter().find(|(i, _, _)| *i == 0) {
        let pem = guest_pem(cert);
        out.push(judged(
            "mesh-revoked-guest-identity-at-the-broker",
            "is revoked",
            send_order(remote(pem.as_bytes(), key.pem().as_bytes())?, false, doc).await,
        ));
    }
    Ok(out)
}

/// A client that speaks the release protocol by hand, as an attacker would: it chooses what
/// to put in each message instead of following the guest agent's script.
pub(crate) struct HandClient<'a> {
    ep: quinn::Endpoint,
    broker: &'a Broker,
}

impl<'a> HandClient<'a> {
    fn new(broker: &'a Broker) -> Result<HandClient<'a>, String> {
        let ep = quinn::Endpoint::client((std::net::Ipv4Addr::LOCALHOST, 0).into())
            .map_err(|x| x.to_string())?;
        Ok(HandClient { ep, broker })
    }

    /// A fresh connection and its TLS exporter value.
    async fn connect(&self) -> Result<(quinn::Connection, [u8; 32]), String> {
        let e = |x: &dyn std::fmt::Display| x.to_string();
        let c = self
            .ep
            .connect_with(
                guest_agent::client::client_config(self.broker).map_err(|x| e(&x))?,
                self.broker.addr,
                &self.broker.server_name,
            )
            .map_err(|x| e(&x))?
            .await
            .map_err(|x| e(&x))?;
        let mut x = [0u8; 32];
        c.export_keying_material(&mut x, proto::msg::EXPORTER_LABEL, b"")
            .map_err(|_| "no exporter".to_string())?;
        Ok((c, x))
    }

    /// A challenge nonce for `vm` on `c`.
    async fn challenge(&self, c: &quinn::Connection, vm: &str) -> Result<[u8; 32], String> {
        use proto::msg::{Request, Response, VERSION};
        let r = guest_agent::client::exchange(
            c,
            &Request::Challenge {
                v: VERSION,
                vm_id: vm.into(),
            },
        )
        .await
        .map_err(|x| x.to_string())?;
        match r {
            Response::Challenge { nonce, .. } => nonce
                .try_into()
                .map_err(|_| "nonce of the wrong size".to_string()),
            _ => Err(format!("{vm}: no challenge")),
        }
    }

    /// What the broker's answer means: denied (and why) or released. A release or denial
    /// that is not signed by the pinned response key counts as a denial.
    fn judge(
        &self,
        name: &'static str,
        expected: &'static str,
        r: Result<proto::msg::Response, ClientError>,
    ) -> LiveAttack {
        use proto::msg::{Decision, Response, verify_decision};
        let (denied, reason) = match r {
            Ok(Response::Error { code, .. }) => (true, code),
            Ok(resp) => match verify_decision(&self.broker.response_key, &resp) {
                Ok(Decision::Denial(d)) => (true, d.reasons.join(", ")),
                Ok(Decision::Release(_)) => (false, "released".to_string()),
                Ok(Decision::Renewed(_)) => (false, "renewed".to_string()),
                Err(x) => (true, x.to_string()),
            },
            Err(x) => (true, x.to_string()),
        };
        LiveAttack {
            name,
            denied,
            reason,
            expected,
        }
    }
}

/// Evidence in the protocol's message: `report` and `cert_table` as given, for `vm`, under the
/// guest key `key`, naming the issued `nonce` (`None`: bound to its connection, as guests send it).
pub(crate) fn evidence_request(
    vm: &str,
    nonce: Option<&[u8; 32]>,
    key: &proto::GuestKey,
    report: Vec<u8>,
    cert_table: Vec<u8>,
) -> proto::msg::Request {
    proto::msg::Request::Evidence {
        v: proto::msg::VERSION,
        vm_id: vm.into(),
        nonce: nonce.map(|n| n.to_vec()).unwrap_or_default(),
        report,
        cert_table,
        guest_public_key: key.public().to_vec(),
        mesh_key: vec![],
    }
}

/// Where the fleet's own attacks aim.
pub(crate) struct Target<'a> {
    pub broker: &'a Broker,
    /// The broker's other replicas still serving.
    pub replicas: Vec<&'a Broker>,
    /// The VM attacked, and the chip it was placed on.
    pub vm: &'a str,
    pub home: &'a Chip,
    /// Another chip of the fleet's.
    pub away: &'a Chip,
    /// A hierarchy AMD's roots did not sign.
    pub rogue: &'a Arc<Pki>,
    pub image: [u8; 48],
}

/// The fleet's own attacks on its live broker, once vm-0 is terminated (`guest0` is vm-0's next
/// boot): a wrong image, a debug policy, a VM moved to another chip, an unknown VM, the
/// terminated VM (on every replica still serving), the protocol attacks, a non-AMD root and an
/// impostor response key.
pub(crate) async fn fleet_attacks(
    t: &Target<'_>,
    guest0: &impl snp::device::GuestDevice,
) -> Result<Vec<LiveAttack>, String> {
    let (broker, vm, home, away, rogue, image) = (t.broker, t.vm, t.home, t.away, t.rogue, t.image);
    let live = |name: &'static str, r: Result<guest_agent::client::Released, ClientError>| {
        let (denied, reason) = match r {
            Err(ClientError::Denied(reasons)) => (true, reasons.join(", ")),
            Err(other) => (true, other.to_string()),
            Ok(_) => (false, "released".into()),
        };
        let expected = match name {
            "live-wrong-image" => "measurement_not_allowed",
            "live-debug-policy" => "policy_flag_forbidden",
            "live-moved-to-another-chip" => "chip_not_allowed",
            "live-unknown-vm" => "unknown_vm",
            "live-terminated-vm" | "live-terminated-vm-on-another-replica" => "vm_terminated",
            "live-non-amd-root" => "ark_not_trusted",
            _ => "not signed by the pinned key",
        };
        LiveAttack {
            name,
            denied,
            reason,
            expected,
        }
    };
    let mut attacks = vec![
        live(
            "live-wrong-image",
            fetch(
                broker,
                vm,
                &home.launch(GuestLaunch {
                    measurement: [1; 48],
                    ..Default::default()
                }),
            )
            .await,
        ),
        live(
            "live-debug-policy",
            fetch(
                broker,
                vm,
                &home.launch(GuestLaunch {
                    measurement: image,
                    policy: 0x3_001f | (1 << 19),
                    ..Default::default()
                }),
            )
            .await,
        ),
        live(
            "live-moved-to-another-chip",
            fetch(
                broker,
                vm,
                &away.launch(GuestLaunch {
                    measurement: image,
                    ..Default::default()
                }),
            )
            .await,
        ),
        live(
            "live-unknown-vm",
            fetch(
                broker,
                "vm-nobody",
                &home.launch(GuestLaunch {
                    measurement: image,
                    ..Default::default()
                }),
            )
            .await,
        ),
        live("live-terminated-vm", fetch(broker, "vm-0", guest0).await),
    ];
    // Every other replica still serving knows it too.
    for b in &t.replicas {
        attacks.push(live(
            "live-terminated-vm-on-another-replica",
            fetch(b, "vm-0", guest0).await,
        ));
    }
    attacks.extend(
        protocol_attacks(
            broker,
            vm,
            &home.launch(GuestLaunch {
                measurement: image,
                ..Default::default()
            }),
        )
        .await?,
    );
    let rogue_chip = Chip::new(rogue.clone(), home.config.clone()).map_err(|x| x.to_string())?;
    attacks.push(live(
        "live-non-amd-root",
        fetch(
            broker,
            vm,
            &rogue_chip.launch(GuestLaunch {
                measurement: image,
                ..Default::default()
            }),
        )
        .await,
    ));
    let wrong_pin = Broker {
        response_key: [9; 32],
        ..(*broker).clone()
    };
    attacks.push(live(
        "live-impostor-broker-key",
        fetch(
            &wrong_pin,
            vm,
            &home.launch(GuestLaunch {
                measurement: image,
                ..Default::default()
            }),
        )
        .await,
    ));

    Ok(attacks)
}

/// Attacks on the protocol itself, by a client that speaks it by hand with a genuine guest's
/// device. Evidence bound to its connection (as guests send it): replayed on another connection
/// (a host that kept the bytes, or relayed them to another replica), sent twice on its own,
/// naming its connection's nonce as if issued. Evidence on an issued nonce (the optional flow):
/// replayed on another connection, a spent nonce used again, a nonce issued for one VM used for
/// another. And a mesh key the report does not bind, and an order sent by a guest.
pub(crate) async fn protocol_attacks(
    broker: &Broker,
    vm: &str,
    guest: &impl snp::device::GuestDevice,
) -> Result<Vec<LiveAttack>, String> {
    use guest_agent::client::exchange;
    use proto::msg::{Request, VERSION};
    let hand = HandClient::new(broker)?;
    // Evidence binding `nonce` and the connection whose exporter is `exporter`; `named` is the
    // nonce the request names (`None`: bound to its connection).
    let evidence = |vm: &str, nonce: &[u8; 32], exporter: &[u8; 32], named: Option<&[u8; 32]>| {
        let key = proto::GuestKey::generate().map_err(|e| e.to_string())?;
        let (report, cert_table) = guest
            .get_ext_report(&proto::report_data(nonce, &key.public(), exporter), 0)
            .map_err(|x| x.to_string())?;
        Ok::<_, String>(evidence_request(vm, named, &key, report, cert_table))
    };
    let bound = |vm: &str, exporter: &[u8; 32]| {
        evidence(vm, &proto::connection_nonce(exporter), exporter, None)
    };
    let mut out = Vec::new();
    // Bound evidence captured on one connection, replayed on another.
    let (a, xa) = hand.connect().await?;
    let captured = bound(vm, &xa)?;
    a.close(0u32.into(), b"");
    let (b, _) = hand.connect().await?;
    out.push(hand.judge(
        "live-bound-evidence-replayed-on-another-connection",
        "report_data_mismatch",
        exchange(&b, &captured).await,
    ));
    // Bound evidence twice on its own connection: the first releases, the second is refused.
    let (c, xc) = hand.connect().await?;
    let ev = bound(vm, &xc)?;
    let _first = exchange(&c, &ev).await;
    out.push(hand.judge(
        "live-bound-evidence-sent-twice",
        "too_many_evidence",
        exchange(&c, &ev).await,
    ));
    // The connection's nonce named as if the broker had issued it.
    let (g, xg) = hand.connect().await?;
    let ng = proto::connection_nonce(&xg);
    out.push(hand.judge(
        "live-connection-nonce-named-as-issued",
        "unknown_nonce",
        exchange(&g, &evidence(vm, &ng, &xg, Some(&ng))?).await,
    ));
    // The issued-nonce flow: a report captured on one connection, replayed on another.
    let (a, xa) = hand.connect().await?;
    let na = hand.challenge(&a, vm).await?;
    let captured = evidence(vm, &na, &xa, Some(&na))?;
    a.close(0u32.into(), b"");
    let (b, _) = hand.connect().await?;
    out.push(hand.judge(
        "live-evidence-replayed-on-another-connection",
        "report_data_mismatch",
        exchange(&b, &captured).await,
    ));
    // The same evidence twice on its own connection: the first releases, the second must not.
    let (c, xc) = hand.connect().await?;
    let nc = hand.challenge(&c, vm).await?;
    let ev = evidence(vm, &nc, &xc, Some(&nc))?;
    let _first = exchange(&c, &ev).await;
    out.push(hand.judge(
        "live-nonce-used-twice",
        "spent_nonce",
        exchange(&c, &ev).await,
    ));
    // A nonce issued for another VM.
    let (d, xd) = hand.connect().await?;
    let nd = hand.challenge(&d, "vm-somebody-else").await?;
    out.push(hand.judge(
        "live-nonce-for-another-vm",
        "nonce_for_another_vm",
        exchange(&d, &evidence(vm, &nd, &xd, Some(&nd))?).await,
    ));
    // A genuine report that binds no mesh key, sent with somebody's key to certify (a miner
    // trying to get its own key into the tenant's mesh on the guest's evidence).
    let (f, xf) = hand.connect().await?;
    let mut smuggled = bound(vm, &xf)?;
    if let Request::Evidence { mesh_key, .. } = &mut smuggled {
        *mesh_key = vec![0x6d; 32];
    }
    out.push(hand.judge(
        "live-mesh-key-not-bound-in-the-report",
        "report_data_mismatch",
        exchange(&f, &smuggled).await,
    ));
    // A guest (no client certificate) sending an order.
    out.push(
        hand.judge(
            "live-order-from-a-guest",
            "forbidden",
            exchange(
                &d,
                &Request::Register {
                    v: VERSION,
                    order: b"anything".to_vec(),
                },
            )
            .await,
        ),
    );
    Ok(out)
}

/// A register order for `vm` carrying `policy`: its measurements and chips as the order's, the
/// rest as the order's policy document.
pub(crate) fn order_with_policy(vm: &str, policy: &snp::Policy, now: u64) -> Order {
    let mut rest = policy.clone();
    let measurements = rest.measurements.take().unwrap_or_default();
    let chips = rest.chip_ids.take().unwrap_or_default();
    Order {
        v: ORDER_VERSION,
        kind: OrderKind::Register,
        vm_id: vm.into(),
        tenant: "tenant-catalogue".into(),
        measurements: measurements
            .iter()
            .map(|m| ByteBuf::from(m.0.to_vec()))
            .collect(),
        policy: rest.to_toml(),
        chip_ids: chips.iter().map(|c| ByteBuf::from(c.0.to_vec())).collect(),
        not_after: now + 3600,
        boot_config: ByteBuf::new(),
        billing: None,
        mesh_ip: None,
        split: None,
    }
}

/// One catalogue session: registers `vm` with the policy `build` gives, then sends what `build`
/// makes of the session's REPORT_DATA on a fresh connection.
pub(crate) async fn session(
    st: &Stack,
    hand: &HandClient<'_>,
    vm: &str,
    build: impl Fn([u8; 64]) -> simulator::attacks::LiveCase,
) -> Result<Result<proto::msg::Response, ClientError>, String> {
    use simulator::attacks::NOW;
    let order = order_with_policy(vm, &build([0; 64]).policy, NOW).sign(&st.operator);
    st.kbs
        .register(&order, NOW)
        .await
        .map_err(|x| format!("{vm}: {x}"))?;
    // Bound to the connection, as guests send it.
    let (c, x) = hand.connect().await?;
    let nonce = proto::connection_nonce(&x);
    let key = proto::GuestKey::generate().map_err(|e| e.to_string())?;
    let live = build(proto::report_data(&nonce, &key.public(), &x));
    let r = guest_agent::client::exchange(
        &c,
        &evidence_request(vm, None, &key, live.report, live.cert_table),
    )
    .await;
    c.close(0u32.into(), b"");
    Ok(r)
}

/// The whole attack catalogue against live brokers. Each scenario's evidence is bound to a real
/// session (a fresh guest key and this connection's TLS exporter, as guests send it) and sent
/// over QUIC by a hand-driven client, for a VM registered with the scenario's policy, to a
/// broker configured as the scenario needs (trust roots, revocation rule, CRLs held: one
/// broker per distinct setting). The brokers run at the catalogue's instant, so its
/// certificates and CRLs mean what they say. A genuine report must be released first by the
/// broker most scenarios use, or the denials would prove nothing.
pub async fn catalogue_live(
    dir: &Path,
    lab: &simulator::attacks::Lab,
) -> Result<Vec<LiveAttack>, String> {
    use simulator::attacks::{GOOD_MEASUREMENT, NOW, Scenario, catalogue};
    let e = |x: &dyn std::fmt::Display| x.to_string();
    let scenarios = catalogue();
    type Setting = (Revocation, Vec<Vec<u8>>);
    let mut groups: Vec<(Setting, Vec<&Scenario>)> = Vec::new();
    for s in &scenarios {
        let c = s.live(lab, [0; 64]);
        let key = (c.revocation, c.crls);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(s),
            None => groups.push((key, vec![s])),
        }
    }
    let mut out = Vec::new();
    let mut controlled = false;
    for (n, ((revocation, crls), members)) in groups.iter().enumerate() {
        let d = dir.join(format!("catalogue-{n}"));
        std::fs::create_dir_all(&d).map_err(|x| e(&x))?;
        let st = stack_with(
            &d,
            StackOptions {
                trust_roots: lab.trust_roots(),
                revocation: *revocation,
                crls: crls.clone(),
                image: GOOD_MEASUREMENT,
                clock: || NOW,
                max_sessions: kbs::service::DEFAULT_MAX_SESSIONS,
                max_sessions_per_address: usize::MAX,
                store: None,
                audit_key: None,
                lease_min_interval: 60,
            },
        )
        .await?;
        let hand = HandClient::new(&st.broker)?;
        if *revocation == Revocation::IfAvailable && crls.is_empty() {
            let r = session(&st, &hand, "catalogue-control", |rd| lab.control_live(rd)).await?;
            let control = hand.judge("catalogue-control", "", r);
            if control.denied {
                return Err(format!(
                    "attack catalogue: the broker denied a genuine report ({}), so its denials prove nothing",
                    control.reason
                ));
            }
            controlled = true;
        }
        for s in members {
            let r = session(&st, &hand, s.name, |rd| s.live(lab, rd)).await?;
            out.push(hand.judge(s.name, s.expected_live(), r));
        }
    }
    if !controlled {
        return Err("attack catalogue: no control case was run".into());
    }
    Ok(out)
}
