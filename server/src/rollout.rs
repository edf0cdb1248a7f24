//! Rollout waves: a new commit reaches the fleet wave by wave, canaries first, each wave only
//! once the waves before it have run the commit clean for a while; a failure halts it until an
//! operator acts. Pure: which wave a node is in, and what a rollout does next given what the
//! hosts reported. The server keeps the rollout's state in its database (`rollouts`) and
//! serves each host the commit its wave has reached ([`crate::fleet`]).
//!
//! ```yaml
//! rollout:
//!   window: 15m                # a wave soaks this long after its last host reported clean [30m]
//!   waves:
//!     - name: canary
//!       nodes: [web01.example.com, "db0?.example.com"]
//!     - name: early
//!       share: 25              # a quarter of the hosts no wave names
//!     - name: everyone         # neither: every host left
//! ```

use converge_modules::yaml::Spanned;
use serde::Deserialize;

/// `rollout` in site.yaml.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Rollout {
    /// How long a wave soaks once every host of it has run the commit clean, before the next
    /// wave gets it (`30m`, `2h`, `1d`) [30m].
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub window: Option<Spanned<String>>,
    /// The waves, in order: the first gets a new commit first.
    #[schemars(with = "Vec<Wave>")]
    pub waves: Vec<Spanned<Wave>>,
}

#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Wave {
    pub name: String,
    /// Node names and glob patterns of this wave.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub nodes: Vec<Spanned<String>>,
    /// Or: this percentage (1 to 100) of the hosts that no wave names and no earlier share
    /// took, chosen by a hash of their names (the same hosts every time).
    #[serde(default)]
    pub share: Option<u32>,
}

/// The default soak time of a wave.
pub const WINDOW: i64 = 1800;

impl Rollout {
    /// What is wrong with it, each with where: a wave with both nodes and a share, a share out
    /// of 1..=100, a name twice, a bad window, no wave.
    pub fn problems(&self) -> Vec<(converge_modules::diag::Mark, String)> {
        let mut out = Vec::new();
        if let Some(w) = &self.window
            && let Err(e) = converge_modules::settings::parse_duration(&w.value)
        {
            out.push((w.mark, format!("`window`: {e}")));
        }
        if self.waves.is_empty() {
            out.push((converge_modules::diag::Mark::UNKNOWN, "`rollout` lists no waves".to_string()));
        }
        let mut names = std::collections::BTreeSet::new();
        for w in &self.waves {
            if !names.insert(w.value.name.as_str()) {
                out.push((w.mark, format!("wave `{}` is named twice", w.value.name)));
            }
            if !w.value.nodes.is_empty() && w.value.share.is_some() {
                out.push((w.mark, format!("wave `{}` has both `nodes` and `share`: give one", w.value.name)));
            }
            if let Some(s) = w.value.share
                && !(1..=100).contains(&s)
            {
                out.push((w.mark, format!("wave `{}`: `share` is a percentage, 1 to 100, not {s}", w.value.name)));
            }
        }
        out
    }

    /// The soak time, in seconds.
    pub fn window(&self) -> i64 {
        self.window.as_ref().and_then(|w| converge_modules::settings::parse_duration(&w.value).ok()).unwrap_or(WINDOW)
    }

    /// How many waves there are, the hosts no wave takes counted as one more at the end.
    pub fn len(&self) -> usize {
        self.waves.len() + usize::from(!self.waves.iter().any(|w| w.value.nodes.is_empty() && w.value.share.is_none()))
    }

    /// Whether there is no wave (never: `problems` refuses it).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The name of wave `i` (`rest` for the hosts no wave takes).
    pub fn name(&self, i: usize) -> &str {
        self.waves.get(i).map_or("rest", |w| w.value.name.as_str())
    }

    /// The wave of `node`: the first wave that names it (exactly or by a pattern); else the
    /// first share whose slice of the hosts left holds the node's hash; else the first wave
    /// with neither (else the implicit last one).
    pub fn wave_of(&self, node: &str) -> usize {
        let named = |p: &str| p == node || (crate::site::is_pattern(p) && crate::site::glob_match(p, node));
        if let Some(i) = self.waves.iter().position(|w| w.value.nodes.iter().any(|p| named(&p.value))) {
            return i;
        }
        let h = unit_hash(node);
        let mut taken = 0.0;
        for (i, w) in self.waves.iter().enumerate() {
            if let Some(share) = w.value.share {
                taken += (1.0 - taken) * f64::from(share.min(100)) / 100.0;
                if h < taken {
                    return i;
                }
            }
        }
        self.waves.iter().position(|w| w.value.nodes.is_empty() && w.value.share.is_none()).unwrap_or(self.waves.len())
    }
}

/// A number in [0, 1) from a node's name, the same everywhere.
fn unit_hash(node: &str) -> f64 {
    let h = converge_modules::hash::sha256_hex(node.as_bytes());
    u64::from_str_radix(&h[..13], 16).unwrap_or(0) as f64 / (1u64 << 52) as f64
}

