//! Every scenario in the attack catalogue is denied, for the reason it names; and the genuine
//! control case is accepted, so the denials are due to the attacks.

use simulator::Seed;
use simulator::attacks::{Lab, catalogue};

#[test]
fn the_catalogue_is_denied_for_the_right_reasons() {
    let lab = Lab::from_seed(&Seed::from_text("attack-catalogue")).expect("lab");
    assert_eq!(
        lab.control(),
        vec![],
        "the genuine control case must be accepted"
    );
    let outcomes = lab.run_all();
    assert!(outcomes.len() >= 30, "only {} scenarios", outcomes.len());
    let mut names: Vec<_> = outcomes.iter().map(|o| o.name).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), outcomes.len(), "scenario names must be unique");
    let mut failures = Vec::new();
    for o in &outcomes {
        if !o.denied || !o.expected_reason {
            failures.push(format!(
                "{}: denied={} expected {} got {:?}",
                o.name, o.denied, o.expect, o.reasons
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Every scenario has a description for the README table.
    assert!(catalogue().iter().all(|s| !s.description.is_empty()));
}
