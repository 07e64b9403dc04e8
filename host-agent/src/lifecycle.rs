//! The VM lifecycle as a pure state machine: create → running → stop → (start | reboot) →
//! terminate. The libvirt shell asks it before touching a domain, so an invalid transition is
//! refused with a clear error and nothing happens.

/// Where a VM is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Defined, not running (after create, or after stop).
    Stopped,
    Running,
    /// Destroyed, undefined, disk wiped, key shredded at the broker: final.
    Terminated,
}

/// What an operator or the daemon asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Start,
    Stop,
    Reboot,
    Terminate,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Reboot => "reboot",
            Action::Terminate => "terminate",
        })
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Stopped => "stopped",
            State::Running => "running",
            State::Terminated => "terminated",
        })
    }
}

/// An action that does not apply to the state the VM is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("cannot {action} a VM that is {state}{hint}", hint = hint(*action, *state))]
pub struct InvalidTransition {
    pub action: Action,
    pub state: State,
}

fn hint(action: Action, state: State) -> &'static str {
    match (action, state) {
        (_, State::Terminated) => " (terminated is final: its key is shredded)",
        (Action::Reboot, State::Stopped) => " (start it instead)",
        (Action::Stop, State::Stopped) => " (it is already stopped)",
        (Action::Start, State::Running) => " (it is already running)",
        _ => "",
    }
}

/// The state after `action`, or why it does not apply.
pub fn next(state: State, action: Action) -> Result<State, InvalidTransition> {
    use Action::*;
    use State::*;
    match (state, action) {
        (Stopped, Start) => Ok(Running),
        (Running, Stop) => Ok(Stopped),
        (Running, Reboot) => Ok(Running),
        (Stopped | Running, Terminate) => Ok(Terminated),
        (state, action) => Err(InvalidTransition { action, state }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn action() -> impl Strategy<Value = Action> {
        prop_oneof![
            Just(Action::Start),
            Just(Action::Stop),
            Just(Action::Reboot),
            Just(Action::Terminate)
        ]
    }

    #[test]
    fn the_seed_lifecycle() {
        let mut s = State::Stopped;
        for a in [
            Action::Start,
            Action::Stop,
            Action::Start,
            Action::Reboot,
            Action::Terminate,
        ] {
            s = next(s, a).unwrap();
        }
        assert_eq!(s, State::Terminated);
        let e = next(State::Stopped, Action::Reboot).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot reboot a VM that is stopped (start it instead)"
        );
    }

    proptest! {
        /// Any sequence: terminated is final; running exactly when the last accepted start/stop
        /// was a start; a refused action changes nothing.
        #[test]
        fn invariants(actions in proptest::collection::vec(action(), 0..40)) {
            let mut s = State::Stopped;
            let mut terminated = false;
            let mut running = false;
            for a in actions {
                match next(s, a) {
                    Ok(n) => {
                        prop_assert!(!terminated, "an action was accepted after terminate");
                        match a {
                            Action::Start => { prop_assert!(!running); running = true; }
                            Action::Stop => { prop_assert!(running); running = false; }
                            Action::Reboot => prop_assert!(running),
                            Action::Terminate => terminated = true,
                        }
                        s = n;
                    }
                    Err(e) => prop_assert_eq!(e.state, s),
                }
                prop_assert_eq!(s == State::Running, running && !terminated);
                prop_assert_eq!(s == State::Terminated, terminated);
            }
        }
    }
}