/// Where a rollout stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Waves up to `wave` have the commit; the next opens when they have run it clean for
    /// the window.
    Rolling,
    /// Stopped by a failure, or by an operator: no further wave gets the commit until
    /// `rollout resume` or `promote`.
    Halted(String),
    /// Every wave has it.
    Done,
}

impl State {
    pub fn word(&self) -> &'static str {
        match self {
            State::Rolling => "rolling",
            State::Halted(_) => "halted",
            State::Done => "done",
        }
    }
}

/// A rollout of a commit, as the database keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub commit: String,
    /// The commit hosts in waves not yet opened keep (`None`: every host gets the new one).
    pub previous: Option<String>,
    /// The last wave open: hosts in waves up to it get the commit.
    pub wave: usize,
    /// When that wave opened.
    pub since: i64,
    pub state: State,
}

/// What a host last ran, for [`step`].
#[derive(Debug, Clone)]
pub struct HostRun {
    pub name: String,
    pub commit: Option<String>,
    pub at: Option<i64>,
    pub failed: i64,
    pub unplanned: i64,
    /// Since when its runs have been of `commit`.
    pub since: Option<i64>,
}

impl Progress {
    /// Whether `wave` has the commit.
    pub fn has(&self, wave: usize) -> bool {
        self.previous.is_none() || self.state == State::Done || wave <= self.wave
    }
}

/// What the rollout `p` of `rollout` does next at `now`, given what the hosts last ran:
/// `None` when nothing changes. A host of an open wave that ran the commit with a failure or
/// an unplanned change since the state began (a failure an operator promoted past is not
/// counted again) halts it; the next wave opens once every host of the open waves has
/// run the commit clean and the last of them did so a window ago (a wave with no host opens
/// the next at once); after the last wave, done.
pub fn step(rollout: &Rollout, p: &Progress, hosts: &[HostRun], now: i64) -> Option<Progress> {
    if p.state != State::Rolling {
        return None;
    }
    let open: Vec<&HostRun> = hosts.iter().filter(|h| rollout.wave_of(&h.name) <= p.wave).collect();
    let on_it = |h: &HostRun| h.commit.as_deref() == Some(p.commit.as_str());
    // A failure from before the rollout's state began (an operator's promote or resume)
    // was seen already: only the runs since count.
    let fresh = |h: &HostRun| h.at.is_some_and(|at| at >= p.since);
    if let Some(bad) = open.iter().find(|h| on_it(h) && fresh(h) && (h.failed > 0 || h.unplanned > 0)) {
        let what = match (bad.failed, bad.unplanned) {
            (f, 0) => format!("{f} failed"),
            (0, u) => format!("{u} unplanned"),
            (f, u) => format!("{f} failed, {u} unplanned"),
        };
        let short = &p.commit[..p.commit.len().min(12)];
        return Some(Progress {
            state: State::Halted(format!(
                "{} ({}) ran {short} with {what}: no further wave gets it until `converge-server rollout resume` \
                 (after a fix, or to go on) or `promote`",
                bad.name,
                rollout.name(rollout.wave_of(&bad.name))
            )),
            ..p.clone()
        });
    }
    if open.iter().any(|h| !on_it(h)) {
        return None;
    }
    let last = open.iter().filter_map(|h| h.at).max().unwrap_or(p.since).max(p.since);
    let wave_empty = !open.iter().any(|h| rollout.wave_of(&h.name) == p.wave);
    if !wave_empty && now < last + rollout.window() {
        return None;
    }
    Some(next(rollout, p, now))
}

/// The rollout with its next wave open (or done after the last).
pub fn next(rollout: &Rollout, p: &Progress, now: i64) -> Progress {
    if p.wave + 1 >= rollout.len() {
        Progress { state: State::Done, since: now, ..p.clone() }
    } else {
        Progress { wave: p.wave + 1, since: now, state: State::Rolling, ..p.clone() }
    }
}

/// One wave's hosts, for the fleet page and `rollout status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    pub hosts: usize,
    /// Hosts whose last run was of the commit.
    pub ran: usize,
    /// Of those, the ones with a failure or an unplanned change.
    pub failed: Vec<String>,
}

/// Each wave's hosts, who ran `commit`, who failed it.
pub fn tally(rollout: &Rollout, commit: &str, hosts: &[HostRun]) -> Vec<Tally> {
    let mut out = vec![Tally { hosts: 0, ran: 0, failed: Vec::new() }; rollout.len()];
    for h in hosts {
        let Some(t) = out.get_mut(rollout.wave_of(&h.name)) else { continue };
        t.hosts += 1;
        if h.commit.as_deref() == Some(commit) {
            t.ran += 1;
            if h.failed > 0 || h.unplanned > 0 {
                t.failed.push(h.name.clone());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rollout(yaml: &str) -> Rollout {
        let n: &'static converge_modules::yaml::Node =
            Box::leak(Box::new(converge_modules::yaml::parse(yaml).unwrap()));
        converge_modules::yaml::from_node(n).unwrap()
    }

    fn host(name: &str, commit: &str, at: i64, failed: i64, unplanned: i64) -> HostRun {
        HostRun { name: name.into(), commit: Some(commit.into()), at: Some(at), failed, unplanned, since: Some(at) }
    }

    #[test]
    fn waves_by_name_then_share_then_the_rest() {
        let r = rollout(
            "window: 10m\nwaves:\n  - {name: canary, nodes: [web01, \"db?\"]}\n  - {name: half, share: 50}\n  - {name: late, nodes: [mail]}\n",
        );
        assert!(r.problems().is_empty());
        assert_eq!((r.window(), r.len()), (600, 4), "the hosts left make a last wave");
        assert_eq!(r.wave_of("web01"), 0);
        assert_eq!(r.wave_of("db1"), 0);
        assert_eq!(r.wave_of("mail"), 2, "named in a later wave: never taken by an earlier share");
        let hosts: Vec<String> = (0..2000).map(|i| format!("host{i}")).collect();
        let half = hosts.iter().filter(|h| r.wave_of(h) == 1).count();
        assert!((900..1100).contains(&half), "about half: {half}");
        assert!(hosts.iter().all(|h| matches!(r.wave_of(h), 1 | 3)));
        assert_eq!(r.name(3), "rest");
        assert_eq!(r.wave_of("host7"), r.wave_of("host7"), "the same every time");
        let bad = rollout("window: soon\nwaves:\n  - {name: a, nodes: [x], share: 5}\n  - {name: a, share: 0}\n");
        let problems: Vec<String> = bad.problems().into_iter().map(|(_, m)| m).collect();
        assert_eq!(problems.len(), 4, "{problems:?}");
    }

    #[test]
    fn a_wave_opens_after_a_clean_window_and_a_failure_halts() {
        let r = rollout("window: 10m\nwaves:\n  - {name: canary, nodes: [c1]}\n  - {name: all}\n");
        let p = Progress {
            commit: "new".into(),
            previous: Some("old".into()),
            wave: 0,
            since: 1000,
            state: State::Rolling,
        };
        assert!(p.has(0) && !p.has(1));
        let waiting = [host("c1", "old", 900, 0, 0), host("h1", "old", 900, 0, 0)];
        assert_eq!(step(&r, &p, &waiting, 5000), None, "the canary has not run it yet");
        let clean = [host("c1", "new", 1100, 0, 0), host("h1", "old", 900, 0, 0)];
        assert_eq!(step(&r, &p, &clean, 1100 + 599), None, "soaking");
        let opened = step(&r, &p, &clean, 1100 + 600).unwrap();
        assert_eq!((opened.wave, opened.state.clone()), (1, State::Rolling));
        assert!(opened.has(1));
        let all = [host("c1", "new", 1100, 0, 0), host("h1", "new", 1800, 0, 0)];
        assert_eq!(step(&r, &opened, &all, 1800 + 600).unwrap().state, State::Done);
        // A failure, or an unplanned change, on the commit halts; on the old commit it does not.
        let failed = [host("c1", "new", 1100, 2, 0), host("h1", "old", 900, 3, 0)];
        let halted = step(&r, &p, &failed, 1200).unwrap();
        let State::Halted(why) = &halted.state else { panic!("{halted:?}") };
        assert!(why.contains("c1 (canary) ran new with 2 failed"), "{why}");
        assert_eq!(step(&r, &halted, &failed, 99_999), None, "halted stays halted");
        let unplanned = [host("c1", "new", 1100, 0, 1)];
        assert!(matches!(step(&r, &p, &unplanned, 1200).unwrap().state, State::Halted(_)));
        // Promoted past a failure: that failure is not counted again, a new one is.
        let promoted = next(&r, &halted, 1300);
        assert_eq!((promoted.wave, promoted.state.clone()), (1, State::Rolling));
        let after = [host("c1", "new", 1100, 2, 0), host("h1", "new", 1400, 0, 0)];
        assert_eq!(step(&r, &promoted, &after, 1500), None, "soaking, the old failure seen");
        assert_eq!(step(&r, &promoted, &after, 1400 + 600).unwrap().state, State::Done);
        let again = [host("c1", "new", 1350, 1, 0), host("h1", "new", 1400, 0, 0)];
        assert!(matches!(step(&r, &promoted, &again, 1500).unwrap().state, State::Halted(_)));
        // A wave with no host opens the next at once.
        let empty = rollout("waves:\n  - {name: canary, nodes: [nobody]}\n  - {name: all}\n");
        assert_eq!(step(&empty, &p, &[host("h1", "old", 900, 0, 0)], 1001).unwrap().wave, 1);
        let t = tally(&r, "new", &[host("c1", "new", 1, 1, 0), host("h1", "old", 1, 0, 0), host("h2", "new", 1, 0, 0)]);
        assert_eq!(t[0], Tally { hosts: 1, ran: 1, failed: vec!["c1".into()] });
        assert_eq!(t[1], Tally { hosts: 2, ran: 1, failed: vec![] });
    }
}
